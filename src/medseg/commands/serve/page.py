"""The page (Gradio Blocks): drop in an image, see each structure outlined in its colour.

Element ids the browser test (and any script driving the page) relies on: ``upload`` (the file
control), ``overlay`` (the image with the classes drawn), ``legend`` (class names and colours),
``threshold`` and ``opacity`` (sliders), ``tta``, ``postprocess``, ``probability`` (a binary
model's foreground probability), ``areas``, ``download-mask`` and ``download-probabilities``,
``model-card``. The network runs when an image or the TTA mode changes; the threshold,
post-processing and opacity redraw from the probabilities it left, without running it again.
Imported once gradio is known to be there.
"""

from __future__ import annotations

import html
import uuid
from pathlib import Path

import gradio as gr

from medseg.commands.serve.model import Segmentation, ServedModel
from medseg.config.choices import DEFAULT_TTA, TTA_MODES
from medseg.core.errors import MedsegError
from medseg.core.files import write_bytes
from medseg.data.io import IMAGE_EXTENSIONS
from medseg.drawing import PREDICTION_COLOR, class_colour, overlay
from medseg.prediction.outputs import probability_pixels

OPACITY = 0.4  # the fill's opacity over the image, as `medseg predict --overlay` draws it
FILE_TYPES = [*IMAGE_EXTENSIONS, ".dcm", ".dicom"]  # and extensionless DICOM, read by its marker
NOTICE = (
    "For research only: not a medical device. Images are segmented on this computer and "
    "kept only in a temporary folder while the page uses them."
)


def build_page(
    served: ServedModel, *, card: str, examples: list[Path], downloads: Path
) -> gr.Blocks:
    """The Blocks of the page; files offered for download are written under ``downloads``."""
    binary = not served.multi_class
    # Files Gradio keeps (uploads, pictures, downloads) are deleted after 15 minutes.
    with gr.Blocks(title="medseg", analytics_enabled=False, delete_cache=(300, 900)) as page:
        state = gr.State(None, time_to_live=900)  # as long as its files are kept
        with gr.Sidebar(label="Model card", elem_id="model-card"):
            gr.Markdown(card)
        gr.Markdown(f"## medseg: {_task(served)}\n\n{NOTICE}")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image: PNG, JPEG, TIFF (8 or 16 bits), DICOM",
                    file_types=FILE_TYPES,
                    elem_id="upload",
                )
                controls = _controls(served, binary)
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[upload],
                                label="Validation images of this model")  # fmt: skip
            with gr.Column(scale=2):
                shown = _results(served, binary)
        tta, threshold, opacity, postprocess = controls
        draw = {
            "fn": lambda *values: draw_result(served, downloads, *values),
            "inputs": [state, threshold, opacity, postprocess],
            "outputs": shown,
            "trigger_mode": "always_last",
        }
        run = {"fn": lambda path, mode: run_model(served, path, mode), "inputs": [upload, tta]}
        upload.change(**run, outputs=[state]).success(**draw)
        tta.change(**run, outputs=[state]).success(**draw)
        for control in (threshold, opacity, postprocess):
            control.change(**draw)
    return page


def _task(served: ServedModel) -> str:
    if served.multi_class:
        return f"{len(served.class_names) - 1} structures ({', '.join(served.class_names[1:])})"
    return f"{served.class_names[1]} (binary)"


def _controls(served: ServedModel, binary: bool) -> tuple:
    tta = gr.Radio(list(TTA_MODES), value=DEFAULT_TTA, label="Test-time augmentation",
                   info=f"auto runs {served.predictor.tta} for this model", elem_id="tta")  # fmt: skip
    threshold = gr.Slider(
        0.01, 0.99, value=served.predictor.threshold if binary else 0.5, step=0.01,
        label="Threshold (foreground probability)", visible=binary, elem_id="threshold",
    )  # fmt: skip
    opacity = gr.Slider(0, 1, value=OPACITY, step=0.05, label="Opacity of the fill (0: outlines)",
                        elem_id="opacity")  # fmt: skip
    postprocess = gr.Checkbox(
        False, label="Post-process: keep each class's largest region, holes filled",
        elem_id="postprocess",
    )  # fmt: skip
    return tta, threshold, opacity, postprocess


