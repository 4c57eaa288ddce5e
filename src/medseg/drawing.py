"""Pictures of results: mask overlays, prediction panels and training curves.

A mask is either binary (bool, 0/1, 0/255 or probabilities), drawn in one colour, or a uint8
label map of class indices, each class in its own colour (`class_colour`, the one palette of
every picture medseg draws) with the background left as it is.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never pyplot: no global
state, so it is safe from threads and needs no display.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator

from medseg.core.errors import MedsegError
from medseg.core.files import atomic_path
from medseg.metrics import binarize

# Green and magenta stay distinct for the common forms of colour blindness.
PREDICTION_COLOR = (0, 255, 0)
GROUND_TRUTH_COLOR = (255, 0, 255)
# Label maps: the truth is outlined in white (with a dark edge in legends), a colour no class has.
LABEL_TRUTH_COLOR = (255, 255, 255)

# Class colours (RGB), class k >= 1 in PALETTE[(k - 1) % 10]: bright and saturated, so each
# stays visible blended onto gray radiographs as onto skin, and neighbours differ in hue.
# Class 1 is green, as a binary prediction.
PALETTE = (
    (0, 255, 0),  # green
    (255, 0, 255),  # magenta
    (0, 160, 255),  # azure
    (255, 220, 0),  # yellow
    (255, 100, 0),  # orange
    (0, 255, 255),  # cyan
    (160, 90, 255),  # violet
    (255, 0, 90),  # crimson
    (255, 160, 200),  # pink
    (0, 140, 110),  # teal
)


def class_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of class ``index`` in every picture: `PALETTE` [index - 1], repeating
    past its end; 0, the background, is black (and left transparent in overlays)."""
    if index < 0:
        raise ValueError(f"class index {index} is negative; label values are 0 (background) up")
    return (0, 0, 0) if index == 0 else PALETTE[(index - 1) % len(PALETTE)]


