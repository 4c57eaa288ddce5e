"""Segmentation metrics, all derived from per-image confusion counts (tp, fp, fn, tn).

Counts are computed once per image (`confusion_counts`); every overlap metric is then a formula
on the counts, so a whole evaluation keeps only an (M, 4) integer table, which distributed code
can gather or sum across processes.

Two aggregates are reported (`MetricAccumulator.summary`):

- "mean over images" (`dice`, `iou`, `accuracy`, `sensitivity`, `specificity`): the metric of
  each image, then the mean. This is what the ISIC challenge and most papers report; every image
  weighs the same, small lesions included.
- "pooled over the data set" (`dice_pooled`, `iou_pooled`, ...): the counts of all images are
  summed first, then the metric is taken once. Large lesions dominate it.

Conventions for empty cases, chosen so that no metric is ever NaN:

- dice = iou = 1 when prediction and ground truth are both empty (nothing to find, nothing found);
  when only one of them is empty they are 0, as the formulas give.
- sensitivity = tp / (tp + fn) is 1 when the ground truth has no foreground (nothing to miss).
- specificity = tn / (tn + fp) is 1 when the ground truth has no background.
- pixel accuracy of an image without pixels is 1 (it cannot occur for a real image).
- `hausdorff95` and `average_surface_distance` are 0.0 when both masks are empty, and the image
  diagonal sqrt(H² + W²), the largest distance possible in the image, when exactly one is empty.

Surface distances are in pixels. The boundary of a mask is its foreground pixels that have a
4-connected neighbour outside it (pixels on the image border count as boundary).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

METRIC_NAMES = ("dice", "iou", "accuracy", "sensitivity", "specificity")

# ----------------------------------------------------------------------------------------------
# Confusion counts and the metrics derived from them


def _as_bool_masks(mask: Tensor, name: str) -> Tensor:
    """(N,1,H,W) or (N,H,W) bool or {0,1} tensor -> (N, H·W) bool."""
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(
            f"{name} must have shape (N, 1, H, W) or (N, H, W), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        # Probabilities would silently count every non-zero pixel as foreground.
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1; threshold probabilities first")
        mask = mask.bool()
    return mask.reshape(mask.shape[0], -1)


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image counts: (N,1,H,W) or (N,H,W) masks -> (N, 4) int64 columns tp, fp, fn, tn."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred = _as_bool_masks(pred, "pred")
    target = _as_bool_masks(target, "target")
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)


def _unpack(counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(N, 4) or (4,) counts -> tp, fp, fn, tn as float64 tensors of shape (N,) or ()."""
    if counts.shape[-1] != 4 or counts.dim() > 2:
        raise ValueError(f"counts must have shape (N, 4) or (4,), got {tuple(counts.shape)}")
    return counts.to(torch.float64).unbind(-1)


