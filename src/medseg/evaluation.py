"""Scoring a checkpoint on a folder of image/mask pairs, each at its mask's own resolution.

`evaluate_folder` predicts with `medseg.inference.Predictor`, feeds every prediction and its mask
to one `MetricAccumulator` (overlap and surface metrics), and writes ``per_image.csv`` (columns
`PER_IMAGE_COLUMNS`) and ``summary.json`` (`MetricAccumulator.summary` plus what was scored and
how). Validation during training, at the network's resolution, is
`medseg.engine.evaluate.evaluate_loader`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.data.folder import Sample, check_pair, find_pairs, resolve_split_folder
from medseg.data.io import read_image, read_mask
from medseg.errors import MedsegError
from medseg.files import check_writable, write_csv, write_text
from medseg.inference import DEFAULT_TTA, Predictor
from medseg.metrics import PER_IMAGE_COLUMNS, MetricAccumulator
from medseg.report import pick_cases, write_report

__all__ = [
    "PER_IMAGE_COLUMNS",
    "SUMMARY_TABLE",
    "evaluate_folder",
    "format_summary",
    "score_pair",
]

# (label, summary key): the rows of the table `medseg evaluate` prints and the report shows.
SUMMARY_TABLE = (
    ("Dice (mean over images)", "dice"),
    ("Dice (median)", "dice_median"),
    ("Dice (pooled)", "dice_pooled"),
    ("Jaccard / IoU (mean)", "iou"),
    ("Jaccard (median)", "iou_median"),
    ("Thresholded Jaccard (ISIC 2018, <0.65 → 0)", "thresholded_jaccard"),
    ("Pixel accuracy (mean)", "accuracy"),
    ("Sensitivity (mean)", "sensitivity"),
    ("Specificity (mean)", "specificity"),
    ("HD95, pixels (mean)", "hd95"),
    ("ASSD, pixels (mean)", "assd"),
)


def evaluate_folder(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tta: str | None = None,
    postprocess: bool = False,
    threshold: float | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    report: str | Path | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on ``data`` (a split folder, or a root whose test/ is used).

    Predictions are made at each image's own size and compared with its mask there, a pixel
    being foreground above ``threshold`` (default: the checkpoint's ``train.threshold``).
    Writes ``per_image.csv`` and ``summary.json`` into ``out`` and returns the summary, whose
    ``data`` is the folder actually scored; with ``report``, also an offline HTML page
    (``report/index.html``, see `medseg.report`).
    """
    tta = DEFAULT_TTA if tta is None else tta
    out = Path(out)
    earlier = [name for name in ("summary.json", "per_image.csv") if (out / name).exists()]
    if earlier and not overwrite:
        raise MedsegError(
            f"{out} already holds an evaluation ({earlier[0]}); choose another --out or pass --overwrite"
        )
    check_writable(out)
    folder = resolve_split_folder(data, preferred="test")
    predictor = Predictor.from_checkpoint(
        checkpoint, device=device, tta=tta, postprocess=postprocess, compile=compile,
        threshold=threshold,
    )  # fmt: skip
    pairs = find_pairs(folder, mask_suffix=predictor.config.data.mask_suffix)
    metrics = _score_pairs(predictor, pairs, batch_size=batch_size, progress=progress)
    summary = metrics.summary()
    summary.update(
        {"checkpoint": str(checkpoint), "data": str(folder), "tta": tta, "postprocess": postprocess}
    )
    rows = metrics.rows()
    write_csv(out / "per_image.csv", rows, PER_IMAGE_COLUMNS)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    if report is not None:
        _write_report(Path(report) / "index.html", summary, rows, pairs, predictor)
    return summary


def _score_pairs(
    predictor: Predictor, pairs: list[Sample], *, batch_size: int, progress: bool
) -> MetricAccumulator:
    """Predict the pairs in chunks of ``batch_size`` and accumulate every image's metrics."""
    metrics = MetricAccumulator(surface=True)
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluating", disable=not progress):
        chunk = pairs[start : start + batch_size]
        images, masks = _read_pairs(chunk)
        for sample, mask, prediction in zip(chunk, masks, predictor.masks(images), strict=True):
            metrics.add(sample.id, prediction, mask)
    return metrics


def score_pair(sample_id: str, prediction: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """One row of per_image.csv (`PER_IMAGE_COLUMNS`) for an (H, W) bool prediction and truth."""
    metrics = MetricAccumulator(surface=True)
    metrics.add(sample_id, prediction, truth)
    return metrics.rows()[0]


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a summary, as printed by ``medseg evaluate``."""
    width = max(len(label) for label, _ in SUMMARY_TABLE)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{label:<{width}}  {summary[key]:.4f}" for label, key in SUMMARY_TABLE]
    worst = ", ".join(f"{case['id']} ({case['dice']:.3f})" for case in summary["worst"])
    lines.append(f"{summary['images']} images; lowest Dice: {worst}")
    return "\n".join(lines)


def _write_report(path: Path, summary, rows, pairs: list[Sample], predictor) -> None:
    """Predict again only the best, median and worst pairs, and write the HTML page."""
    cases = {}
    for kind, indices in pick_cases(rows).items():
        chosen = [pairs[i] for i in indices]
        images, masks = _read_pairs(chosen)
        predictions = predictor.masks(images)
        cases[kind] = [
            (sample.id, image, mask, prediction)
            for sample, image, mask, prediction in zip(
                chosen, images, masks, predictions, strict=True
            )
        ]
    write_report(path, summary, rows, cases, table=list(SUMMARY_TABLE))


def _read_pairs(samples: list[Sample]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 (H, W, 3) images and bool (H, W) masks; a pair of two sizes fails with its names."""
    images, masks = [], []
    for sample in samples:
        image, mask = read_image(sample.image), read_mask(sample.mask)
        if image.shape[:2] != mask.shape:
            check_pair(sample)
        images.append(image)
        masks.append(mask)
    return images, masks
