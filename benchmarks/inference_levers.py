"""What prediction alone can add to a trained binary model: the DeepLabv3+ paper's multi-scale
inputs, the threshold, and two post-processing rules, chosen on the run's own validation images
and only then reported on test/.

    python benchmarks/inference_levers.py RUN --data ../shared/data/isic2017
    python benchmarks/inference_levers.py RUN --data DATA --out benchmarks/results/levers.json

Each image's foreground probability is computed once per input scale (the checkpoint's size
times 0.5 ... 1.75, the scales of Chen et al. 2018, each with the checkpoint's TTA), then every
combination of scales, threshold and rule is scored by mean per-image Dice at the mask's own size:

- scales: ``1`` (what ``medseg predict`` does), ``0.75-1.25`` and the paper's ``0.5-1.75``
  (the probabilities at each scale resized back to the image and averaged; all six scales are
  ``--tta flip-scales``);
- threshold: 0.3, 0.4, 0.5 (the checkpoint's default);
- rule: ``none``, ``largest`` (the largest region, holes filled: ``--postprocess``), and
  ``never-empty`` (an empty mask is redrawn at half the image's highest probability: every
  image of a lesion data set holds a lesion).

The validation images are those that chose best.pt (the seeded share of train/, from the
checkpoint's config); the row that validates best is the one a user could pick without test/.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from common import hardware

from medseg import metrics
from medseg.config.choices import TTA_SCALES
from medseg.data.folder import find_pairs, train_val_samples
from medseg.data.io import read_image, read_mask
from medseg.metrics import confusion_counts
from medseg.prediction.postprocess import keep_largest_component
from medseg.prediction.predictor import Predictor
from medseg.prediction.segmenter import View

SCALES = TTA_SCALES  # 0.5 ... 1.75: all of them is --tta flip-scales
SCALE_SETS = {"1": (1.0,), "0.75-1.25": (0.75, 1.0, 1.25), "0.5-1.75": SCALES}
THRESHOLDS = (0.3, 0.4, 0.5)
RULES = ("none", "largest", "never-empty")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run folder (checkpoints/best.pt)")
    parser.add_argument("--data", type=Path, required=True, help="the data set it was trained on")
    parser.add_argument("--out", type=Path, help="write the table's rows as JSON here")
    parser.add_argument("--limit", type=int, help="score only the first N images of each split")
    args = parser.parse_args()

    predictor = Predictor.from_checkpoint(args.run / "checkpoints" / "best.pt")
    config = predictor.config
    _, val = train_val_samples(
        args.data, mask_suffix=config.data.mask_suffix, val_fraction=config.data.val_fraction,
        seed=config.train.seed,
    )  # fmt: skip
    test = find_pairs(args.data / "test", mask_suffix=config.data.mask_suffix)
    val, test = val[: args.limit], test[: args.limit]
    rows = []
    for split, samples in (("val", val), ("test", test)):
        scores = score_split(predictor, samples)
        rows += [
            {"split": split, "scales": name, "threshold": threshold, "rule": rule, "dice": value}
            for (name, threshold, rule), value in scores.items()
        ]
    print(markdown(rows))
    print(f"\nhardware: {hardware()}; {len(val)} validation, {len(test)} test images")
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "hardware": hardware(),
                                        "rows": rows}, indent=2))  # fmt: skip
    return 0


def score_split(predictor: Predictor, samples: list) -> dict:
    """{(scales, threshold, rule): mean Dice} over ``samples``."""
    at_scale = {scale: scaled(predictor, scale) for scale in SCALES}
    totals: dict = {}
    for sample in samples:
        image, truth = read_image(sample.image), read_mask(sample.mask)
        maps = {scale: p.probabilities([image])[0] for scale, p in at_scale.items()}
        for (name, scales), threshold, rule in itertools.product(
            SCALE_SETS.items(), THRESHOLDS, RULES
        ):
            probability = np.mean([maps[scale] for scale in scales], axis=0)
            mask = to_mask(probability, threshold, rule)
            key = (name, threshold, rule)
            totals[key] = totals.get(key, 0.0) + dice(mask, truth)
    return {key: total / len(samples) for key, total in totals.items()}


def scaled(predictor: Predictor, scale: float) -> Predictor:
    """``predictor`` whose TTA views (the checkpoint's mode) are all fed at ``scale``."""
    return AtScale(
        predictor.model, predictor.config, predictor.device, predictor.precision,
        tta=predictor.tta, scale=scale,
    )  # fmt: skip


@dataclasses.dataclass
class AtScale(Predictor):
    scale: float = 1.0

    def views(self) -> list[View]:
        return [view._replace(scale=self.scale) for view in super().views()]


def to_mask(probability: np.ndarray, threshold: float, rule: str) -> np.ndarray:
    mask = probability > threshold
    if rule == "largest":
        return keep_largest_component(mask)
    if rule == "never-empty" and not mask.any():
        return probability > probability.max() / 2
    return mask


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    """The Dice `medseg evaluate` reports for one binary mask."""
    counts = confusion_counts(torch.from_numpy(mask)[None], torch.from_numpy(truth)[None])
    return metrics.dice(counts)[0].item()


def markdown(rows: list[dict]) -> str:
    """Every combination a row, its validation and test Dice side by side, best validation first."""
    by_key: dict = {}
    for row in rows:
        key = (row["scales"], row["threshold"], row["rule"])
        by_key.setdefault(key, {})[row["split"]] = row["dice"]
    lines = ["| scales | threshold | rule | val Dice | test Dice |", "|---|---:|---|---:|---:|"]
    for key, value in sorted(by_key.items(), key=lambda item: -item[1]["val"]):
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {value['val']:.4f} | {value['test']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
