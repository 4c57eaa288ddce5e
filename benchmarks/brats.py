"""Smoke benchmark on real NIfTI: two BraTS 2013 subjects (FLAIR + T1c, 4 tumour labels).

    python benchmarks/brats.py                              # default recipe's epochs
    python benchmarks/brats.py --epochs 1 --backbone resnet18 --image-size 64   # a quick check

Writes the subjects as an nnU-Net v2 raw root in a temporary folder (pat0005 in imagesTr and
labelsTr, pat0006 in imagesTs and labelsTs), trains exactly as ``medseg train --data ROOT --out
RUN --no-pretrained`` would on its 2D axial slices, segments pat0006's volume with ``medseg
predict``, checks the label volume comes back on the input's grid (same affine, read by
nibabel), and scores it with ``medseg evaluate``: per class 3D Dice and HD95 (mm), and the mean
Dice over the slices. Results go to benchmarks/results/brats.json and brats.md.

One subject to train on is a smoke test of the NIfTI path, not an accuracy claim.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import hardware

from medseg.cli import main as medseg

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "brats2013-nifti"
RESULTS = REPO / "benchmarks" / "results"
SUBJECTS = {"Tr": "brats_2013_pat0005_1", "Ts": "brats_2013_pat0006_1"}
CHANNELS = ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd")  # channel 0, channel 1
LABELS = {
    "background": 0,
    "necrosis": 1,
    "oedema": 2,
    "non_enhancing": 3,
    "enhancing": 4,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, help="training epochs (default: planned)")
    parser.add_argument("--backbone", help="ResNet backbone (default: the recipe's)")
    parser.add_argument("--image-size", help="network input side (default: planned)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="medseg-brats-") as scratch:
        work = Path(scratch)
        root = write_nnunet_root(args.data, work / "Dataset001_BraTS2013")
        flags = ["--no-pretrained", "--quiet", *(f"--set={text}" for text in args.set)]
        for flag, value in (
            ("--epochs", args.epochs),
            ("--backbone", args.backbone),
            ("--image-size", args.image_size),
        ):
            if value:
                flags += [flag, str(value)]
        started = time.perf_counter()
        _run(["train", "--data", str(root), "--out", str(work / "run"), *flags])
        train_seconds = time.perf_counter() - started
        affine_kept = _predict(root, work)
        evaluation = work / "evaluation"
        _run(["evaluate", "--checkpoint", str(work / "run"), "--data", str(root)]
             + ["--out", str(evaluation), "--quiet"])  # fmt: skip
        summary = json.loads((evaluation / "summary.json").read_text())
    result = {
        "hardware": hardware(),
        "data": str(args.data),
        "train": SUBJECTS["Tr"],
        "test": SUBJECTS["Ts"],
        "flags": flags,
        "train_seconds": round(train_seconds, 1),
        "affine_kept": affine_kept,
        "summary": summary,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "brats.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.results / "brats.md").write_text(table + "\n")
    print(table)
    return 0


def write_nnunet_root(data: Path, root: Path) -> Path:
    """Copy the two subjects into an nnU-Net v2 raw root (the source folder is read-only)."""
    spec = {
        "name": "BraTS 2013 (2 subjects)",
        "channel_names": {str(index): name.split("_")[0] for index, name in enumerate(CHANNELS)},
        "labels": LABELS,
        "file_ending": ".nii.gz",
        "numTraining": 1,
    }
    for split, subject in SUBJECTS.items():
        case = subject.split("_")[2]  # "pat0005"
        for folder in (f"images{split}", f"labels{split}"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(CHANNELS):
            target = root / f"images{split}" / f"{case}_{index:04d}.nii.gz"
            shutil.copyfile(data / subject / f"{name}.nii.gz", target)
        shutil.copyfile(
            data / subject / "OTMultiClass.nii.gz", root / f"labels{split}" / f"{case}.nii.gz"
        )
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root


def _predict(root: Path, work: Path) -> bool:
    """Segment imagesTs/ with medseg predict; whether the label volume kept the input's affine."""
    import nibabel

    out = work / "predictions"
    _run(["predict", "--checkpoint", str(work / "run"), "--input", str(root / "imagesTs")]
         + ["--out", str(out), "--quiet"])  # fmt: skip
    case = SUBJECTS["Ts"].split("_")[2]
    written = nibabel.load(out / f"{case}.nii.gz")
    source = nibabel.load(root / "imagesTs" / f"{case}_0000.nii.gz")
    kept = written.shape == source.shape[:3] and np.allclose(written.affine, source.affine)
    if not kept:
        raise SystemExit(f"{case}.nii.gz: shape or affine differs from the input's")
    return bool(kept)


def _run(argv: list[str]) -> None:
    status = medseg(argv)
    if status != 0:
        raise SystemExit(f"medseg {argv[0]} exited with {status}")


def markdown(result: dict) -> str:
    summary = result["summary"]
    lines = [
        f"BraTS 2013, trained on {result['train']}, scored on {result['test']} "
        f"({' '.join(result['flags'])}; {result['train_seconds']} s of training on "
        f"{result['hardware']})",
        "",
        "| class | Dice (3D) | HD95 (mm) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {scores['dice']:.3f} | {scores['hd95_mm']:.1f} |"
        for name, scores in summary["per_class"].items()
    ]
    lines += [
        f"| mean | {summary['dice']:.3f} | {summary['hd95_mm']:.1f} |",
        "",
        f"Per-slice mean Dice {summary['slice_dice']:.3f} over {summary['slices']} slices; "
        f"the label volume kept the input's affine: {result['affine_kept']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
