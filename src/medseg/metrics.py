"""Segmentation metrics, all derived from per-image confusion counts (tp, fp, fn, tn).

Counts are computed once per image (`confusion_counts`); every overlap metric is then a formula
on the counts, so validation keeps only an (M, 4) integer table, which distributed code can
gather or sum across processes.

`MetricAccumulator` collects, per image, the counts and (with `surface=True`) the surface
distances, then aggregates them (`summary`):

- "mean over images" (`dice`, `iou`, `accuracy`, `sensitivity`, `specificity`, `hd95`, `assd`):
  the metric of each image, then the mean (and the median, `*_median`). This is what the ISIC
  challenge and most papers report; every image weighs the same, small lesions included.
- "pooled over the data set" (`dice_pooled`, `iou_pooled`): the counts of all images are summed
  first, then the metric is taken once. Large lesions dominate it.
- `thresholded_jaccard` (ISIC 2018: an image's IoU below 0.65 counts as 0) and the `worst`
  images by Dice.

Every "probability -> mask" decision goes through `binarize`, so one rule (strictly above the
threshold) holds for validation, evaluation and the tests.

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
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

METRIC_NAMES = ("dice", "iou", "accuracy", "sensitivity", "specificity")
SURFACE_NAMES = ("hd95", "assd")  # pixels
COUNT_NAMES = ("tp", "fp", "fn", "tn")
# The columns of `MetricAccumulator.rows()` and of per_image.csv.
PER_IMAGE_COLUMNS = ("id", *METRIC_NAMES, *SURFACE_NAMES, *COUNT_NAMES)
POOLED_NAMES = ("dice", "iou")
THRESHOLDED_JACCARD_CUTOFF = 0.65  # ISIC 2018


def binarize(values, threshold: float = 0.5):
    """Foreground mask: True where `values` > `threshold`, strictly; a Tensor or an array -> bool.

    `values` are probabilities in [0, 1] (sigmoid of the logits) or a soft target such as an
    interpolated mask; any shape, the result has the same shape.
    """
    return values > threshold


# ----------------------------------------------------------------------------------------------
# Confusion counts and the metrics derived from them


def _as_bool_masks(mask: Tensor, name: str) -> Tensor:
    """(N,1,H,W) or (N,H,W) bool or {0,1} tensor -> (N, H, W) bool."""
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(
            f"{name} must have shape (N, 1, H, W) or (N, H, W), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        # Probabilities would silently count every non-zero pixel as foreground.
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(
                f"{name} must hold only 0 and 1; threshold probabilities first with binarize()"
            )
        mask = mask.bool()
    return mask


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image counts: (N,1,H,W) or (N,H,W) masks -> (N, 4) int64 columns tp, fp, fn, tn."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return _counts_of(_as_bool_masks(pred, "pred"), _as_bool_masks(target, "target"))


def _counts_of(pred: Tensor, target: Tensor) -> Tensor:
    """(N, H, W) bool masks -> (N, 4) int64 counts."""
    pred, target = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1)
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


def thresholded_jaccard(iou_values, threshold: float = THRESHOLDED_JACCARD_CUTOFF) -> float:
    """ISIC 2018 score: mean of per-image IoU, each IoU below `threshold` counted as 0."""
    values = np.asarray(iou_values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("thresholded_jaccard needs at least one IoU value")
    return float(np.where(values < threshold, 0.0, values).mean())


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


def surface_distances(pred, target) -> tuple[float, float]:
    """(HD95, ASSD) in pixels between (H, W) bool masks, from one pair of distance transforms."""
    distances = _surface_distances(pred, target)
    if isinstance(distances, float):
        return distances, distances
    return float(np.percentile(distances, 95)), float(distances.mean())


def hausdorff95(pred, target) -> float:
    """95th percentile of symmetric boundary distances between (H, W) bool masks, in pixels."""
    return surface_distances(pred, target)[0]


def average_surface_distance(pred, target) -> float:
    """ASSD between (H, W) bool masks, in pixels.

    The mean of all boundary distances taken both ways, (Σd(∂pred→∂target) + Σd(∂target→∂pred))
    / (|∂pred| + |∂target|), so the longer boundary weighs more.
    """
    return surface_distances(pred, target)[1]


# ----------------------------------------------------------------------------------------------
# Accumulate per image, then aggregate over a data set


class MetricAccumulator:
    """Per-image results collected over batches, aggregated on demand (MONAI's pattern).

    Each image keeps an id, its confusion counts (tp, fp, fn, tn) and, when `surface` is True,
    its HD95 and ASSD in pixels. Every other number (`per_image`, `rows`, `summary`) is derived
    from those, so validation and folder evaluation aggregate the same way. Only the counts
    travel between processes (`counts`, `from_counts`).
    """

    def __init__(self, *, surface: bool = False) -> None:
        self.surface = surface
        self._counts: list[Tensor] = []
        self._distances: list[tuple[float, float]] = []  # (hd95, assd) per image
        self._ids: list[str | None] = []  # None: named by position when read

    def update(self, pred, target, *, ids: list[str] | None = None) -> None:
        """Add N images of one size: (N,1,H,W) or (N,H,W) bool or {0,1} tensors or arrays.

        `ids` names the images (default: their position in the accumulator).
        """
        pred = _as_bool_masks(torch.as_tensor(pred), "pred")
        target = _as_bool_masks(torch.as_tensor(target), "target")
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if ids is not None and len(ids) != pred.shape[0]:
            raise ValueError(f"{len(ids)} ids for {pred.shape[0]} images")
        self._counts.append(_counts_of(pred, target).cpu())
        if self.surface:
            pairs = zip(pred.cpu().numpy(), target.cpu().numpy(), strict=True)
            self._distances += [surface_distances(p, t) for p, t in pairs]
        self._ids += list(ids) if ids is not None else [None] * pred.shape[0]

    def add(self, image_id: str, pred, target) -> None:
        """Add one image: (H, W) bool masks, each image at its own size."""
        self.update(pred[None], target[None], ids=[image_id])

    @property
    def counts(self) -> Tensor:
        """All counts so far, (M, 4) int64 on the CPU, columns tp, fp, fn, tn."""
        if not self._counts:
            return torch.zeros((0, 4), dtype=torch.int64)
        # Concatenate once and keep the result, so repeated reads stay cheap.
        self._counts = [torch.cat(self._counts)]
        return self._counts[0]

    @property
    def ids(self) -> list[str]:
        """The M image ids, in the order they were added."""
        return [str(index) if name is None else name for index, name in enumerate(self._ids)]

    @classmethod
    def from_counts(cls, counts: Tensor, *, ids: list[str] | None = None) -> MetricAccumulator:
        """An accumulator holding (M, 4) counts, e.g. gathered from other processes."""
        if counts.dim() != 2 or counts.shape[1] != 4:
            raise ValueError(f"counts must have shape (M, 4), got {tuple(counts.shape)}")
        if ids is not None and len(ids) != counts.shape[0]:
            raise ValueError(f"{len(ids)} ids for {counts.shape[0]} images")
        accumulator = cls()
        accumulator._counts.append(counts.to(device="cpu", dtype=torch.int64))
        accumulator._ids = list(ids) if ids is not None else [None] * counts.shape[0]
        return accumulator

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Append the images of `other` to this accumulator; returns self."""
        if other.surface != self.surface:
            raise ValueError("cannot merge an accumulator with surface distances and one without")
        self._counts.append(other.counts)
        self._distances += other._distances
        self._ids += other._ids
        return self

    def __len__(self) -> int:
        return len(self._ids)

    def per_image(self) -> dict[str, np.ndarray]:
        """Per-image columns of shape (M,): `METRIC_NAMES` and, with `surface`, `SURFACE_NAMES`
        as float64; `COUNT_NAMES` as int64."""
        counts = self.counts
        columns = {name: metric(counts).numpy() for name, metric in _METRICS.items()}
        if self.surface:
            distances = np.array(self._distances, dtype=np.float64).reshape(-1, 2)
            columns.update(zip(SURFACE_NAMES, distances.T, strict=True))
        columns.update(zip(COUNT_NAMES, counts.numpy().T, strict=True))
        return columns

    def rows(self) -> list[dict[str, str | float | int]]:
        """One dict per image with the keys of `PER_IMAGE_COLUMNS` (surface ones only with
        `surface`), as Python numbers: the rows of per_image.csv."""
        columns = self.per_image()
        return [
            {"id": image_id, **{name: values[index].item() for name, values in columns.items()}}
            for index, image_id in enumerate(self.ids)
        ]

    def summary(self, *, worst: int = 5) -> dict[str, Any]:
        """Aggregates over the M images (see the module docstring for each kind).

        Keys: `images`; `name` (mean) and `name_median` for `METRIC_NAMES` and, with `surface`,
        `SURFACE_NAMES`; `dice_pooled`, `iou_pooled`; `thresholded_jaccard`; `worst`, the
        `worst` lowest-Dice images as [{"id", "dice"}], lowest first (ties in order added).
        """
        if len(self) == 0:
            raise ValueError("no images were added; call update() before summary()")
        columns = self.per_image()
        averaged = METRIC_NAMES + (SURFACE_NAMES if self.surface else ())
        summary: dict[str, Any] = {"images": len(self)}
        for name in averaged:
            summary[name] = float(columns[name].mean())
            summary[f"{name}_median"] = float(np.median(columns[name]))
        totals = self.counts.sum(0)
        for name in POOLED_NAMES:
            summary[f"{name}_pooled"] = float(_METRICS[name](totals))
        summary["thresholded_jaccard"] = thresholded_jaccard(columns["iou"])
        ids = self.ids
        order = np.argsort(columns["dice"], kind="stable")[:worst]
        summary["worst"] = [{"id": ids[i], "dice": float(columns["dice"][i])} for i in order]
        return summary
