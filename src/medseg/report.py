"""An evaluation report as one self-contained HTML page: it opens offline, anywhere.

The page holds the summary table, histograms of the per-image metrics, and overlays of the
best, median and worst cases. Every picture is embedded as a PNG data URI, so the page can be
mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medseg.files import write_text
from medseg.visualize import overlay

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


def write_report(
    path: str | Path,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    cases: dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]],
    *,
    table: list[tuple[str, str]],
) -> Path:
    """Write the page to ``path``; ``cases`` maps best/median/worst to (id, image, truth, prediction)."""
    dice_of = {row["id"]: row["dice"] for row in rows}
    sections = [
        "<h2>Summary</h2>",
        _summary_table(summary, table),
        "<h2>Distributions over images</h2>",
        f'<img alt="metric histograms" src="{_png_uri(_histograms(rows))}">',
    ]
    for kind, examples in cases.items():
        sections.append(f"<h2>{kind.capitalize()} cases</h2>")
        for sample_id, image, truth, prediction in examples:
            picture = _side_by_side(image, truth, prediction)
            caption = f"{html.escape(sample_id)}: Dice {dice_of[sample_id]:.3f} (green: prediction, magenta: ground truth)"
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
    return f"<table><tr><th>metric</th><th>value</th></tr>{cells}</table><p>{summary['images']} images; lowest Dice: {worst}</p>"


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
    outlined = overlay(image, prediction, color=(0, 255, 0), contour_color=(0, 160, 0))
    outlined = overlay(outlined, truth, alpha=0.0, contour_color=(255, 0, 255))
    return np.concatenate([image, outlined], axis=1)


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