def colour_label_map(label_map: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) label map as a uint8 (H, W, 3) picture: each class its colour, background
    black."""
    table = np.array([class_colour(index) for index in range(256)], dtype=np.uint8)
    return table[np.asarray(label_map, dtype=np.uint8)]


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    labels: list[str] | tuple[str, ...] | None = None,
    *,
    color: tuple[int, int, int] = (0, 255, 0),
    alpha: float = 0.4,
    contour_color: tuple[int, int, int] = (255, 0, 0),
    contour: bool = True,
    thickness: int | None = None,
    legend: bool = True,
) -> np.ndarray:
    """Blend `mask` onto `image` and outline it; returns a new uint8 image.

    `image` is uint8 H x W x 3 (or H x W or H x W x 1 gray); colours are in the image's channel
    order (RGB for medseg). `mask` is H x W: a binary mask (bool, 0/1, 0/255, or probabilities,
    foreground >= 0.5), filled in `color` and outlined in `contour_color`; or a uint8 label map,
    each class filled and outlined in `class_colour` (`color` and `contour_color` unused). An
    integer mask is a label map when `labels` names more than two classes or it holds values
    other than 0, 1 and 255. With `labels` (class names by value), a label map gets a legend in
    a strip below the image, so the result is taller (and wider, if the names need it); with
    ``legend=False`` it keeps the image's size (the caller shows the names).
    `thickness` of the outline in pixels defaults to about 1 per 256 pixels of image size.
    """
    rgb = _as_rgb(image)
    if _is_label_map(mask, labels):
        label_map = _as_label_map(mask, rgb.shape[:2])
        result = _overlay_label_map(
            rgb, label_map, alpha=alpha, contour=contour, thickness=thickness
        )
        return _with_legend(result, labels) if labels and legend else result
    foreground = _as_bool_mask(mask, rgb.shape[:2])
    blended = rgb.astype(np.float32)
    blended[foreground] = (1.0 - alpha) * blended[foreground] + alpha * np.float32(color)
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if contour:
        draw_contour(result, foreground, contour_color, thickness=thickness)
    return result


def _overlay_label_map(
    rgb: np.ndarray, label_map: np.ndarray, *, alpha: float, contour: bool, thickness: int | None
) -> np.ndarray:
    foreground = label_map > 0
    blended = rgb.astype(np.float32)
    colours = colour_label_map(label_map).astype(np.float32)
    blended[foreground] = (1.0 - alpha) * blended[foreground] + alpha * colours[foreground]
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if contour:
        for value in np.unique(label_map[foreground]):
            draw_contour(result, label_map == value, class_colour(int(value)), thickness=thickness)
    return result


def _with_legend(picture: np.ndarray, labels: list[str] | tuple[str, ...]) -> np.ndarray:
    """`picture` above a black strip naming each foreground class beside a square of its colour.

    Entries flow left to right and wrap at the picture's width; the text grows with the picture.
    """
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.4, picture.shape[1] / 1000)
    weight = max(1, round(scale))
    (_, text_height), baseline = cv2.getTextSize("Ag", font, scale, weight)
    pad, line = max(4, text_height // 2), text_height + baseline + max(4, text_height // 2)
    entries, x, y, right = [], pad, pad, 0
    for value, name in enumerate(labels):
        if value == 0:
            continue  # the background has no colour
        text = _ascii(name)
        width = text_height + pad + cv2.getTextSize(text, font, scale, weight)[0][0]
        if x > pad and x + width > picture.shape[1] - pad:
            x, y = pad, y + line
        entries.append((x, y, value, text))
        right = max(right, x + width + pad)
        x += width + 2 * pad
    height, width = picture.shape[0] + y + line + pad, max(picture.shape[1], right)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[: picture.shape[0], : picture.shape[1]] = picture
    for x, y, value, text in entries:
        top = picture.shape[0] + y
        colour = tuple(int(c) for c in class_colour(value))
        cv2.rectangle(canvas, (x, top), (x + text_height, top + text_height), colour, cv2.FILLED)
        origin = (x + text_height + pad, top + text_height)
        cv2.putText(canvas, text, origin, font, scale, (255, 255, 255), weight, cv2.LINE_AA)
    return canvas


def _ascii(name: str) -> str:
    """`name` in the letters OpenCV's fonts can draw: accents dropped, other characters '?'."""
    plain = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    return plain if plain.strip() else "?" * max(1, len(str(name)))


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
    labels: list[str] | tuple[str, ...] | None = None,
) -> Path:
    """Save a panel figure: image, ground truth, prediction, and prediction overlaid on the image.

    Binary masks: the overlay fills the prediction in green with a green outline and, when
    `ground_truth` is given, outlines the ground truth in magenta. Label maps (as `overlay`
    tells them; `labels` names the classes): truth and prediction in class colours, the overlay
    fills the prediction in class colours and outlines each class of the truth in white; the
    legend names the classes. Without ground truth there are three panels. `image` may be gray
    (H, W) or (H, W, 1). The format follows the suffix of `path` (png, pdf, svg, ...).
    """
    rgb = _as_rgb(image)
    if _is_label_map(prediction, labels):
        return _save_label_map_figure(path, rgb, ground_truth, prediction, title, labels)
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


