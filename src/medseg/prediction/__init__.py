"""Prediction: the `Predictor` (any kind of checkpoint, TTA, sliding window, resizing back),
post-processing, and the files written for each image."""

from medseg.prediction.predictor import Predictor, check_threshold, resolve_tta

__all__ = ["Predictor", "check_threshold", "resolve_tta"]
