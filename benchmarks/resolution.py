"""What a training resolution costs before any learning: masks scaled down and back up.

    python benchmarks/resolution.py                     # ISIC 2017 train/ masks, sizes 128-256
    python benchmarks/resolution.py --sizes 160 --data DATA_ROOT

Each mask goes the way a prediction does: down to SIZE × SIZE as the training cache stores it,
then back to its own size as `Predictor` scales probabilities (bilinear, cut at 0.5). The Dice
of the round trip against the original is the best any network trained at SIZE could score:
the ceiling the resolution alone puts on accuracy. train/ only: test/ stays for the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from medseg.data.folder import find_pairs
from medseg.data.io import read_mask

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017"


def round_trip(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` (bool) at ``size`` as the cache stores it, then scaled back and thresholded."""
    soft = cv2.resize(mask.astype(np.uint8) * 255, (size, size), interpolation=cv2.INTER_LINEAR)
    small = (soft > 127).astype(np.float32)
    back = cv2.resize(small, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
    return back > 0.5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 192, 224, 256])
    args = parser.parse_args()
    masks = [read_mask(sample.mask) for sample in find_pairs(args.data / "train")]
    print(f"{len(masks)} masks of {args.data / 'train'}, scaled to SIZE and back")
    print(f"{'size':>6} {'mean Dice':>10} {'lowest':>8}")
    for size in args.sizes:
        scores = np.array([dice(round_trip(mask, size), mask) for mask in masks])
        print(f"{size:>6} {scores.mean():>10.4f} {scores.min():>8.4f}")


if __name__ == "__main__":
    main()
