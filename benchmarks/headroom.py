"""How far several models of one data set are from a target, and where the distance lies.

    python benchmarks/headroom.py benchmarks/results/offline-pretrained-isic-lite0-ema-*-per-image.csv --target 0.88

Each argument is an evaluation folder (``medseg evaluate --out``) or its ``per_image.csv``, all
scoring the same test images. Printed: each model's mean with its 95% interval
(`medseg.metrics.mean_interval`) and the distance to the target in whole images (a mean over 150
images rises by 0.0067 for each image that goes from Dice 0 to 1); the mean of the best model on
each image, picked after seeing the truth, which no rule that picks one of these models per
image beats (averaging them could, in principle); and the images every model misses, with each
model's mean without them. A target above the best-per-image mean is out of reach of picking
among these recipes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from paired import read_scores

from medseg.metrics import mean_interval


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="evaluation folders or per_image.csv")
    # Scores where higher is better: the best model per image is the one scoring highest.
    parser.add_argument("--metric", default="dice", choices=["dice", "iou", "accuracy"])
    parser.add_argument("--target", type=float, default=None, help="the mean to be reached")
    parser.add_argument("--missed", type=float, default=0.5, help="a score below this is a miss")
    args = parser.parse_args()
    tables = [read_scores(run, args.metric) for run in args.runs]
    ids = sorted(set.intersection(*(set(table) for table in tables)))
    if not ids:
        print("no image is scored by every model", file=sys.stderr)
        return 1
    scores = np.array([[table[i] for i in ids] for table in tables])
    print(f"{len(ids)} images scored by all {len(tables)} models; {args.metric}")
    for run, row in zip(args.runs, scores, strict=True):
        print(_model_line(_name(run), row, args.target, args.missed, args.metric))
    best = scores.max(0)
    print(_model_line("best model per image (after the truth)", best, args.target, 0, args.metric))
    missed_by_all = best < args.missed
    print(
        f"{missed_by_all.sum()} images below {args.missed} in every model: "
        + ", ".join(f"{ids[i]} {scores[:, i].max():.3f}" for i in np.flatnonzero(missed_by_all))
    )
    rest = scores[:, ~missed_by_all]
    print("without them: " + ", ".join(f"{row.mean():.4f}" for row in rest))
    return 0


def _model_line(
    name: str, values: np.ndarray, target: float | None, missed: float, metric: str
) -> str:
    low, high = mean_interval(values)
    line = f"  {name}: {values.mean():.4f} (95% interval {low:.3f}-{high:.3f})"
    if missed:
        line += f", {(values < missed).sum()} below {missed}"
    if target is not None and values.mean() < target:
        images = (target - values.mean()) * len(values)
        line += f"; {images:.1f} images' worth of {metric} short of {target}"
    elif target is not None:
        line += f"; past {target}"
    return line


def _name(run: Path) -> str:
    return run.parent.name if run.name == "per_image.csv" else run.stem.removesuffix("-per-image")


if __name__ == "__main__":
    sys.exit(main())
