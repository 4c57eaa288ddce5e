"""Multi-class accuracy on real data: JSRT chest X-rays, 5 structures, trained from scratch.

    python benchmarks/multiclass.py                      # the default command, scored on test/
    python benchmarks/multiclass.py --epochs 3           # a shorter run
    python benchmarks/multiclass.py --markdown runs/multiclass/multiclass.json   # README table

Trains exactly as ``medseg train --data DATA --out RUN --no-pretrained`` would (the plan reads
the classes and channels from dataset.json and sizes the images; selection on a seeded split of
train/, never on test/), then scores test/ with the default prediction (TTA as the checkpoint
recommends) with and without per-class post-processing. Prints per-class Dice and HD95 and
writes them as JSON. A finished run folder is reused, an interrupted one resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import hardware, train_once

import medseg
from medseg.config import parse_override
from medseg.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "jsrt"
VARIANTS = (("default", False), ("+postprocess", True))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "multiclass")
    parser.add_argument("--epochs", type=int, help="override the default recipe's epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print a saved result as Markdown tables"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    overrides = {"model.pretrained": False}
    overrides.update(dict(parse_override(text) for text in args.set))
    if args.epochs:
        overrides["train.epochs"] = args.epochs
    run = args.out / "run"
    train_seconds = train_once(args.data, run, overrides)
    result = {
        "hardware": hardware(),
        "data": str(args.data),
        "overrides": {key: str(value) for key, value in overrides.items()},
        "epochs": load_checkpoint(run / "checkpoints" / "last.pt")["epoch"],
        "train_seconds": train_seconds,
        "scores": {},
    }
    for label, postprocess in VARIANTS:
        started = time.perf_counter()
        summary = medseg.evaluate(
            checkpoint=run, data=args.data / "test", out=run / f"test-{int(postprocess)}",
            postprocess=postprocess, overwrite=True, progress=False,
        )  # fmt: skip
        result["scores"][label] = {
            "predict_seconds": time.perf_counter() - started,
            "mean_dice": summary["dice"],
            "per_class": summary["per_class"],
        }
    saved = args.out / "multiclass.json"
    saved.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nhardware: {result['hardware']}; written {saved}")
    return 0


def markdown(result: dict) -> str:
    """Per-class Dice and HD95 of each variant as Markdown tables."""
    lines = [
        f"{result['epochs']} epochs, {result['train_seconds'] / 60:.1f} min of training; "
        f"{result['hardware']}",
    ]
    for label, scores in result["scores"].items():
        classes = scores["per_class"]
        lines += [
            "",
            f"**{label}** (mean Dice over the structures {scores['mean_dice']:.3f}; "
            f"prediction {scores['predict_seconds']:.0f} s)",
            "",
            "| structure | Dice mean | Dice median | IoU | HD95 px | ASSD px | sensitivity | specificity |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, values in classes.items():
            lines.append(
                f"| {name} | {values['dice']:.3f} | {values['dice_median']:.3f} | "
                f"{values['iou']:.3f} | {values['hd95']:.1f} | {values['assd']:.1f} | "
                f"{values['sensitivity']:.3f} | {values['specificity']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
