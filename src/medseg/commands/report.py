"""An evaluation report as one self-contained HTML page: it opens offline, anywhere.

The page holds the summary table (and, for label maps, a table of the classes), histograms of
the per-image metrics, and overlays of the best, median and worst cases. Every picture is
embedded as a PNG data URI, so the page can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medseg.core.files import write_text
from medseg.drawing import class_colour, overlay

HISTOGRAMS = (
    ("dice", "Dice", (0, 1)),
    ("iou", "Jaccard (IoU)", (0, 1)),
    ("hd95", "HD95 (pixels)", None),
    ("assd", "ASSD (pixels)", None),
)


def pick_cases(rows: list[dict[str, Any]], *, per_kind: int = 2) -> dict[str, list[int]]:
    """Indices of the best, median and worst images by Dice."""
    order = [int(i) for i in np.argsort([row["dice"] for row in rows], kind="stable")]
    middle = max(0, len(order) // 2 - per_kind // 2)
    return {
        "best": order[::-1][:per_kind],
        "median": order[middle : middle + per_kind],
        "worst": order[:per_kind],
    }


def images_line(summary: dict[str, Any]) -> str:
    """The line under the summary table, the scale of the test: e.g. ``150 images (mean Dice
    0.858, 95% bootstrap interval 0.826-0.882)``; a summary.json from before the interval gives
    the count alone."""
    line = f"{summary['images']} images"
    if "dice_ci95" in summary:
        low, high = summary["dice_ci95"]
        line += f" (mean Dice {summary['dice']:.3f}, 95% bootstrap interval {low:.3f}-{high:.3f})"
    return line


def class_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, scores) of each class of a multi-class summary, then ("mean", the summary).

    The summary's own Dice, IoU, ... are the means over the classes, as every class is scored
    on every image (`medseg.metrics`), so the mean row needs no arithmetic of its own.
    """
    return [*summary["per_class"].items(), ("mean", summary)]


def write_report(
    path: str | Path,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    cases: dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]],
    *,
    table: list[tuple[str, str]],
    class_table: Sequence[tuple[str, str]] = (),
    labels: Sequence[str] = (),
) -> Path:
    """Write the page to ``path``; ``cases`` maps best/median/worst to (id, image, truth, prediction).

    ``table`` lists (label, summary key) rows; for a summary with ``per_class``, ``class_table``
    lists (heading, key) columns of a table with one row per class. ``labels`` (class names by
    value, ``config.data.labels``) with more than two names marks truth and prediction as label
    maps, drawn in class colours (`medseg.drawing.class_colour`).
    """
    dice_of = {row["id"]: row["dice"] for row in rows}
    label_maps = len(labels) > 2
    sections = ["<h2>Summary</h2>", _summary_table(summary, table)]
    if "per_class" in summary and class_table:
        sections += ["<h2>Per class</h2>", _class_table(summary, class_table)]
    sections += [
        "<h2>Distributions over images</h2>",
        f'<img alt="metric histograms" src="{_png_uri(_histograms(rows))}">',
    ]
    legend = _legend(labels) if label_maps else "(green: prediction, magenta: ground truth)"
    for kind, examples in cases.items():
        sections.append(f"<h2>{kind.capitalize()} cases</h2>")
        for sample_id, image, truth, prediction in examples:
            if label_maps:
                picture = _three_panels(image, truth, prediction)
            else:
                picture = _side_by_side(image, truth, prediction)
            caption = f"{html.escape(sample_id)}: Dice {dice_of[sample_id]:.3f} {legend}"
            sections.append(
                f'<figure><img alt="{html.escape(sample_id)}" src="{_png_uri(picture)}"><figcaption>{caption}</figcaption></figure>'
            )
    page = _PAGE.format(
        title=html.escape(f"medseg evaluation: {summary.get('data', '')}"),
        subtitle=html.escape(
            f"checkpoint {summary.get('checkpoint', '')}; TTA {summary.get('tta')}; post-processing {summary.get('postprocess')}"
        ),
        body="\n".join(sections),
    )
    write_text(path, page)
    return Path(path)


def _summary_table(summary: dict[str, Any], table: list[tuple[str, str]]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{summary[key]:.4f}</td></tr>" for label, key in table
    )
    worst = ", ".join(
        f"{html.escape(case['id'])} ({case['dice']:.3f})" for case in summary["worst"]
    )
    images = html.escape(images_line(summary))
    return f"<table><tr><th>metric</th><th>value</th></tr>{cells}</table><p>{images}; lowest Dice: {worst}</p>"


def _class_table(summary: dict[str, Any], columns: Sequence[tuple[str, str]]) -> str:
    headings = "".join(f"<th>{html.escape(heading)}</th>" for heading, _ in columns)
    cells = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{scores[key]:.4f}</td>" for _, key in columns)
        + "</tr>"
        for name, scores in class_rows(summary)
    )
    return f"<table><tr><th>class</th>{headings}</tr>{cells}</table>"


def _legend(labels: Sequence[str]) -> str:
    """HTML: "left to right: ..." and a colour swatch before each foreground class's name."""
    swatches = ", ".join(
        f'<span style="color:rgb{class_colour(value)}">&#9632;</span> {html.escape(name)}'
        for value, name in enumerate(labels)
        if value > 0
    )
    return f"(left to right: image, ground truth, prediction; {swatches})"


def _histograms(rows: list[dict[str, Any]]) -> Figure:
    figure = Figure(figsize=(12, 3), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (key, label, limits) in zip(
        figure.subplots(1, len(HISTOGRAMS)), HISTOGRAMS, strict=True
    ):
        axes.hist([row[key] for row in rows], bins=20, range=limits, color="#4477aa")
        axes.set_xlabel(label)
        axes.set_ylabel("images")
    return figure


def _side_by_side(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    rgb = _rgb(image)
    outlined = overlay(rgb, prediction, color=(0, 255, 0), contour_color=(0, 160, 0))
    outlined = overlay(outlined, truth, alpha=0.0, contour_color=(255, 0, 255))
    return np.concatenate([rgb, outlined], axis=1)


def _rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) image as it is; a gray (H, W) or (H, W, 1) one in three channels, so
    it sits beside its colour overlays."""
    gray = image if image.ndim == 2 else image[..., 0] if image.shape[2] == 1 else None
    return image if gray is None else np.repeat(gray[..., None], 3, axis=2)


def _three_panels(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Image, ground truth and prediction side by side, the label maps in class colours."""
    rgb = _rgb(image)
    # No labels: overlay would add a legend strip below each panel, and the page has its own.
    # A map holding only class 1 then reads as binary, so it is given class 1's colour.
    one = class_colour(1)
    panels = [overlay(rgb, mask, color=one, contour_color=one) for mask in (truth, prediction)]
    return np.concatenate([rgb, *panels], axis=1)


def _png_uri(picture: Figure | np.ndarray) -> str:
    buffer = io.BytesIO()
    if isinstance(picture, Figure):
        picture.savefig(buffer, format="png", dpi=90)
    else:
        Image.fromarray(picture).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}img{{max-width:100%}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head>
<body><h1>{title}</h1><p>{subtitle}</p>
{body}
</body></html>
"""
