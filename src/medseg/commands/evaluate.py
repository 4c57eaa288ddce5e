"""Scoring a checkpoint on a folder of image/mask pairs, each at its mask's own resolution.

`evaluate_folder` predicts with `medseg.prediction.predictor.Predictor`, feeds every prediction and its mask
to one `MetricAccumulator` (overlap and surface metrics), and writes ``per_image.csv`` (columns
`PER_IMAGE_COLUMNS`, then per-class columns for a multi-class checkpoint) and ``summary.json``
(`MetricAccumulator.summary`, the mean Dice's 95% bootstrap interval ``dice_ci95``
(`medseg.metrics.mean_interval`), and what was scored and how). Validation during training, at the
network's resolution, is `medseg.engine.validation.evaluate_loader`.

Masks are read as the checkpoint was trained: label maps of its classes (``data.labels``) for a
multi-class checkpoint; for a binary one, 0/1 label maps where the data's dataset.json declares
two classes, else binary masks by the half-range rule (`medseg.data.io.read_target`). Data whose
dataset.json declares other classes than the checkpoint's is refused before anything is scored.

A region of interest (ROI) restricts every metric to the pixels inside it, as DRIVE scores only
inside the fundus's field of view: one mask per image, ``<image stem>.png`` (any image extension,
foreground inside), in a ``fov/`` folder beside ``images/`` (used whenever it is there) or in the
folder given as ``roi``. For a binary checkpoint the summary adds the pixel AUC of the foreground
probabilities over every scored pixel (`medseg.metrics.PixelAUC`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.commands.report import class_rows, images_line, pick_cases, write_report
from medseg.config.choices import DEFAULT_TTA
from medseg.core.errors import MedsegError
from medseg.core.files import check_writable, refuse_existing, write_csv, write_text
from medseg.core.progress import progress_bar
from medseg.data.dataset import find_dataset_json, read_dataset_info
from medseg.data.folder import SPLIT_NAMES, Sample, check_pair, find_pairs, resolve_split_folder
from medseg.data.io import IMAGE_EXTENSIONS, read_image, read_mask, read_target
from medseg.engine.runtime import releases_process_group
from medseg.metrics import (
    PER_IMAGE_COLUMNS,
    MetricAccumulator,
    PixelAUC,
    foreground_classes,
    mean_interval,
)
from medseg.prediction.predictor import Predictor
from medseg.prediction.shards import Shards

__all__ = [
    "BINARY_ONLY",
    "PER_CLASS_TABLE",
    "PER_IMAGE_COLUMNS",
    "SUMMARY_TABLE",
    "evaluate_folder",
    "format_summary",
    "score_pair",
    "score_samples",
    "scored_name",
    "scored_summary",
]

# (label, summary key): the rows of the table `medseg evaluate` prints and the report shows.
SUMMARY_TABLE = (
    ("Dice (mean over images)", "dice"),
    ("Dice (median)", "dice_median"),
    ("Dice (pooled)", "dice_pooled"),
    ("Jaccard / IoU (mean)", "iou"),
    ("Jaccard (median)", "iou_median"),
    ("Thresholded Jaccard (ISIC 2018, <0.65 → 0)", "thresholded_jaccard"),
    ("Pixel accuracy (mean)", "accuracy"),
    ("Sensitivity (mean)", "sensitivity"),
    ("Specificity (mean)", "specificity"),
    ("Pixel AUC (all scored pixels)", "auc"),  # binary checkpoints only
    ("HD95, pixels (mean)", "hd95"),
    ("ASSD, pixels (mean)", "assd"),
)
# Rows for a binary (lesion) task only: ISIC 2018's challenge score, and the pixel AUC of the
# foreground probability. A label map's table shows the means over its classes, and each class.
BINARY_ONLY = ("thresholded_jaccard", "auc")
# (heading, key of summary["per_class"][class]): the columns of the per-class table that
# `format_summary` prints and the report shows for a multi-class summary.
ROI_FOLDER = "fov"  # beside images/: used by evaluate_folder whenever it is there
PER_CLASS_TABLE = (
    ("Dice", "dice"),
    ("IoU", "iou"),
    ("HD95", "hd95"),
    ("ASSD", "assd"),
    ("Sensitivity", "sensitivity"),
    ("Specificity", "specificity"),
)


@releases_process_group
def evaluate_folder(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    tta: str | None = None,
    postprocess: bool = False,
    threshold: float | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    report: str | Path | None = None,
    compile: bool = False,
    roi: str | Path | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on ``data`` (a split folder, or a root whose test/ is used).

    Predictions are made at each image's own size and compared with its mask there, a pixel
    being foreground above ``threshold`` (default: the checkpoint's ``train.threshold``) for a
    binary checkpoint, of its arg-max class for a multi-class one. Writes ``per_image.csv`` and
    ``summary.json`` into ``out`` and returns the summary, whose ``data`` is the folder actually
    scored and ``tta`` the mode that ran; a multi-class summary adds ``per_class``,
    ``mean_foreground_dice`` and ``labels`` (the checkpoint's class names). With ``report``,
    also an offline HTML page (``report/index.html``, see `medseg.commands.report`).

    ``roi``: a folder of region-of-interest masks, one per image (module docstring); None uses
    the scored folder's ``fov/`` when it has one. The summary's ``roi`` is the folder used (None
    without), and a binary checkpoint's ``auc`` the pixel AUC (left out when the scored pixels'
    truth holds one class only, where it is undefined).

    Under torchrun each rank scores its share of the pairs (`Shards`); rank 0 joins the scores
    in the pairs' order, writes the results, and every rank returns the summary.
    """
    out = Path(out)
    _refuse_earlier(out, overwrite=overwrite)
    check_writable(out)
    folder = resolve_split_folder(data, preferred="test")
    predictor = Predictor.from_checkpoint(
        checkpoint, device=device, tta=DEFAULT_TTA if tta is None else tta,
        postprocess=postprocess, compile=compile, threshold=threshold, precision=precision,
    )  # fmt: skip
    labels_read = target_labels(checkpoint, predictor, folder)
    pairs = find_pairs(folder, mask_suffix=predictor.config.data.mask_suffix)
    roi_folder = _roi_folder(folder, roi)
    rois = _roi_files(pairs, roi_folder) if roi_folder is not None else None
    reading = {"channels": predictor.config.data.channels, "labels": labels_read}
    shards = Shards.join()
    scores = _score_pairs(
        predictor, shards.share(pairs), None if rois is None else shards.share(rois),
        batch_size=batch_size, progress=progress and shards.is_main, **reading,
    )  # fmt: skip
    parts = shards.gather(scores)  # every rank takes part; rank 0 receives
    where = {"checkpoint": str(checkpoint), "data": str(folder), "roi": roi_folder}
    return shards.main_first(
        lambda: _write_results(
            parts, predictor, where, out=out, report=report, pairs=pairs, reading=reading
        )
    )