def _ratio(numerator: Tensor, denominator: Tensor, *, empty: float) -> Tensor:
    """numerator / denominator, or `empty` where the denominator is 0."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.full_like(numerator, empty))


def dice(counts: Tensor) -> Tensor:
    """Dice 2tp / (2tp + fp + fn) from (N,4) or (4,) counts -> float64 (N,) or ()."""
    tp, fp, fn, _ = _unpack(counts)
    return _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)


def iou(counts: Tensor) -> Tensor:
    """IoU (Jaccard) tp / (tp + fp + fn) from (N,4) or (4,) counts -> float64 (N,) or ()."""
    tp, fp, fn, _ = _unpack(counts)
    return _ratio(tp, tp + fp + fn, empty=1.0)


def pixel_accuracy(counts: Tensor) -> Tensor:
    """(tp + tn) / all pixels from (N,4) or (4,) counts -> float64 (N,) or ()."""
    tp, fp, fn, tn = _unpack(counts)
    return _ratio(tp + tn, tp + fp + fn + tn, empty=1.0)


def sensitivity(counts: Tensor) -> Tensor:
    """Sensitivity (recall) tp / (tp + fn) from (N,4) or (4,) counts -> float64 (N,) or ()."""
    tp, _, fn, _ = _unpack(counts)
    return _ratio(tp, tp + fn, empty=1.0)


def specificity(counts: Tensor) -> Tensor:
    """Specificity tn / (tn + fp) from (N,4) or (4,) counts -> float64 (N,) or ()."""
    _, fp, _, tn = _unpack(counts)
    return _ratio(tn, tn + fp, empty=1.0)


_METRICS = {
    "dice": dice,
    "iou": iou,
    "accuracy": pixel_accuracy,
    "sensitivity": sensitivity,
    "specificity": specificity,
}


def thresholded_jaccard(iou_values, threshold: float = 0.65) -> float:
    """ISIC 2018 score: mean of per-image IoU, each IoU below `threshold` counted as 0."""
    values = np.asarray(iou_values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("thresholded_jaccard needs at least one IoU value")
    return float(np.where(values < threshold, 0.0, values).mean())


# ----------------------------------------------------------------------------------------------
# Accumulation over a data set


class MetricAccumulator:
    """Collects per-image confusion counts over batches; reports per-image and summary metrics."""

    def __init__(self) -> None:
        self._batches: list[Tensor] = []

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: (N,1,H,W) or (N,H,W) bool or {0,1} masks."""
        self._batches.append(confusion_counts(pred, target).cpu())

    @property
    def counts(self) -> Tensor:
        """All counts so far, (M, 4) int64 on the CPU, columns tp, fp, fn, tn."""
        if not self._batches:
            return torch.zeros((0, 4), dtype=torch.int64)
        # Concatenate once and keep the result, so repeated reads stay cheap.
        self._batches = [torch.cat(self._batches)]
        return self._batches[0]

    @classmethod
    def from_counts(cls, counts: Tensor) -> MetricAccumulator:
        """An accumulator holding (M, 4) counts, e.g. gathered from other processes."""
        if counts.dim() != 2 or counts.shape[1] != 4:
            raise ValueError(f"counts must have shape (M, 4), got {tuple(counts.shape)}")
        accumulator = cls()
        accumulator._batches.append(counts.to(device="cpu", dtype=torch.int64))
        return accumulator

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Append the images of `other` to this accumulator; returns self."""
        self._batches.append(other.counts)
        return self

    def __len__(self) -> int:
        return sum(batch.shape[0] for batch in self._batches)

    def per_image(self) -> dict[str, np.ndarray]:
        """Each metric of `METRIC_NAMES` per image, float64 arrays of shape (M,)."""
        counts = self.counts
        return {name: metric(counts).numpy() for name, metric in _METRICS.items()}

    def summary(self) -> dict[str, float]:
        """`name`: mean over images, `name_pooled`: from counts summed over the data set."""
        if len(self) == 0:
            raise ValueError("no images were added; call update() before summary()")
        totals = self.counts.sum(0)
        summary = {}
        for name, values in self.per_image().items():
            summary[name] = float(values.mean())
            summary[f"{name}_pooled"] = float(_METRICS[name](totals))
        return summary


# ----------------------------------------------------------------------------------------------
# Surface distances for single 2-D masks


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels of an (H, W) bool mask with a 4-connected neighbour outside it."""
    cross = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross)


def _surface_distances(pred, target) -> np.ndarray | float:
    """Distances from each boundary pixel of one mask to the other's boundary, both ways.

    Returns a 1-D array of pixel distances, or a float (0 or the image diagonal) when a mask is
    empty, following the conventions in the module docstring.
    """
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(
            f"pred {pred.shape} and target {target.shape} must be 2-D masks of one shape (H, W)"
        )
    pred_empty, target_empty = not pred.any(), not target.any()
    if pred_empty and target_empty:
        return 0.0
    if pred_empty or target_empty:
        return math.hypot(*pred.shape)
    pred_boundary, target_boundary = _boundary(pred), _boundary(target)
    # The EDT of the boundary's complement gives each pixel its distance to the nearest
    # boundary pixel, so one transform per mask serves every boundary pixel of the other.
    to_target = ndimage.distance_transform_edt(~target_boundary)
    to_pred = ndimage.distance_transform_edt(~pred_boundary)
    return np.concatenate([to_target[pred_boundary], to_pred[target_boundary]])


def hausdorff95(pred, target) -> float:
    """95th percentile of symmetric boundary distances between (H, W) bool masks, in pixels."""
    distances = _surface_distances(pred, target)
    if isinstance(distances, float):
        return distances
    return float(np.percentile(distances, 95))


def average_surface_distance(pred, target) -> float:
    """ASSD between (H, W) bool masks, in pixels.

    The mean of all boundary distances taken both ways, (Σd(∂pred→∂target) + Σd(∂target→∂pred))
    / (|∂pred| + |∂target|), so the longer boundary weighs more.
    """
    distances = _surface_distances(pred, target)
    if isinstance(distances, float):
        return distances
    return float(distances.mean())
