"""Exported models against the PyTorch path: speed at batch 16 and agreement of the masks.

    python benchmarks/export.py --checkpoint runs/multiclass/run --data ../shared/data/jsrt

Exports the checkpoint to ONNX (float32) and to int8 ONNX (static quantization calibrated on
the data root's train/ images), then, in this one process:

- times `Predictor.probabilities` on one batch of `--batch` test images (TTA none; the
  median of `--repeats` batches after one warm-up) for PyTorch (its automatic precision: bf16
  where the CPU computes it natively, else float32), onnxruntime float32 and int8;
- predicts every test image with each runtime and reports each one's per-image Dice against
  the PyTorch float32 masks (mean over the foreground classes), the share of all pixels whose
  label equals the PyTorch float32 mask's, and the Dice against the ground truth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medseg.api import export
from medseg.commands.evaluate import score_pair
from medseg.data.folder import find_pairs
from medseg.data.io import read_image, read_target
from medseg.prediction.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=REPO / "runs" / "multiclass" / "run")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "jsrt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runtimes = _runtimes(args.checkpoint, args.data, Path(folder))
        pairs = find_pairs(args.data / "test")
        reference = runtimes["PyTorch float32"]
        channels, labels = reference.config.data.channels, reference.config.data.labels
        images = [read_image(pair.image, channels=channels) for pair in pairs]
        truths = [read_target(pair.mask, labels) for pair in pairs]
        reference_masks = _masks(reference, images, args.batch)
        rows = {}
        for name, predictor in runtimes.items():
            masks = (
                reference_masks
                if name == "PyTorch float32"
                else _masks(predictor, images, args.batch)
            )
            rows[name] = {
                "ms_per_image": _speed(predictor, images[: args.batch], args.repeats),
                "dice_vs_pytorch_fp32": _dice(masks, reference_masks, labels),
                "pixels_equal_to_fp32": _pixels_equal(masks, reference_masks),
                "dice_vs_truth": float(np.mean(_dice(masks, truths, labels))),
            }
    _print(rows, len(images))
    summary = {
        name: {
            "ms_per_image": row["ms_per_image"],
            "dice_vs_pytorch_fp32_mean": float(np.mean(row["dice_vs_pytorch_fp32"])),
            "dice_vs_pytorch_fp32_min": min(row["dice_vs_pytorch_fp32"]),
            "pixels_equal_to_fp32": row["pixels_equal_to_fp32"],
            "dice_vs_truth": row["dice_vs_truth"],
        }
        for name, row in rows.items()
    }
    print(json.dumps(summary))
    return 0


def _runtimes(checkpoint: Path, data: Path, folder: Path) -> dict[str, Predictor]:
    options = {"tta": "none"}
    onnx = export(checkpoint=checkpoint, out=folder / "onnx", format="onnx")["out"]
    int8 = export(
        checkpoint=checkpoint, out=folder / "int8", format="onnx", quantize="int8",
        calibration=data / "train" / "images",
    )["out"]  # fmt: skip
    auto = Predictor.from_checkpoint(checkpoint, **options)
    return {
        "PyTorch float32": Predictor.from_checkpoint(checkpoint, precision="fp32", **options),
        f"PyTorch, auto precision ({auto.precision.name})": auto,
        "onnxruntime float32": Predictor.from_checkpoint(onnx, **options),
        "onnxruntime int8": Predictor.from_checkpoint(int8, **options),
    }


def _masks(predictor: Predictor, images: list[np.ndarray], batch: int) -> list[np.ndarray]:
    masks = []
    for start in range(0, len(images), batch):
        masks += predictor.masks(images[start : start + batch])
    return masks


def _speed(predictor: Predictor, images: list[np.ndarray], repeats: int) -> float:
    predictor.probabilities(images)  # warm-up: first-call costs are not the pace
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.probabilities(images)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) / len(images) * 1000


def _dice(masks, references, labels) -> list[float]:
    return [
        score_pair(str(index), mask, reference, labels=labels)["dice"]
        for index, (mask, reference) in enumerate(zip(masks, references, strict=True))
    ]


def _pixels_equal(masks, references) -> float:
    """The share of all pixels, over every image, whose label is the reference's."""
    equal = sum(int(np.count_nonzero(m == r)) for m, r in zip(masks, references, strict=True))
    return equal / sum(r.size for r in references)


def _print(rows: dict, count: int) -> None:
    print(
        f"{'runtime':<28} {'ms/img':>8} {'×PyTorch fp32':>14} {'Dice vs fp32: mean':>19} {'min':>7} {'pixels = fp32':>14} {'Dice vs truth':>14}"
    )
    base = rows["PyTorch float32"]["ms_per_image"]
    for name, row in rows.items():
        agreement = row["dice_vs_pytorch_fp32"]
        print(
            f"{name:<28} {row['ms_per_image']:>8.1f} {base / row['ms_per_image']:>14.2f} "
            f"{np.mean(agreement):>19.4f} {min(agreement):>7.4f} {row['pixels_equal_to_fp32']:>14.6f} "
            f"{row['dice_vs_truth']:>14.4f}"
        )
    print(f"({count} test images; speed on one batch, agreement and accuracy on all of them)")


if __name__ == "__main__":
    sys.exit(main())