def _write_results(
    parts: list[tuple[MetricAccumulator, PixelAUC | None]], predictor: Predictor, where: dict,
    *, out: Path, report: str | Path | None, pairs: list[Sample], reading: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Join each rank's scores, in rank order (the order of the pairs), and write per_image.csv,
    summary.json and the report; returns the summary."""
    (metrics, auc), *others = parts
    for other_metrics, other_auc in others:
        metrics.merge(other_metrics)
        if auc is not None:
            auc.merge(other_auc)
    summary = _summary(metrics, auc, predictor, **where)
    rows = metrics.rows()
    write_csv(out / "per_image.csv", rows, metrics.columns())
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    if report is not None:
        _write_report(Path(report) / "index.html", summary, rows, pairs, predictor, **reading)
    return summary


def _refuse_earlier(out: Path, *, overwrite: bool) -> None:
    earlier = [out / name for name in ("summary.json", "per_image.csv") if (out / name).exists()]
    refuse_existing(
        earlier, what="an evaluation", overwrite=overwrite,
        advice="choose another --out or pass --overwrite",
    )  # fmt: skip


def scored_name(data: str | Path) -> str:
    """What an evaluation of ``data`` scores, as a name for its default folder: the split
    folder `evaluate_folder` scores with its root's name ("jsrt-test" for jsrt/ or jsrt/test);
    any other folder (an nnU-Net root), its own name."""
    path = Path(data)
    with contextlib.suppress(MedsegError):  # not a folder of pairs: evaluate says why
        path = resolve_split_folder(path, preferred="test")
    path = path.absolute()
    if path.name in SPLIT_NAMES and path.parent.name:
        return f"{path.parent.name}-{path.name}"
    return path.name or "data"


def _summary(
    metrics: MetricAccumulator, auc: PixelAUC | None, predictor: Predictor, *, checkpoint: str,
    data: str, roi: Path | None,
) -> dict[str, Any]:  # fmt: skip
    """The summary.json of an evaluation: the scores, then where and how they were made."""
    summary = scored_summary(metrics, auc)
    summary.update(
        {"checkpoint": checkpoint, "data": data, "tta": predictor.tta,
         "postprocess": predictor.postprocess, "roi": None if roi is None else str(roi)}
    )  # fmt: skip
    if metrics.multi_class:  # binary summaries keep the keys they always had
        summary["labels"] = list(predictor.config.data.labels)
    return summary


def scored_summary(metrics: MetricAccumulator, auc: PixelAUC | None) -> dict[str, Any]:
    """The scores of an evaluation: `MetricAccumulator.summary`, the mean Dice's 95% bootstrap
    interval ``dice_ci95`` (`medseg.metrics.mean_interval`), and a binary model's pixel AUC."""
    summary = metrics.summary()
    summary["dice_ci95"] = list(mean_interval(metrics.per_image()["dice"]))
    if auc is not None and auc.value() is not None:
        summary["auc"] = auc.value()
    return summary


def target_labels(checkpoint, predictor: Predictor, folder: Path) -> tuple[str, ...]:
    """The class names to read the masks of ``folder`` with (`medseg.data.io.read_target`).

    Refuses data whose dataset.json declares classes other than the checkpoint's; two binary
    class lists (no names, or two names) only differ in their names and are both read as 0/1.
    """
    trained = tuple(predictor.config.data.labels)
    multi_class = predictor.config.model.num_classes > 1
    info = read_dataset_info(folder)
    declared = info.labels if info is not None else ()
    if info is not None and declared != trained and (multi_class or len(declared) > 2):
        raise MedsegError(
            f"{find_dataset_json(folder)} declares the classes {list(declared)} but {checkpoint} "
            f"was trained on {list(trained) if trained else 'binary masks (no class names)'}; "
            f"score it on data with the classes it knows"
        )
    return trained if multi_class else declared


def _roi_folder(folder: Path, roi: str | Path | None) -> Path | None:
    """The folder of ROI masks: ``roi`` (which must exist), else ``folder/fov`` if present."""
    if roi is None:
        default = folder / ROI_FOLDER
        return default if default.is_dir() else None
    roi = Path(roi)
    if not roi.is_dir():
        raise MedsegError(
            f"ROI folder not found: {roi}; pass --roi a folder holding one mask per image, "
            f"named as the image (e.g. {roi}/<id>.png)"
        )
    return roi


def _roi_files(pairs: list[Sample], folder: Path) -> list[Path]:
    """Each pair's ROI mask ``folder/<image stem>.<image extension>``; a missing one is named
    before anything is predicted."""
    files = []
    for sample in pairs:
        stem = sample.image.stem
        found = [
            folder / f"{stem}{ext}"
            for ext in IMAGE_EXTENSIONS
            if (folder / f"{stem}{ext}").is_file()
        ]
        if not found:
            raise MedsegError(
                f"no ROI mask for {sample.image}: expected {folder / stem}.png (255 inside); "
                f"add it, or remove {folder} (or pass --roi another folder) to score every pixel"
            )
        files.append(found[0])
    return files


def _read_roi(path: Path, image_shape: tuple[int, ...], image: Path) -> np.ndarray:
    """A bool (H, W) ROI mask, refused when its size is not its image's."""
    roi = read_mask(path)
    if roi.shape != tuple(image_shape[:2]):
        raise MedsegError(
            f"ROI {path} is {roi.shape[1]}×{roi.shape[0]} but its image {image} is "
            f"{image_shape[1]}×{image_shape[0]}; save the ROI at the image's size"
        )
    return roi


def _score_pairs(
    predictor: Predictor,
    pairs: list[Sample],
    rois: list[Path] | None,
    *,
    batch_size: int,
    progress: bool,
    channels: int,
    labels: tuple[str, ...],
) -> tuple[MetricAccumulator, PixelAUC | None]:
    """Predict the pairs in chunks of ``batch_size`` and accumulate every image's metrics,
    inside its ROI (``rois``, one per pair, or None), and for a binary checkpoint the pixel AUC.
    """
    classes = foreground_classes(predictor.config.data.labels)
    metrics = MetricAccumulator(classes=classes, surface=True)
    auc = None if predictor.multi_class else PixelAUC()
    # A bar on a terminal, a line now and then in a log (`progress_bar`), as predict shows.
    batches = range(0, len(pairs), batch_size)
    for start in progress_bar(batches, desc="evaluating", enabled=progress):
        chunk = pairs[start : start + batch_size]
        images, masks = _read_pairs(chunk, channels=channels, labels=labels)
        probabilities = predictor.probabilities(images)
        for index, (sample, mask) in enumerate(zip(chunk, masks, strict=True)):
            roi = None if rois is None else _read_roi(rois[start + index], mask.shape, sample.image)
            metrics.add(sample.id, predictor.to_mask(probabilities[index]), mask, roi=roi)
            if auc is not None:
                auc.add(probabilities[index], mask.astype(bool), roi=roi)
    return metrics, auc


def score_samples(
    predictor: Predictor, pairs: list[Sample], *, labels: tuple[str, ...], batch_size: int = 16,
    progress: bool = False,
) -> tuple[MetricAccumulator, PixelAUC | None]:  # fmt: skip
    """Predict ``pairs`` and score each at its mask's own size, as `evaluate_folder` does (no
    ROI): the per-image metrics and, for a binary checkpoint, the pixel AUC. ``labels``: what
    to read the masks with (`target_labels`)."""
    reading = {"channels": predictor.config.data.channels, "labels": labels}
    return _score_pairs(predictor, pairs, None, batch_size=batch_size, progress=progress, **reading)


def score_pair(
    sample_id: str, prediction: np.ndarray, truth: np.ndarray, *, labels: Sequence[str] = ()
) -> dict[str, Any]:
    """One row of per_image.csv for an (H, W) prediction and truth: bool or 0/1 masks, or label
    maps of the classes ``labels`` (``config.data.labels``, background first).

    "dice", "iou" and the other unsuffixed metrics are the means over the foreground classes;
    with more than two ``labels``, each class's own values follow as ``dice_<class>`` etc.
    """
    metrics = MetricAccumulator(classes=foreground_classes(labels), surface=True)
    metrics.add(sample_id, prediction, truth)
    return metrics.rows()[0]


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a summary, as printed by ``medseg evaluate``; a multi-class one
    (with ``per_class``) also gets a table with one row per class and their mean."""
    rows = _table_rows(summary)
    heading = "metric"
    if "per_class" in summary:
        heading = f"metric (mean over the {len(summary['per_class'])} foreground classes)"
    width = max(len(heading), *(len(label) for label, _ in rows))
    lines = [f"{heading:<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{label:<{width}}  {summary[key]:.4f}" for label, key in rows]
    if "per_class" in summary:
        lines += ["", *_class_table(summary)]
    worst = ", ".join(f"{case['id']} ({case['dice']:.3f})" for case in summary["worst"])
    lines.append(f"{images_line(summary)}; lowest Dice: {worst}")
    if summary.get("roi"):
        lines.append(f"scored inside the ROI masks in {summary['roi']}")
    return "\n".join(lines)


def _table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of `SUMMARY_TABLE` the summary holds that fit its task: a multi-class summary
    (with ``per_class``) leaves out the `BINARY_ONLY` rows."""
    multi_class = "per_class" in summary
    return [
        (label, key)
        for label, key in SUMMARY_TABLE
        if key in summary and not (multi_class and key in BINARY_ONLY)
    ]


def _class_table(summary: dict[str, Any]) -> list[str]:
    rows = class_rows(summary)
    width = max(len("class"), *(len(name) for name, _ in rows))
    cell = max(len(heading) for heading, _ in PER_CLASS_TABLE)
    header = "  ".join(f"{heading:>{cell}}" for heading, _ in PER_CLASS_TABLE)
    lines = [
        f"{'class':<{width}}  {header}",
        f"{'-' * width}  " + "  ".join(["-" * cell] * len(PER_CLASS_TABLE)),
    ]
    for name, scores in rows:
        cells = "  ".join(f"{scores[key]:>{cell}.4f}" for _, key in PER_CLASS_TABLE)
        lines.append(f"{name:<{width}}  {cells}")
    return lines


def _write_report(
    path: Path, summary, rows, pairs: list[Sample], predictor, *, channels: int, labels
) -> None:
    """Predict again only the best, median and worst pairs, and write the HTML page."""
    cases = {}
    for kind, indices in pick_cases(rows).items():
        chosen = [pairs[i] for i in indices]
        images, masks = _read_pairs(chosen, channels=channels, labels=labels)
        predictions = predictor.masks(images)
        cases[kind] = [
            (sample.id, image, mask, prediction)
            for sample, image, mask, prediction in zip(
                chosen, images, masks, predictions, strict=True
            )
        ]
    write_report(
        path, summary, rows, cases, table=_table_rows(summary),
        class_table=list(PER_CLASS_TABLE), labels=predictor.config.data.labels,
    )  # fmt: skip


def _read_pairs(
    samples: list[Sample], *, channels: int, labels: Sequence[str]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 (H, W, channels) images and uint8 (H, W) class values (`read_target`); a pair of
    two sizes fails with its names."""
    images, masks = [], []
    for sample in samples:
        image = read_image(sample.image, channels=channels)
        mask = read_target(sample.mask, labels)
        if image.shape[:2] != mask.shape:
            check_pair(sample)
        images.append(image)
        masks.append(mask)
    return images, masks