def _save_label_map_figure(path, rgb, ground_truth, prediction, title, labels) -> Path:
    predicted = _as_label_map(prediction, rgb.shape[:2], name="prediction")
    truth = None
    if ground_truth is not None:
        truth = _as_label_map(ground_truth, rgb.shape[:2], name="ground_truth")
    combined = _overlay_label_map(rgb, predicted, alpha=0.4, contour=True, thickness=None)
    panels = [("Image", rgb)]
    if truth is not None:
        panels.append(("Ground truth", colour_label_map(truth)))
        for value in np.unique(truth[truth > 0]):
            draw_contour(combined, truth == value, LABEL_TRUTH_COLOR)
    panels += [("Prediction", colour_label_map(predicted)), ("Overlay", combined)]

    figure = Figure(figsize=(3.2 * len(panels), 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for ax, (name, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    largest = max(int(predicted.max()), int(truth.max()) if truth is not None else 0)
    count = max(len(labels or ()), largest + 1)
    names = [
        labels[value] if labels and value < len(labels) else f"class {value}"
        for value in range(count)
    ]
    handles = [
        Patch(color=np.divide(class_colour(value), 255), label=names[value])
        for value in range(1, count)
    ]
    if truth is not None:
        edge = [withStroke(linewidth=3, foreground="black")]
        handles.append(Line2D([], [], color="white", path_effects=edge, label="truth"))
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 6),
        fontsize="small",
        frameon=False,
    )
    if title:
        figure.suptitle(title)
    return _save(figure, path)


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


# How each state of a search trial is drawn: (colour, line style).
TRIAL_STYLES = {"complete": ("tab:blue", "-"), "pruned": ("tab:gray", "--")}


def plot_trials(
    trials: Iterable[Mapping[str, object]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Save a two-panel figure of a hyperparameter search (``medseg tune``'s trials.png).

    Each trial is a mapping with "trial" (its number), "state" ("complete", "pruned", ...),
    "curve" (its validation Dice after each epoch, 0..1) and "val_dice" (its best, or "").
    Left: every trial's curve, pruned ones dashed. Right: each trial's best Dice by trial
    number and the best so far.
    """
    trials = list(trials)
    figure = Figure(figsize=(10, 4), layout="constrained")
    curve_ax, best_ax = figure.subplots(1, 2)
    for trial in trials:
        colour, style = TRIAL_STYLES.get(str(trial["state"]), ("tab:red", ":"))
        curve = [float(value) for value in trial["curve"]]
        curve_ax.plot(
            range(1, len(curve) + 1), curve, style, color=colour, marker="o", markersize=2
        )
    curve_ax.legend(
        handles=[
            Line2D([], [], color=c, linestyle=s, label=k) for k, (c, s) in TRIAL_STYLES.items()
        ]
    )
    curve_ax.set(title="Validation Dice by epoch", xlabel="epoch", ylabel="val Dice", ylim=(0, 1))
    scored = [(int(t["trial"]), _number(t["val_dice"]), str(t["state"])) for t in trials]
    scored = [(number, dice, state) for number, dice, state in scored if math.isfinite(dice)]
    for state, (colour, _) in TRIAL_STYLES.items():
        points = [(number, dice) for number, dice, kind in scored if kind == state]
        if points:
            best_ax.scatter(*zip(*points, strict=True), color=colour, s=14, label=state)
    complete = [(number, dice) for number, dice, state in scored if state == "complete"]
    if complete:  # drawn on to the last trial
        numbers, dice = zip(*complete, (max(number for number, _, _ in scored), -1.0), strict=True)
        best = np.maximum.accumulate(dice)
        best_ax.step(numbers, best, where="post", color="black", label="best so far")
    if best_ax.collections or best_ax.lines:
        best_ax.legend()
    best_ax.set(
        title="Best validation Dice by trial", xlabel="trial", ylabel="val Dice", ylim=(0, 1)
    )
    for ax in (curve_ax, best_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and trials
    if title:
        figure.suptitle(title)
    return _save(figure, path)


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
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]  # gray, as read_image(channels=1) returns it
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image of shape H x W x 3 (or gray H x W), got {image.dtype} "
            f"{image.shape}"
        )
    return image


def _is_label_map(mask: np.ndarray, labels: list[str] | tuple[str, ...] | None) -> bool:
    """An integer mask of class indices, rather than a binary mask (see `overlay`)."""
    mask = np.asarray(mask)
    if not np.issubdtype(mask.dtype, np.integer):
        return False  # bool or probabilities
    if labels is not None and len(labels) > 2:
        return True
    return bool(np.isin(mask, (0, 1, 255), invert=True).any())


def _as_label_map(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    mask = _of_shape(mask, shape, name)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{name} holds values outside 0..255, so it is no 8-bit label map")
    return mask.astype(np.uint8)


def _as_bool_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    mask = _of_shape(mask, shape, name)
    if np.issubdtype(mask.dtype, np.floating):
        return binarize(mask)
    return mask != 0


def _of_shape(mask: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {mask.shape} but the image is {tuple(shape)}; "
            "resize it to the image first"
        )
    return mask