def _results(served: ServedModel, binary: bool) -> list:
    image = gr.Image(
        label="Segmentation", format="png", interactive=False, height=360, elem_id="overlay"
    )
    gr.HTML(legend_html(served), elem_id="legend")  # fixed: the classes do not change
    areas = gr.Markdown(elem_id="areas")
    probability = gr.Image(label="Foreground probability", format="png", interactive=False,
                           height=200, visible=binary, elem_id="probability")  # fmt: skip
    with gr.Row():
        mask = gr.DownloadButton("Mask PNG (as medseg predict writes it)", interactive=False,
                                 elem_id="download-mask")  # fmt: skip
        probabilities = gr.DownloadButton(
            "Probabilities (" + ("PNG" if binary else "NPZ") + ")", interactive=False,
            elem_id="download-probabilities",
        )  # fmt: skip
    return [image, areas, probability, mask, probabilities]


def legend_html(served: ServedModel) -> str:
    """Each foreground class's name beside a square of the colour it is drawn in."""
    entries = []
    for value, name in enumerate(served.class_names):
        if value == 0:
            continue
        red, green, blue = class_colour(value) if served.multi_class else PREDICTION_COLOR
        entries.append(
            f'<span class="medseg-class" data-value="{value}" style="margin-right:1.2em">'
            f'<span style="display:inline-block;width:0.9em;height:0.9em;margin-right:0.35em;'
            f'vertical-align:middle;background:rgb({red},{green},{blue})"></span>'
            f"{html.escape(name)}</span>"
        )
    return f'<div class="medseg-legend">{"".join(entries)}</div>'


def run_model(served: ServedModel, path: str | None, tta: str) -> Segmentation | None:
    """The network on the uploaded file (in Gradio's upload folder); a problem becomes the
    page's error message, in one line."""
    if not path:
        return None
    try:
        return served.segment(Path(path), tta=tta)
    except MedsegError as error:
        raise gr.Error(" ".join(str(error).replace(str(path), Path(path).name).split())) from None


def draw_result(
    served: ServedModel, downloads: Path, segmentation: Segmentation | None, threshold: float,
    opacity: float, postprocess: bool,
) -> list:  # fmt: skip
    """What the result column shows for ``segmentation`` at these settings."""
    if segmentation is None:
        idle = gr.DownloadButton(value=None, interactive=False)
        return [None, "", None, idle, idle]
    try:
        mask = served.mask(
            segmentation, threshold=None if served.multi_class else threshold,
            postprocess=postprocess,
        )  # fmt: skip
    except MedsegError as error:
        raise gr.Error(str(error)) from None
    picture = overlay(segmentation.image, mask, served.class_names if served.multi_class else None,
                      alpha=opacity, legend=False)  # fmt: skip
    folder = downloads / uuid.uuid4().hex
    mask_path = folder / segmentation.mask_name
    write_bytes(mask_path, served.mask_png(mask))
    probability_path = folder / segmentation.probability_name
    write_bytes(probability_path, served.probability_file(segmentation))
    probability = None if served.multi_class else probability_pixels(segmentation.probability)
    return [
        picture,
        areas_markdown(served.areas(segmentation, mask), segmentation.spacing),
        probability,
        gr.DownloadButton(value=str(mask_path), interactive=True),
        gr.DownloadButton(value=str(probability_path), interactive=True),
    ]


def areas_markdown(areas: list[dict], spacing: tuple[float, float] | None) -> str:
    """A table of each class's area, in pixels and (with a pixel spacing) in mm²."""
    rows = ["| class | pixels | mm² |", "|---|---:|---:|"]
    for area in areas:
        mm2 = "" if area["mm2"] is None else f"{area['mm2']:,.1f}"
        rows.append(f"| {html.escape(area['class'])} | {area['pixels']:,} | {mm2} |")
    note = (
        f"Pixel spacing {spacing[0]:g} × {spacing[1]:g} mm (the file's PixelSpacing)."
        if spacing
        else "The file gives no pixel spacing: areas in pixels only."
    )
    return "\n".join(rows) + f"\n\n{note}"
