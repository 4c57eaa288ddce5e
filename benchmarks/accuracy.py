"""Accuracy on real data: train a recipe on ISIC 2017 train/, report on test/.

    python benchmarks/accuracy.py                      # the default recipe, full (about an hour on 2 cores)
    python benchmarks/accuracy.py --presets default seed --same-budget  # seed preset, default's epochs
    python benchmarks/accuracy.py --presets default seed --epochs 3   # a shorter, equal budget for both
    python benchmarks/accuracy.py --quick              # smoke run: tiny subset, 1 epoch
    python benchmarks/accuracy.py --markdown runs/accuracy/accuracy.json   # README table of a run

Each preset is trained exactly as ``medseg train --data DATA --out RUN --no-pretrained
[--preset seed]`` would (selection on a seeded split of train/, never on test/), then scored on
test/ with and without test-time augmentation and post-processing. Prints a table, writes it as
JSON beside the runs. An existing finished run folder is reused, so an interrupted benchmark can
be rerun without training again.
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
from medseg.config import build_config
from medseg.data.plan import MIN_EPOCHS
from medseg.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2017"
COLUMNS = (
    "dice",
    "dice_median",
    "iou",
    "iou_median",
    "thresholded_jaccard",
    "hd95",
    "assd",
    "sensitivity",
    "specificity",
)
VARIANTS = (
    ("plain", "none", False),
    ("+postprocess", "none", True),
    ("+TTA", "flip", False),
    ("+TTA +postprocess", "flip", True),
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "accuracy")
    parser.add_argument("--presets", nargs="+", default=["default"])
    parser.add_argument("--epochs", type=int, help="override every preset's epochs (equal budget)")
    parser.add_argument(
        "--same-budget", action="store_true", help="every preset trains the default recipe's epochs"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run on a small subset")
    parser.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print a saved result as a Markdown table"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return 0

    data = _quick_subset(args.data, args.out) if args.quick else args.data
    saved = args.out / "accuracy.json"
    results = {"hardware": hardware(), "data": str(args.data), "quick": args.quick, "runs": {}}
    if saved.is_file() and not args.quick:  # keep the other presets' results of earlier runs
        results["runs"] = json.loads(saved.read_text()).get("runs", {})
    for preset in args.presets:
        overrides = {"model.pretrained": False}
        if args.epochs or args.quick:
            overrides["train.epochs"] = 1 if args.quick else args.epochs
        elif args.same_budget and build_config(preset=preset).train.epochs != MIN_EPOCHS:
            # Same network, same step cost: equal epochs are an equal time budget.
            overrides["train.epochs"] = MIN_EPOCHS
        name = preset + (f"-{overrides['train.epochs']}ep" if "train.epochs" in overrides else "")
        run = args.out / name
        train_seconds = train_once(data, run, overrides, preset=preset)
        scores = {}
        for label, tta, postprocess in VARIANTS:
            started = time.perf_counter()
            summary = medseg.evaluate(
                checkpoint=run, data=Path(data) / "test", out=run / f"test-{tta}-{int(postprocess)}",
                tta=tta, postprocess=postprocess, overwrite=True, progress=False,
            )  # fmt: skip
            scores[label] = {key: summary[key] for key in COLUMNS}
            scores[label]["predict_seconds"] = time.perf_counter() - started
        epochs = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]
        results["runs"][name] = {
            "preset": preset,
            "epochs": epochs,
            "train_seconds": train_seconds,
            "scores": scores,
        }
        print(_table(name, results["runs"][name]), flush=True)
    saved.write_text(json.dumps(results, indent=2))
    print(f"hardware: {results['hardware']}; written {args.out / 'accuracy.json'}")
    return 0


def _table(name: str, run: dict) -> str:
    header = f"{'':<20}" + "".join(f"{column:>12}" for column in COLUMNS)
    lines = [
        f"\n{name}: {run['epochs']} epochs, training {run['train_seconds'] / 60:.1f} min",
        header,
    ]
    for label, scores in run["scores"].items():
        lines.append(f"{label:<20}" + "".join(f"{scores[column]:>12.4f}" for column in COLUMNS))
    return "\n".join(lines)


MARKDOWN_COLUMNS = (
    ("dice", "Dice mean"), ("dice_median", "Dice median"), ("iou", "Jaccard mean"),
    ("iou_median", "Jaccard median"), ("thresholded_jaccard", "thresholded Jaccard"),
    ("hd95", "HD95 px"), ("assd", "ASSD px"), ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
)  # fmt: skip


def markdown_table(results: dict) -> str:
    """All runs of a saved result as one Markdown table (the README's Results table)."""
    header = (
        "| recipe | epochs | training min | inference | "
        + " | ".join(label for _, label in MARKDOWN_COLUMNS)
        + " |"
    )
    lines = [header, "|---|---:|---:|---|" + "---:|" * len(MARKDOWN_COLUMNS)]
    runs = sorted(results["runs"].values(), key=lambda run: run["preset"] != "default")
    for run in runs:  # the default recipe first
        for label, scores in run["scores"].items():
            cells = [
                f"{scores[key]:.1f}" if key in ("hd95", "assd") else f"{scores[key]:.3f}"
                for key, _ in MARKDOWN_COLUMNS
            ]
            lines.append(
                f"| {run['preset']} | {run['epochs']} | {run['train_seconds'] / 60:.1f} | {label} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def _quick_subset(source: Path, out: Path) -> Path:
    target = out / "quick-data"
    for split, count in (("train", 40), ("test", 8)):
        images = sorted((source / split / "images").iterdir())[:count]
        for folder in ("images", "masks"):
            (target / split / folder).mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copy2(image, target / split / "images" / image.name)
            mask = f"{image.stem}_segmentation.png"
            shutil.copy2(source / split / "masks" / mask, target / split / "masks" / mask)
    return target


if __name__ == "__main__":
    sys.exit(main())
