"""Prediction: the `Predictor` (any kind of checkpoint, TTA, sliding window, resizing back), the
`EnsemblePredictor` (several models' probabilities averaged), post-processing, and the files
written for each image."""

from medseg.prediction.predictor import EnsemblePredictor, Predictor, check_threshold, resolve_tta

__all__ = ["EnsemblePredictor", "Predictor", "check_threshold", "resolve_tta"]
