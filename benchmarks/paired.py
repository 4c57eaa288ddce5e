"""Two predictions of the same images compared image by image: is B better than A, or noise?

    python benchmarks/paired.py RUN/test-none-0 RUN/test-flip-0          # Dice, TTA against plain
    python benchmarks/paired.py A/per_image.csv B/per_image.csv --metric hd95

Each argument is an evaluation folder (``medseg evaluate --out``) or its ``per_image.csv``. The
images both score are paired by id; the difference of the means (B − A) gets a 95% confidence
interval from a paired bootstrap (the differences resampled image by image, as
`medseg.metrics.mean_interval` does for `medseg evaluate`'s interval of a mean), and the images
that moved most are listed: a mean over 150 images can be decided by three.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from medseg.metrics import mean_interval


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path, help="evaluation folder or per_image.csv (the baseline)")
    parser.add_argument("b", type=Path, help="evaluation folder or per_image.csv (the variant)")
    parser.add_argument("--metric", default="dice", help="a column of per_image.csv")
    parser.add_argument("--largest", type=int, default=5, help="images listed that moved most")
    args = parser.parse_args()
    first, second = read_scores(args.a, args.metric), read_scores(args.b, args.metric)
    ids = sorted(first.keys() & second.keys())
    if not ids:
        print(f"no image is scored in both {args.a} and {args.b}", file=sys.stderr)
        return 1
    a = np.array([first[i] for i in ids])
    b = np.array([second[i] for i in ids])
    comparison = paired_difference(a, b)
    low, high = comparison["ci95"]
    print(f"{len(ids)} images scored in both; {args.metric}: A {a.mean():.4f}, B {b.mean():.4f}")
    print(f"B − A: {comparison['mean']:+.4f} (95% CI {low:+.4f} to {high:+.4f}, paired bootstrap)")
    print(
        f"B higher on {comparison['higher']} images, lower on {comparison['lower']}, "
        f"equal on {len(ids) - comparison['higher'] - comparison['lower']}"
    )
    order = np.argsort(-np.abs(b - a))[: args.largest]
    print("moved most: " + ", ".join(f"{ids[i]} {a[i]:.3f}→{b[i]:.3f}" for i in order))
    return 0


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of ``b - a``, its 95% paired-bootstrap interval, and how many pairs went up or down."""
    differences = b - a
    return {
        "mean": float(differences.mean()),
        "ci95": mean_interval(differences),
        "higher": int((differences > 0).sum()),
        "lower": int((differences < 0).sum()),
    }


def read_scores(path: Path, metric: str) -> dict[str, float]:
    """Image id → ``metric`` from an evaluation folder or its per_image.csv (blank and NaN left out)."""
    table = path / "per_image.csv" if path.is_dir() else path
    with table.open(newline="", encoding="utf-8") as rows:
        reader = csv.DictReader(rows)
        if metric not in (reader.fieldnames or []):
            raise SystemExit(
                f"{table} has no column {metric!r}: {', '.join(reader.fieldnames or [])}"
            )
        return {row["id"]: float(row[metric]) for row in reader if row[metric] not in ("", "nan")}


if __name__ == "__main__":
    sys.exit(main())
