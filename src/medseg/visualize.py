"""Pictures of results: mask overlays, prediction panels and training curves.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never pyplot: no global
state, so it is safe from threads and needs no display.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medseg.errors import MedsegError
from medseg.files import atomic_path

# Green and magenta stay distinct for the common forms of colour blindness.
PREDICTION_COLOR = (0, 255, 0)
GROUND_TRUTH_COLOR = (255, 0, 255)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    color: tuple[int, int, int] = (0, 255, 0),
    alpha: float = 0.4,
    contour_color: tuple[int, int, int] = (255, 0, 0),
    contour: bool = True,
    thickness: int | None = None,
) -> np.ndarray:
    """Blend `mask` onto `image` and outline it; returns a new uint8 H x W x 3 image.

    `image` is uint8 H x W x 3 (or H x W grey); colours are in the image's channel order (RGB
    for medseg). `mask` is H x W: bool, 0/1, 0/255, or probabilities (foreground >= 0.5).
    `thickness` of the outline in pixels defaults to about 1 per 256 pixels of image size.
    """
    rgb = _as_rgb(image)
    foreground = _as_bool_mask(mask, rgb.shape[:2])
    blended = rgb.astype(np.float32)
    blended[foreground] = (1.0 - alpha) * blended[foreground] + alpha * np.float32(color)
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if contour:
        draw_contour(result, foreground, contour_color, thickness=thickness)
    return result


def draw_contour(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int],
    *,
    thickness: int | None = None,
) -> np.ndarray:
    """Draw the outer outline of `mask` on uint8 H x W x 3 `image` in place, and return it."""
    if thickness is None:
        thickness = max(1, round(max(image.shape[:2]) / 256))
    binary = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, tuple(int(c) for c in color), thickness)
    return image


def save_prediction_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    ground_truth: np.ndarray | None,
    prediction: np.ndarray,
    *,
    title: str | None = None,
) -> Path:
    """Save a panel figure: image, ground truth, prediction, and prediction overlaid on the image.

    The overlay fills the prediction in green with a green outline and, when `ground_truth` is
    given, outlines the ground truth in magenta. Without ground truth there are three panels.
    The format follows the suffix of `path` (png, pdf, svg, ...).
    """
    rgb = _as_rgb(image)
    predicted = _as_bool_mask(prediction, rgb.shape[:2], name="prediction")
    truth = None
    if ground_truth is not None:
        truth = _as_bool_mask(ground_truth, rgb.shape[:2], name="ground_truth")

    # A light fill keeps the lesion visible under the prediction.
    combined = overlay(
        rgb, predicted, color=PREDICTION_COLOR, alpha=0.25, contour_color=PREDICTION_COLOR
    )
    panels = [("Image", rgb)]
    if truth is not None:
        panels.append(("Ground truth", truth))
        draw_contour(combined, truth, GROUND_TRUTH_COLOR)
    panels += [("Prediction", predicted), ("Overlay", combined)]

    figure = Figure(figsize=(3.2 * len(panels), 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for ax, (name, picture) in zip(axes, panels, strict=True):
        if picture.ndim == 2:
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(picture)
        ax.set_title(name)
        ax.set_axis_off()
    axes[-1].legend(
        handles=_legend_handles(with_truth=truth is not None),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2,
        fontsize="small",
        frameon=False,
    )
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a run's metrics.csv into one dict per row (values are the strings in the file)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except OSError as error:
        raise MedsegError(f"cannot read metrics file {path}: {error.strerror or error}") from error


def plot_training_curves(rows: Iterable[Mapping[str, object]], path: str | os.PathLike) -> Path:
    """Save a two-panel figure of training progress from metrics rows.

    Left: train and val loss per epoch. Right: val Dice and IoU per epoch (fractions, 0..1).
    Values may be numbers or csv strings; missing or empty values are skipped.
    """
    rows = list(rows)
    if not rows:
        raise MedsegError(f"no metrics to plot for {path}: train for at least one epoch first")
    epochs = [_number(row.get("epoch"), default=index + 1) for index, row in enumerate(rows)]

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, score_ax = figure.subplots(1, 2)
    _plot_series(loss_ax, rows, epochs, {"train_loss": "train", "val_loss": "val"})
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    _plot_series(score_ax, rows, epochs, {"val_dice": "val Dice", "val_iou": "val IoU"})
    score_ax.set(title="Validation overlap", xlabel="epoch", ylabel="score", ylim=(0.0, 1.0))
    return _save(figure, path)


def _plot_series(ax, rows, epochs: list[float], columns: Mapping[str, str]) -> None:
    """Plot each column that has at least one number; points without a value are left out."""
    for key, label in columns.items():
        points = [(e, _number(row.get(key))) for e, row in zip(epochs, rows, strict=True)]
        points = [(e, v) for e, v in points if math.isfinite(v)]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)


def _number(value: object, default: float = math.nan) -> float:
    """`value` as a float, or `default` when it is missing, empty or not a number."""
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _legend_handles(*, with_truth: bool) -> list[Line2D]:
    handles = [Line2D([], [], color=np.divide(PREDICTION_COLOR, 255), label="prediction")]
    if with_truth:
        handles.append(Line2D([], [], color=np.divide(GROUND_TRUTH_COLOR, 255), label="truth"))
    return handles


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    """Render `figure` to `path` atomically, in the format named by the suffix."""
    path = Path(path)
    canvas = FigureCanvasAgg(figure)
    file_format = path.suffix.lstrip(".").lower() or "png"
    if file_format not in canvas.get_supported_filetypes():
        known = ", ".join(sorted(canvas.get_supported_filetypes()))
        raise MedsegError(f"cannot save a figure as {path.name}: use one of the suffixes {known}")
    with atomic_path(path) as temporary:
        # The temporary name ends in .tmp<suffix>; naming the format keeps that from mattering.
        figure.savefig(temporary, format=file_format, dpi=100)
    return path


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image of shape H x W x 3, got {image.dtype} {image.shape}"
        )
    return image


def _as_bool_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {mask.shape} but the image is {tuple(shape)}; "
            "resize it to the image first"
        )
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= 0.5
    return mask != 0
