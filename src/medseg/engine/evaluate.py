"""Evaluation: validation during training, and scoring a checkpoint on a folder of pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from medseg.data.folder import Sample, check_pair, find_pairs, resolve_split_folder
from medseg.data.io import read_image, read_mask
from medseg.engine.runtime import Precision
from medseg.errors import MedsegError
from medseg.files import check_writable, write_csv, write_text
from medseg.metrics import (
    MetricAccumulator,
    average_surface_distance,
    binarize,
    confusion_counts,
    hausdorff95,
    pixel_accuracy,
    sensitivity,
    specificity,
    thresholded_jaccard,
)
from medseg.metrics import dice as metric_dice
from medseg.metrics import iou as metric_iou


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader,
    *,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision,
    threshold: float = 0.5,
    channels_last: bool = False,
    progress: bool = False,
) -> tuple[float, MetricAccumulator]:
    """Mean loss over images, and per-image confusion counts at `threshold`.

    `loader` yields dicts with "image" (N, 3, H, W) float and "mask" (N, 1, H, W) in [0, 1].
    Each image's loss is taken on that image alone, and the metrics come from per-image counts,
    so both are per-image means that do not depend on how the images fall into batches (a loss
    that pools over its batch, such as the soft Dice, would otherwise change with the split).
    """
    model.eval()
    metrics = MetricAccumulator()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc="validating", leave=False, disable=not progress):
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        masks = batch["mask"].to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
        logits = logits.float()
        loss_sum += _summed_image_losses(loss_fn, logits, masks)
        metrics.update(binarize(torch.sigmoid(logits), threshold), binarize(masks))
    # One host sync for the whole pass, not one per batch.
    return float(loss_sum) / max(len(metrics), 1), metrics


def _summed_image_losses(loss_fn: nn.Module, logits: Tensor, masks: Tensor) -> Tensor:
    """Σ over the N images of loss_fn on that image alone; (N,1,H,W) each -> float64 scalar."""
    losses = [loss_fn(logits[i : i + 1], masks[i : i + 1]) for i in range(logits.shape[0])]
    return torch.stack(losses).double().sum()


# ---------------------------------------------------------------------------------------------
# Evaluating a checkpoint on a folder of pairs, at the masks' own resolution.

PER_IMAGE_COLUMNS = (
    "id",
    "dice",
    "iou",
    "accuracy",
    "sensitivity",
    "specificity",
    "hd95",
    "assd",
    "tp",
    "fp",
    "fn",
    "tn",
)


def evaluate_folder(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tta: str | None = None,
    postprocess: bool = False,
    batch_size: int = 16,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    report: str | Path | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on ``data`` (a split folder, or a root whose test/ is used).

    Predictions are made at each image's own size and compared with its mask there. Writes
    ``per_image.csv`` and ``summary.json`` into ``out`` and returns the summary; with
    ``report``, also an offline HTML page (``report/index.html``, see `medseg.report`).
    """
    from medseg.inference import DEFAULT_TTA, Predictor  # inference builds on the engine

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
        checkpoint, device=device, tta=tta, postprocess=postprocess, compile=compile
    )
    pairs = find_pairs(folder, mask_suffix=predictor.config.data.mask_suffix)
    rows = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluating", disable=not progress):
        chunk = pairs[start : start + batch_size]
        images, masks = _read_pairs(chunk)
        for sample, mask, prediction in zip(chunk, masks, predictor.masks(images), strict=True):
            rows.append(score_pair(sample.id, prediction, mask))
    summary = summarize(rows)
    summary.update(
        {"checkpoint": str(checkpoint), "data": str(folder), "tta": tta, "postprocess": postprocess}
    )
    write_csv(out / "per_image.csv", rows, PER_IMAGE_COLUMNS)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    if report is not None:
        _write_report(Path(report) / "index.html", summary, rows, pairs, predictor)
    return summary


def _write_report(path: Path, summary, rows, pairs: list[Sample], predictor) -> None:
    from medseg.report import pick_cases, write_report

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


def score_pair(sample_id: str, prediction: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Every per-image number for one bool prediction against its bool ground truth."""
    counts = confusion_counts(torch.from_numpy(prediction)[None], torch.from_numpy(truth)[None])
    tp, fp, fn, tn = (int(value) for value in counts[0])
    return {
        "id": sample_id,
        "dice": float(metric_dice(counts)[0]),
        "iou": float(metric_iou(counts)[0]),
        "accuracy": float(pixel_accuracy(counts)[0]),
        "sensitivity": float(sensitivity(counts)[0]),
        "specificity": float(specificity(counts)[0]),
        "hd95": hausdorff95(prediction, truth),
        "assd": average_surface_distance(prediction, truth),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def summarize(rows: list[dict[str, Any]], *, worst: int = 5) -> dict[str, Any]:
    """Means and medians over images, pooled Dice/IoU, the ISIC thresholded Jaccard, worst cases."""
    column = {
        name: np.array([row[name] for row in rows], dtype=np.float64)
        for name in PER_IMAGE_COLUMNS[1:]
    }
    pooled = torch.tensor(
        [[column[name].sum() for name in ("tp", "fp", "fn", "tn")]], dtype=torch.int64
    )
    summary: dict[str, Any] = {"images": len(rows)}
    for name in ("dice", "iou", "accuracy", "sensitivity", "specificity", "hd95", "assd"):
        summary[name] = float(column[name].mean())
        summary[f"{name}_median"] = float(np.median(column[name]))
    summary["dice_pooled"] = float(metric_dice(pooled)[0])
    summary["iou_pooled"] = float(metric_iou(pooled)[0])
    summary["thresholded_jaccard"] = thresholded_jaccard(column["iou"])
    order = np.argsort(column["dice"])[:worst]
    summary["worst"] = [{"id": rows[i]["id"], "dice": rows[i]["dice"]} for i in order]
    return summary


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


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a summary, as printed by ``medseg evaluate``."""
    width = max(len(label) for label, _ in SUMMARY_TABLE)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{label:<{width}}  {summary[key]:.4f}" for label, key in SUMMARY_TABLE]
    worst = ", ".join(f"{case['id']} ({case['dice']:.3f})" for case in summary["worst"])
    lines.append(f"{summary['images']} images; lowest Dice: {worst}")
    return "\n".join(lines)


def _read_pairs(samples: list[Sample]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for sample in samples:
        image, mask = read_image(sample.image), read_mask(sample.mask)
        if image.shape[:2] != mask.shape:
            check_pair(sample)
        images.append(image)
        masks.append(mask)
    return images, masks
