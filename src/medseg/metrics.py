"""Segmentation metrics, all derived from per-image, per-class confusion counts (tp, fp, fn, tn).

Counts are computed once per image and foreground class (`class_counts`); every overlap metric
is then a formula on the counts, so validation keeps only an (M, C, 4) integer table (M images,
C foreground classes), which distributed code can gather or sum across processes.

Classes. A binary mask (bool or 0/1) is the case of one foreground class. A label map holds the
class values 0 (background) to C; class k is scored one-vs-rest, ``pred == k`` against
``truth == k``. `foreground_classes` gives the names of the scored classes from
``config.data.labels``. The background is never scored: its Dice would mostly measure the
image's size.

`MetricAccumulator` collects, per image, the counts and (with `surface=True`) the surface
distances of every class, then aggregates them (`summary`):

- "mean over images" (`dice`, `iou`, `accuracy`, `sensitivity`, `specificity`, `hd95`, `assd`):
  the metric of each image, then the mean (and the median, `*_median`). This is what the ISIC
  challenge and most papers report; every image weighs the same, small lesions included. With
  several classes, an image's metric is the mean of its classes' (accuracy included: the mean of
  the classes' one-vs-rest accuracies), and ``per_class`` gives each class's own aggregates.
- "pooled over the data set" (`dice_pooled`, `iou_pooled`): the counts of all images are summed
  first, then the metric is taken once (per class, then the mean over classes). Large lesions
  dominate it.
- `thresholded_jaccard` (ISIC 2018: an image's IoU below 0.65 counts as 0) and the `worst`
  images by Dice.
- `mean_interval`: how far a mean over images could move on other images like these (a
  bootstrap confidence interval). `medseg evaluate` gives it for the mean Dice; two recipes
  scored on the same images are compared by the interval of their paired differences, which
  is much tighter than either mean's.

Every "probability -> mask" decision goes through `binarize`, so one rule (strictly above the
threshold) holds for validation, evaluation and the tests; several classes are arg-maxed.

Conventions for empty cases, chosen so that no metric is ever NaN, and the same for every class
(a class absent from an image is that class's empty case):

- dice = iou = 1 when prediction and ground truth are both empty (nothing to find, nothing found);
  when only one of them is empty they are 0, as the formulas give. So an image that rightly
  leaves out a class scores 1 for it, and a class that few images hold has a high mean Dice
  almost by default: read its ``dice_pooled`` (no empty case there once one image holds it) or
  its ``images_present`` beside it. MONAI's alternative (NaN, then skipped) was not taken: it
  would make the mean of a class that is absent everywhere undefined, and break binary scores,
  where "both empty is 1" is the ISIC convention the README states.
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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats
from torch import Tensor

METRIC_NAMES = ("dice", "iou", "accuracy", "sensitivity", "specificity")
SURFACE_NAMES = ("hd95", "assd")  # pixels
COUNT_NAMES = ("tp", "fp", "fn", "tn")
# The columns of `MetricAccumulator.rows()` and of per_image.csv for one class; with several,
# `MetricAccumulator.columns()` adds `PER_CLASS_NAMES` per class after them.
PER_IMAGE_COLUMNS = ("id", *METRIC_NAMES, *SURFACE_NAMES, *COUNT_NAMES)
PER_CLASS_NAMES = ("dice", "iou", "sensitivity", "specificity", *SURFACE_NAMES)
BINARY_CLASSES = ("foreground",)  # the one class of binary masks whose data names no classes
POOLED_NAMES = ("dice", "iou")
THRESHOLDED_JACCARD_CUTOFF = 0.65  # ISIC 2018
# The bootstrap of `mean_interval`: resamples drawn from a fixed seed (the same values give the
# same interval), this many at a time so that memory stays (batch × images) on any data set.
BOOTSTRAP_RESAMPLES = 5000
BOOTSTRAP_BATCH = 250
BOOTSTRAP_SEED = 0


def binarize(values, threshold: float = 0.5):
    """Foreground mask: True where `values` > `threshold`, strictly; a Tensor or an array -> bool.

    `values` are probabilities in [0, 1] (sigmoid of the logits) or a soft target such as an
    interpolated mask; any shape, the result has the same shape.
    """
    return values > threshold


# ----------------------------------------------------------------------------------------------
# Confusion counts and the metrics derived from them


def foreground_classes(labels: Sequence[str] = ()) -> tuple[str, ...]:
    """Names of the scored classes, by label value 1, 2, ...: ``labels[1:]`` (``labels`` being
    ``config.data.labels``, background first), or `BINARY_CLASSES` when ``labels`` is empty."""
    return tuple(labels[1:]) if labels else BINARY_CLASSES


def _as_label_maps(mask: Tensor, name: str, classes: int) -> Tensor:
    """(N,1,H,W) or (N,H,W) masks holding class values 0..classes -> (N, H, W), checked.

    Bool masks pass as they are (one class); other dtypes must hold whole class values.
    """
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(
            f"{name} must have shape (N, 1, H, W) or (N, H, W), got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    # Probabilities would silently count every non-zero pixel as foreground.
    valid = (mask >= 0) & (mask <= classes)
    if mask.is_floating_point():
        valid &= mask == mask.round()
    if not valid.all():
        if classes == 1:
            raise ValueError(
                f"{name} must hold only 0 and 1; threshold probabilities first with binarize()"
            )
        raise ValueError(
            f"{name} must hold the class values 0..{classes}; take the arg-max of class scores"
        )
    return mask


def class_counts(pred: Tensor, target: Tensor, *, classes: int = 1) -> Tensor:
    """Per-image, per-class counts: (N,1,H,W) or (N,H,W) label maps with values 0..classes
    (bool or 0/1 masks for one class) -> (N, classes, 4) int64, last axis tp, fp, fn, tn.

    Class k is counted one-vs-rest: ``pred == k`` against ``target == k``, for k = 1..classes.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred = _as_label_maps(pred, "pred", classes)
    target = _as_label_maps(target, "target", classes)
    return _class_counts_of(pred, target, classes)


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image counts: (N,1,H,W) or (N,H,W) masks -> (N, 4) int64 columns tp, fp, fn, tn."""
    return class_counts(pred, target, classes=1)[:, 0]


def _class_counts_of(
    pred: Tensor, target: Tensor, classes: int, roi: Tensor | None = None
) -> Tensor:
    """(N, H, W) checked label maps -> (N, classes, 4) int64 counts of classes 1..classes.

    With an (N, H, W) bool ``roi``, only the pixels inside it are counted; ``pred`` and
    ``target`` must already be background outside it (`_restrict`).
    """
    pixels = None if roi is None else roi.reshape(roi.shape[0], -1).sum(1)
    per_class = [_counts_of(pred == k, target == k, pixels) for k in range(1, classes + 1)]
    return torch.stack(per_class, dim=1)


def _counts_of(pred: Tensor, target: Tensor, pixels: Tensor | None = None) -> Tensor:
    """(N, H, W) bool masks -> (N, 4) int64 counts; ``pixels`` (N,): the scored pixels of each
    image (default: all of them), the rest being true negatives."""
    pred, target = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    tn = (pred.shape[1] if pixels is None else pixels) - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)


def _restrict(labels: Tensor, roi: Tensor) -> Tensor:
    """(N, H, W) label maps with every pixel outside the (N, H, W) bool ``roi`` background."""
    return torch.where(roi, labels, torch.zeros_like(labels))


def _as_roi(roi, shape: torch.Size) -> Tensor:
    """A region of interest as an (N, H, W) bool tensor matching label maps of ``shape``."""
    roi = torch.as_tensor(roi)
    if roi.dim() == 4 and roi.shape[1] == 1:
        roi = roi[:, 0]
    if roi.shape != shape:
        raise ValueError(f"roi {tuple(roi.shape)} and masks {tuple(shape)} differ")
    return roi.to(torch.bool)


def _unpack(counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(..., 4) counts, e.g. (N, C, 4), (N, 4) or (4,) -> tp, fp, fn, tn as float64 (...)."""
    if counts.dim() == 0 or counts.shape[-1] != 4:
        raise ValueError(f"counts must have shape (..., 4), got {tuple(counts.shape)}")
    return counts.to(torch.float64).unbind(-1)


