"""What every predictor shares, one model or an ensemble: the TTA modes, the classes its config
names, and the rules that turn its probabilities into masks (threshold or arg-max, then
post-processing)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medseg.config import Config
from medseg.config.choices import FLIPPING_AUGMENTATIONS, TTA_MODES, TTA_SCALES
from medseg.core.errors import MedsegError
from medseg.data.plan import augmentation_for
from medseg.metrics import binarize
from medseg.prediction.postprocess import keep_largest_component, keep_largest_components


def resolve_tta(mode: str, config: Config) -> str:
    """The TTA mode to run: ``mode`` itself, or for "auto" "flip" when the checkpoint's training
    pipeline (``config.data.augment``) flips images, else "none"."""
    if mode == "auto":
        augment = config.data.augment
        if augment == "auto":  # a config never planned (built by hand): what training plans
            augment = augmentation_for(config.data.labels, config.data.mode)
        return "flip" if augment in FLIPPING_AUGMENTATIONS else "none"
    tta_views(mode)  # validate
    return mode


class View(NamedTuple):
    """One TTA view: the image turned by quarter turns, flipped left-right, rescaled."""

    turns: int
    flip: bool
    scale: float = 1.0


def tta_views(mode: str) -> list[View]:
    """The views of ``mode``: 'flip' the 4 flips, 'd4' all 8 symmetries, 'flip-scales' the 4 flips
    at each of `TTA_SCALES`.

    ``mode`` is a resolved mode (see `resolve_tta`), not "auto".
    """
    flips = [View(0, False), View(0, True), View(2, False), View(2, True)]  # id, h, 180° (h+v), v
    if mode == "none":
        return [View(0, False)]
    if mode == "flip":
        return flips
    if mode == "d4":
        return [View(turns, flip) for turns in range(4) for flip in (False, True)]
    if mode == "flip-scales":
        return [view._replace(scale=scale) for scale in TTA_SCALES for view in flips]
    raise MedsegError(f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}")


def check_threshold(threshold: float | None) -> None:
    """Refuse a foreground threshold outside (0, 1); None (the checkpoint's own) passes."""
    if threshold is None:
        return
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise MedsegError(
            f"threshold {threshold!r} is not a probability strictly between 0 and 1; "
            f"pass e.g. --threshold 0.5, or leave it out to use the checkpoint's"
        )


class Segmenter:
    """Masks from probabilities. A subclass sets ``config``, ``threshold`` (see
    `settle_threshold`) and ``postprocess``, and defines ``probabilities(images)``."""

    config: Config
    threshold: float | None
    postprocess: bool

    def settle_threshold(self, default: float | None) -> None:
        """Check ``self.threshold``; None becomes ``default`` for a binary model. A K-class model
        has no threshold (its mask is the arg-max), so one given is refused."""
        check_threshold(self.threshold)
        if self.multi_class and self.threshold is not None:
            raise MedsegError(
                f"threshold {self.threshold!r} applies to binary masks only; this checkpoint "
                f"predicts {self.config.model.num_classes} classes by arg-max, so leave "
                f"--threshold out"
            )
        if self.threshold is None and not self.multi_class:
            self.threshold = default

    def probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    @property
    def multi_class(self) -> bool:
        """True for a K-class model (softmax, label maps), False for a binary one (sigmoid)."""
        return self.config.model.num_classes > 1

    @property
    def patches(self) -> bool:
        """True for a model trained on patches (``data.mode=patch``): it predicts whole images
        at their own size by `medseg.engine.sliding_window`, with TTA on each tile."""
        return self.config.data.mode == "patch"

    @property
    def labels(self) -> list[str]:
        """Class names by label value (``config.data.labels``); empty for binary masks."""
        return list(self.config.data.labels)

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Masks at each image's size: bool (H, W) for binary, uint8 (H, W) label maps for K
        classes (see `to_mask`)."""
        return [self.to_mask(probability) for probability in self.probabilities(images)]

    def to_mask(self, probability: np.ndarray) -> np.ndarray:
        """One output of `probabilities` as a mask: `binarize` or `label_map`."""
        return self.label_map(probability) if self.multi_class else self.binarize(probability)

    def binarize(self, probability: np.ndarray) -> np.ndarray:
        """A bool (H, W) mask: foreground above the threshold; its largest region if postprocess."""
        mask = binarize(probability, self.threshold)
        return keep_largest_component(mask) if self.postprocess else mask

    def label_map(self, probabilities: np.ndarray) -> np.ndarray:
        """A uint8 (H, W) label map: the arg-max of (K, H, W) probabilities, taken at the image's
        own size (never a resized label map); with postprocess, each class's largest region."""
        labels = probabilities.argmax(0).astype(np.uint8)
        return keep_largest_components(labels) if self.postprocess else labels