def _ratio(numerator: Tensor, denominator: Tensor, *, empty: float) -> Tensor:
    """numerator / denominator, or `empty` where the denominator is 0."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.full_like(numerator, empty))


def dice(counts: Tensor) -> Tensor:
    """Dice 2tp / (2tp + fp + fn) from (..., 4) counts -> float64 (...)."""
    tp, fp, fn, _ = _unpack(counts)
    return _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)


def iou(counts: Tensor) -> Tensor:
    """IoU (Jaccard) tp / (tp + fp + fn) from (..., 4) counts -> float64 (...)."""
    tp, fp, fn, _ = _unpack(counts)
    return _ratio(tp, tp + fp + fn, empty=1.0)


def pixel_accuracy(counts: Tensor) -> Tensor:
    """(tp + tn) / all pixels from (..., 4) counts -> float64 (...)."""
    tp, fp, fn, tn = _unpack(counts)
    return _ratio(tp + tn, tp + fp + fn + tn, empty=1.0)


def sensitivity(counts: Tensor) -> Tensor:
    """Sensitivity (recall) tp / (tp + fn) from (..., 4) counts -> float64 (...)."""
    tp, _, fn, _ = _unpack(counts)
    return _ratio(tp, tp + fn, empty=1.0)


def specificity(counts: Tensor) -> Tensor:
    """Specificity tn / (tn + fp) from (..., 4) counts -> float64 (...)."""
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


def mean_interval(values, *, confidence: float = 0.95) -> tuple[float, float]:
    """The (low, high) bootstrap confidence interval of the mean of per-image ``values``
    (`scipy.stats.bootstrap`, BCa: per-image Dice is skewed by the few images a model misses).

    Of paired differences (one recipe's Dice minus another's, image by image), it says whether
    the two differ on images like these. Fewer than two values, or all equal, give (mean, mean).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_interval needs at least one value")
    if values.size < 2 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap(
        (values,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
        batch=BOOTSTRAP_BATCH, method="BCa", rng=np.random.default_rng(BOOTSTRAP_SEED),
    )  # fmt: skip
    low, high = result.confidence_interval
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Surface distances for single 2-D masks


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels of an (H, W) or (X, Y, Z) bool mask with a face neighbour outside it."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross)


def _surface_distances(pred, target, spacing=None) -> np.ndarray | float:
    """Distances from each boundary pixel of one mask to the other's boundary, both ways.

    Returns a 1-D array of pixel distances, or a float (0 or the image diagonal) when a mask is
    empty, following the conventions in the module docstring. With ``spacing`` (one size per
    axis, e.g. millimetres per voxel) the masks may be 3-D and distances are in its unit.
    """
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != (2 if spacing is None else len(spacing)):
        raise ValueError(
            f"pred {pred.shape} and target {target.shape} must be masks of one shape: 2-D "
            f"(H, W), or with spacing {spacing} one axis per entry"
        )
    pred_empty, target_empty = not pred.any(), not target.any()
    if pred_empty and target_empty:
        return 0.0
    if pred_empty or target_empty:
        sizes = pred.shape if spacing is None else np.multiply(pred.shape, spacing)
        return math.hypot(*sizes)
    pred_boundary, target_boundary = _boundary(pred), _boundary(target)
    # The EDT of the boundary's complement gives each pixel its distance to the nearest
    # boundary pixel, so one transform per mask serves every boundary pixel of the other.
    to_target = ndimage.distance_transform_edt(~target_boundary, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_boundary, sampling=spacing)
    return np.concatenate([to_target[pred_boundary], to_pred[target_boundary]])


def surface_distances(pred, target, spacing=None) -> tuple[float, float]:
    """(HD95, ASSD) in pixels between (H, W) bool masks, from one pair of distance transforms;
    with ``spacing`` (a size per axis), between masks of as many axes, in its unit (mm)."""
    distances = _surface_distances(pred, target, spacing)
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

    ``classes`` names the scored foreground classes, by label value 1, 2, ... (see
    `foreground_classes`); the default is the one class of binary masks. Each image keeps an id,
    its confusion counts (tp, fp, fn, tn) per class and, when `surface` is True, its HD95 and
    ASSD in pixels per class. Every other number (`per_image`, `rows`, `summary`) is derived
    from those, so validation and folder evaluation aggregate the same way. Only the counts
    travel between processes (`counts`, `from_counts`).
    """

    def __init__(self, *, classes: Sequence[str] = BINARY_CLASSES, surface: bool = False) -> None:
        if isinstance(classes, str) or not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must name one class or more, each once; got {classes!r}")
        self.classes = tuple(classes)
        self.surface = surface
        self._counts: list[Tensor] = []  # (N, C, 4) per update
        self._distances: list[np.ndarray] = []  # (C, 2) per image: hd95, assd of each class
        self._ids: list[str | None] = []  # None: named by position when read

    @property
    def multi_class(self) -> bool:
        """Whether more than one foreground class is scored (label maps, not binary masks)."""
        return len(self.classes) > 1

    def update(self, pred, target, *, ids: list[str] | None = None, roi=None) -> None:
        """Add N images of one size: (N,1,H,W) or (N,H,W) tensors or arrays, bool or 0/1 masks
        for one class, label maps holding the values 0..C for C classes.

        `ids` names the images (default: their position in the accumulator). `roi`, bool masks
        of the same shape, restricts every metric to the pixels inside it (DRIVE scores inside
        the field of view): the counts ignore the pixels outside, so the black around a fundus
        is no true negative, and the surface distances are taken with both masks set to
        background outside it.
        """
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        classes = len(self.classes)
        pred = _as_label_maps(pred, "pred", classes)
        target = _as_label_maps(target, "target", classes)
        if ids is not None and len(ids) != pred.shape[0]:
            raise ValueError(f"{len(ids)} ids for {pred.shape[0]} images")
        if roi is not None:
            roi = _as_roi(roi, pred.shape).to(pred.device)
            pred, target = _restrict(pred, roi), _restrict(target, roi)
        self._counts.append(_class_counts_of(pred, target, classes, roi).cpu())
        if self.surface:
            for p, t in zip(pred.cpu().numpy(), target.cpu().numpy(), strict=True):
                distances = [surface_distances(p == k, t == k) for k in range(1, classes + 1)]
                self._distances.append(np.array(distances, dtype=np.float64))
        self._ids += list(ids) if ids is not None else [None] * pred.shape[0]

    def add(self, image_id: str, pred, target, *, roi=None) -> None:
        """Add one image: (H, W) masks or label maps, each image at its own size; `roi` as for
        `update`, an (H, W) bool mask."""
        self.update(
            pred[None], target[None], ids=[image_id], roi=None if roi is None else roi[None]
        )

    @property
    def counts(self) -> Tensor:
        """All counts so far, int64 on the CPU, last axis tp, fp, fn, tn: (M, 4) for one class,
        (M, C, 4) for C classes, in the order of `classes`."""
        counts = self._class_counts()
        return counts[:, 0] if len(self.classes) == 1 else counts

    def _class_counts(self) -> Tensor:
        """All counts so far as (M, C, 4), whatever the number of classes."""
        if not self._counts:
            return torch.zeros((0, len(self.classes), 4), dtype=torch.int64)
        # Concatenate once and keep the result, so repeated reads stay cheap.
        self._counts = [torch.cat(self._counts)]
        return self._counts[0]

    @property
    def ids(self) -> list[str]:
        """The M image ids, in the order they were added."""
        return [str(index) if name is None else name for index, name in enumerate(self._ids)]

    @classmethod
    def from_counts(
        cls,
        counts: Tensor,
        *,
        classes: Sequence[str] | None = None,
        ids: list[str] | None = None,
    ) -> MetricAccumulator:
        """An accumulator holding (M, 4) or (M, C, 4) counts, e.g. gathered from processes.

        ``classes`` names the C classes (`foreground_classes`); it may be left out for one class.
        """
        if counts.dim() == 2:
            counts = counts[:, None]
        if counts.dim() != 3 or counts.shape[-1] != 4:
            raise ValueError(
                f"counts must have shape (M, 4) or (M, C, 4), got {tuple(counts.shape)}"
            )
        if classes is None:
            if counts.shape[1] != 1:
                raise ValueError(
                    f"counts of {counts.shape[1]} classes need their names; pass "
                    f"classes=foreground_classes(config.data.labels)"
                )
            classes = BINARY_CLASSES
        if len(classes) != counts.shape[1]:
            raise ValueError(f"{len(classes)} class names for counts of {counts.shape[1]} classes")
        if ids is not None and len(ids) != counts.shape[0]:
            raise ValueError(f"{len(ids)} ids for {counts.shape[0]} images")
        accumulator = cls(classes=classes)
        accumulator._counts.append(counts.to(device="cpu", dtype=torch.int64))
        accumulator._ids = list(ids) if ids is not None else [None] * counts.shape[0]
        return accumulator

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Append the images of `other` to this accumulator; returns self."""
        if other.surface != self.surface:
            raise ValueError("cannot merge an accumulator with surface distances and one without")
        if other.classes != self.classes:
            raise ValueError(f"cannot merge classes {other.classes} into {self.classes}")
        self._counts.append(other._class_counts())
        self._distances += other._distances
        self._ids += other._ids
        return self

    def __len__(self) -> int:
        return len(self._ids)

    def _by_class(self) -> dict[str, np.ndarray]:
        """(M, C) float64 per name of `METRIC_NAMES` and, with `surface`, `SURFACE_NAMES`."""
        counts = self._class_counts()
        columns = {name: metric(counts).numpy() for name, metric in _METRICS.items()}
        if self.surface:
            distances = np.array(self._distances, dtype=np.float64)
            distances = distances.reshape(-1, len(self.classes), 2)
            columns.update(zip(SURFACE_NAMES, np.moveaxis(distances, -1, 0), strict=True))
        return columns

    def columns(self) -> tuple[str, ...]:
        """The keys of every row of `rows`, in order: the columns of per_image.csv.

        `PER_IMAGE_COLUMNS` (surface ones only with `surface`); with several classes, then
        ``<name>_<class>`` for each name of `PER_CLASS_NAMES` and each class.
        """
        surface = SURFACE_NAMES if self.surface else ()
        names = ("id", *METRIC_NAMES, *surface, *COUNT_NAMES)
        if self.multi_class:
            scored = [name for name in PER_CLASS_NAMES if name in METRIC_NAMES or name in surface]
            names += tuple(f"{name}_{label}" for name in scored for label in self.classes)
        return names

    def per_image(self) -> dict[str, np.ndarray]:
        """Per-image columns of shape (M,), named as `columns` (without "id").

        `METRIC_NAMES` and, with `surface`, `SURFACE_NAMES` are float64, each image's mean over
        its classes; `COUNT_NAMES` are int64, summed over the classes; with several classes,
        ``<name>_<class>`` is that class's own value.
        """
        by_class = self._by_class()
        columns = {name: values.mean(axis=1) for name, values in by_class.items()}
        columns.update(zip(COUNT_NAMES, self._class_counts().sum(1).numpy().T, strict=True))
        if self.multi_class:
            for name in PER_CLASS_NAMES:
                if name in by_class:
                    for index, label in enumerate(self.classes):
                        columns[f"{name}_{label}"] = by_class[name][:, index]
        return columns

    def rows(self) -> list[dict[str, str | float | int]]:
        """One dict per image with the keys of `columns`, as Python numbers: the rows of
        per_image.csv."""
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
        With several classes each image's metric is its mean over classes, and two keys follow:
        `mean_foreground_dice`, the mean over classes of their mean Dice (equal to `dice`, as no
        class is ever skipped), and `per_class`, {class: {"images_present" (images whose ground
        truth holds it), the means and medians above, "dice_pooled", "iou_pooled"}}.
        """
        if len(self) == 0:
            raise ValueError("no images were added; call update() before summary()")
        by_class = self._by_class()
        columns = self.per_image()
        totals = self._class_counts().sum(0)  # (C, 4)
        summary: dict[str, Any] = {"images": len(self)}
        summary.update(_aggregate({name: columns[name] for name in by_class}))
        for name in POOLED_NAMES:
            summary[f"{name}_pooled"] = float(_METRICS[name](totals).mean())
        summary["thresholded_jaccard"] = thresholded_jaccard(columns["iou"])
        ids = self.ids
        order = np.argsort(columns["dice"], kind="stable")[:worst]
        summary["worst"] = [{"id": ids[i], "dice": float(columns["dice"][i])} for i in order]
        if self.multi_class:
            present = (self._class_counts()[..., [0, 2]].sum(-1) > 0).sum(0)  # tp + fn > 0
            per_class = {}
            for index, label in enumerate(self.classes):
                scores = {"images_present": int(present[index])}
                scores.update(_aggregate({k: v[:, index] for k, v in by_class.items()}))
                for name in POOLED_NAMES:
                    scores[f"{name}_pooled"] = float(_METRICS[name](totals[index]))
                per_class[label] = scores
            dices = [scores["dice"] for scores in per_class.values()]
            summary["mean_foreground_dice"] = float(np.mean(dices))
            summary["per_class"] = per_class
        return summary


# Pixels kept for the pixel AUC: 20 M pixels are 100 MB as float32 scores and bool truth; the
# whole DRIVE test set (20 images, 6.6 M pixels in the field of view) fits under it unsampled.
AUC_MAX_PIXELS = 20_000_000
AUC_SEED = 0


class PixelAUC:
    """Area under the ROC curve of foreground probabilities over all scored pixels of a data
    set (binary masks only), by `sklearn.metrics.roc_auc_score`.

    Pixels are kept as float32 scores and bool truth. Above ``max_pixels`` they are subsampled:
    each time the pixels kept pass the cap, every kept pixel stays with probability 1/2 and the
    pixels added later are kept at the halved rate, so every pixel of the data set has the same
    chance to count, memory stays under about 1.5 × ``max_pixels`` pixels, and the seeded
    generator makes the result the same on every run.
    """

    def __init__(self, *, max_pixels: int = AUC_MAX_PIXELS, seed: int = AUC_SEED) -> None:
        self.max_pixels = max_pixels
        self.rate = 1.0  # the chance that any pixel seen so far is kept
        self._rng = np.random.default_rng(seed)
        self._scores: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []
        self._kept = 0

    def add(self, probability, truth, *, roi=None) -> None:
        """Add one image: (H, W) foreground probabilities, its (H, W) bool or 0/1 truth and an
        optional (H, W) bool ``roi``, outside which pixels are ignored."""
        probability, truth = np.asarray(probability), np.asarray(truth)
        if probability.shape != truth.shape:
            raise ValueError(f"probability {probability.shape} and truth {truth.shape} differ")
        inside = np.ones(truth.shape, bool) if roi is None else np.asarray(roi, dtype=bool)
        if self.rate < 1.0:
            inside = inside & (self._rng.random(truth.shape) < self.rate)
        self._scores.append(probability[inside].astype(np.float32))
        self._truth.append(truth[inside].astype(bool))
        self._kept += len(self._truth[-1])
        while self._kept > self.max_pixels:
            self._halve()

    def merge(self, other: PixelAUC) -> PixelAUC:
        """Append the pixels ``other`` kept (another process's share of the images); returns self.

        Pixels kept at a higher rate than the other side's are thinned to the lower one first,
        so every pixel of the joined data keeps the same chance to count. Neither side
        subsampled (both under the cap): the pixels are joined as they are.
        """
        if other.rate < self.rate:
            self._thin(other.rate / self.rate)
        keep = self.rate / other.rate  # 1 unless ``other`` kept more densely
        for scores, truth in zip(other._scores, other._truth, strict=True):
            kept = self._rng.random(len(truth)) < keep if keep < 1.0 else slice(None)
            self._scores.append(scores[kept])
            self._truth.append(truth[kept])
        self._kept = sum(len(truth) for truth in self._truth)
        while self._kept > self.max_pixels:
            self._halve()
        return self

    def _halve(self) -> None:
        self._thin(0.5)

    def _thin(self, chance: float) -> None:
        """Keep each pixel kept so far with probability ``chance``; the rate falls with it."""
        if chance >= 1.0:
            return
        keep = [self._rng.random(len(truth)) < chance for truth in self._truth]
        self._scores = [scores[k] for scores, k in zip(self._scores, keep, strict=True)]
        self._truth = [truth[k] for truth, k in zip(self._truth, keep, strict=True)]
        self._kept = sum(len(truth) for truth in self._truth)
        self.rate *= chance

    @property
    def pixels(self) -> int:
        """How many pixels the AUC is computed from."""
        return self._kept

    def value(self) -> float | None:
        """The AUC, or None when the scored pixels hold only one class (it is then undefined)."""
        from sklearn.metrics import roc_auc_score  # only evaluation needs it; import is slow

        truth = np.concatenate(self._truth) if self._truth else np.zeros(0, bool)
        if truth.all() or not truth.any():
            return None
        return float(roc_auc_score(truth, np.concatenate(self._scores)))


def _aggregate(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """`name` (the mean) and `name_median` of each (M,) column, in the order given."""
    aggregates = {}
    for name, values in columns.items():
        aggregates[name] = float(values.mean())
        aggregates[f"{name}_median"] = float(np.median(values))
    return aggregates
