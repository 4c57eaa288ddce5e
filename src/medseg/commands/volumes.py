"""NIfTI volumes: segment them slice by slice, and score label volumes in 3D (millimetres).

``medseg predict --input X.nii.gz`` (or a folder of nnU-Net ``<case>_0000.nii.gz``,
``_0001``... files, grouped by case into channels) writes ``OUT/<case>.nii.gz``: a uint8 label
volume with the input's affine and header, as ITK-SNAP and 3D Slicer read it. Each channel is
windowed per volume exactly as the training slices were (`medseg.data.nnunet.window`).

``medseg evaluate --data NNUNET_ROOT`` predicts imagesTs/ and scores each volume against
labelsTs/: per class Dice and HD95 in millimetres (voxel spacing from the header), plus the
mean Dice over the 2D slices, into ``per_volume.csv`` and ``summary.json``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.commands.evaluate import target_labels
from medseg.config.choices import DEFAULT_TTA
from medseg.core.errors import MedsegError
from medseg.core.files import check_writable, refuse_existing, write_bytes, write_csv, write_text
from medseg.core.progress import progress_bar
from medseg.data.layout import nifti_ending
from medseg.data.nnunet import (
    SLICE_AXIS,
    find_cases,
    nibabel,
    read_labels,
    read_spec,
    read_volume,
    volume_slices,
)
from medseg.formats.source import resolve_source
from medseg.metrics import MetricAccumulator, foreground_classes, surface_distances
from medseg.prediction.outputs import PredictionReport, claim_output, prediction_record
from medseg.prediction.predictor import Predictor

VOLUME_COLUMNS = ("case", "class", "dice", "hd95_mm", "truth_voxels", "predicted_voxels")


def collect_volumes(source: str | Path, channels: int) -> dict[str, list[Path]]:
    """``{case: [channel files]}`` of a NIfTI file or a folder of them; each case must have the
    ``channels`` files ``<case>_0000`` ... the checkpoint takes (a lone channel needs no suffix)."""
    source = Path(source)
    if not source.exists():
        raise MedsegError(f"input not found: {source}")
    paths = [source] if source.is_file() else sorted(source.iterdir())
    by_case: dict[str, dict[int, Path]] = {}
    for path in paths:
        ending = nifti_ending(path)
        if ending is None or path.name.startswith("."):
            continue
        stem = path.name[: -len(ending)]
        case, _, channel = stem.rpartition("_")
        if not (case and len(channel) == 4 and channel.isdigit()):
            case, channel = stem, "0000"
        by_case.setdefault(case, {})[int(channel)] = path
    if not by_case:
        raise MedsegError(f"no .nii.gz or .nii volumes in {source}")
    for case, files in by_case.items():
        # One gray volume may feed an RGB checkpoint: `to_channels` repeats it into three.
        if sorted(files) != list(range(channels)) and not (sorted(files) == [0] and channels == 3):
            found = ", ".join(path.name for path in files.values())
            raise MedsegError(
                f"case {case}: the checkpoint takes {channels} channels, "
                f"{case}_0000 to {case}_{channels - 1:04d}, but {source} holds {found}; "
                f"add the missing channel files"
            )
    return {case: [files[c] for c in sorted(files)] for case, files in by_case.items()}


def segment_volume(predictor: Predictor, volume: np.ndarray, *, batch_size: int) -> np.ndarray:
    """uint8 (X, Y, Z) class values of a windowed uint8 (X, Y, Z, C) volume, slice by slice."""
    slices = volume_slices(volume)
    masks = []
    for start in range(0, len(slices), batch_size):
        masks += predictor.masks(slices[start : start + batch_size])
    return np.stack(masks, axis=SLICE_AXIS).astype(np.uint8)


def write_label_volume(path: Path, labels: np.ndarray, reference) -> None:
    """``labels`` as a gzipped NIfTI file on ``reference``'s grid (its affine and header), uint8."""
    nib = nibabel()
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(labels, reference.affine, header)
    # Class values as stored: a scaling inherited from the image's header would alter them.
    image.header.set_slope_inter(1, 0)
    write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def predict_volumes(
    checkpoint: str | Path,
    source: str | Path,
    output: str | Path,
    *,
    batch_size: int = 16,
    tta: str = DEFAULT_TTA,
    postprocess: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    compile: bool = False,
    threshold: float | None = None,
) -> PredictionReport:
    """Segment NIfTI volumes into ``output/<case>.nii.gz``; earlier results are kept and
    skipped, or refused when another checkpoint made them, as `medseg.commands.predict.predict`
    does. A volume that cannot be read (truncated, 4D, 2D) is listed in the report's
    ``failed`` with its reason, and the others are segmented."""
    output = Path(output)
    nibabel()  # before the seconds spent loading the checkpoint
    check_writable(output)
    predictor = Predictor.from_checkpoint(
        checkpoint, device=device, tta=tta, postprocess=postprocess, compile=compile,
        threshold=threshold, precision=precision,
    )  # fmt: skip
    cases = collect_volumes(source, predictor.config.data.channels)
    record = prediction_record(resolve_source(checkpoint), predictor)
    report = PredictionReport()
    first_files = {paths[0]: case for case, paths in cases.items()}
    names = {path: [f"{case}.nii.gz"] for path, case in first_files.items()}
    sources = {
        f"{case}.nii.gz": [str(p.absolute()) for p in paths] for case, paths in cases.items()
    }
    pending = claim_output(
        output, names, record, overwrite=overwrite, report=report, sources=sources
    )
    for path in progress_bar(pending, desc="predicting volumes", enabled=progress):
        case = first_files[path]
        try:
            volume, image = read_volume(cases[case], case)
        except MedsegError as error:  # listed; the other volumes are still segmented
            report.failed.append(str(error))
            continue
        labels = segment_volume(predictor, volume, batch_size=batch_size)
        write_label_volume(output / f"{case}.nii.gz", labels, image)
        report.written.append(output / f"{case}.nii.gz")
    return report


# --- 3D scores --------------------------------------------------------------------------------


def score_volume(
    predicted: np.ndarray, truth: np.ndarray, spacing, *, classes: int
) -> list[dict[str, float]]:
    """Per foreground class 1..``classes`` of two (X, Y, Z) label volumes: Dice (1 when both
    lack the class) and HD95 in the unit of ``spacing`` (mm per voxel along each axis; 0 when
    both lack it, the volume's diagonal when one does, as `medseg.metrics` scores 2D masks)."""
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ")
    scores = []
    for value in range(1, classes + 1):
        pred, target = predicted == value, truth == value
        total = int(pred.sum()) + int(target.sum())
        dice = 2 * int((pred & target).sum()) / total if total else 1.0
        hd95, _ = surface_distances(pred, target, spacing=tuple(float(s) for s in spacing))
        scores.append(
            {
                "dice": dice,
                "hd95_mm": hd95,
                "truth_voxels": int(target.sum()),
                "predicted_voxels": int(pred.sum()),
            }
        )
    return scores


def evaluate_volumes(
    checkpoint: str | Path,
    root: str | Path,
    out: str | Path,
    *,
    batch_size: int = 16,
    tta: str = DEFAULT_TTA,
    postprocess: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    compile: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on an nnU-Net root's imagesTs/ against labelsTs/, volume by volume.

    Writes ``out/per_volume.csv`` (one row per case and class) and ``out/summary.json``;
    returns the summary: per class mean Dice and HD95 (mm), their means over the classes, and
    ``slice_dice``, the mean Dice over every 2D slice as 2D validation reports it (a slice
    where neither prediction nor truth holds a class scores 1 for it, so the many slices
    outside a tumour raise it well above the 3D Dice).
    """
    root, out = Path(root), Path(out)
    spec = read_spec(root)
    if not (root / "imagesTs").is_dir() or not (root / "labelsTs").is_dir():
        raise MedsegError(
            f"{root} has no imagesTs/ with labelsTs/: nothing to score; add the test labels, "
            f"or segment imagesTs/ with medseg predict"
        )
    if not spec.nifti:
        raise MedsegError(f"{root}: volumes are scored for NIfTI data, not {spec.file_ending}")
    cases = find_cases(root / "imagesTs", spec)
    earlier = [path for path in (out / "per_volume.csv", out / "summary.json") if path.exists()]
    refuse_existing(earlier, what="an evaluation", overwrite=overwrite)
    check_writable(out)
    nibabel()
    predictor = Predictor.from_checkpoint(
        checkpoint, device=device, tta=tta, postprocess=postprocess, compile=compile,
        threshold=threshold, precision=precision,
    )  # fmt: skip
    target_labels(checkpoint, predictor, root)  # refuses other classes than the checkpoint's
    _check_channels(checkpoint, predictor, spec)
    class_names = foreground_classes(list(spec.labels))
    rows, slices = _score_cases(predictor, root, spec, cases, class_names, batch_size, progress)
    summary = _summary(rows, class_names, slices, root)
    write_csv(out / "per_volume.csv", rows, VOLUME_COLUMNS)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _score_cases(predictor, root, spec, cases, class_names, batch_size, progress):
    """Per-volume rows (one per case and class) and the accumulated slice metrics."""
    slices = MetricAccumulator(classes=class_names)
    rows = []
    for case, paths in progress_bar(list(cases.items()), desc="scoring volumes", enabled=progress):
        volume, image = read_volume(paths, case)
        label_path = root / "labelsTs" / f"{case}{spec.file_ending}"
        if not label_path.is_file():
            raise MedsegError(f"case {case} has no label file {label_path}; add it")
        truth = read_labels(label_path, spec, case, image, paths[0])
        predicted = segment_volume(predictor, volume, batch_size=batch_size)
        spacing = image.header.get_zooms()[:3]
        scores = score_volume(predicted, truth, spacing, classes=len(class_names))
        rows += [
            {"case": case, "class": name, **score}
            for name, score in zip(class_names, scores, strict=True)
        ]
        slices.update(
            np.moveaxis(predicted, SLICE_AXIS, 0),
            np.moveaxis(truth, SLICE_AXIS, 0),
            ids=[f"{case}_z{k}" for k in range(predicted.shape[SLICE_AXIS])],
        )
    return rows, slices


def _check_channels(checkpoint, predictor: Predictor, spec) -> None:
    """Refuse data with other channels than the checkpoint takes (one gray may feed RGB)."""
    takes = predictor.config.data.channels
    if len(spec.channels) != takes and not (len(spec.channels) == 1 and takes == 3):
        raise MedsegError(
            f"{spec.root / 'dataset.json'} declares {len(spec.channels)} channels "
            f"({', '.join(spec.channels)}) but {checkpoint} takes {takes}; score it on data "
            f"with the channels it was trained on"
        )


def _summary(rows, class_names, slices: MetricAccumulator, root: Path) -> dict[str, Any]:
    per_class = {
        name: {
            key: float(np.mean([row[key] for row in rows if row["class"] == name]))
            for key in ("dice", "hd95_mm")
        }
        for name in class_names
    }
    return {
        "data": str(root),
        "volumes": len(rows) // len(class_names),
        "dice": float(np.mean([scores["dice"] for scores in per_class.values()])),
        "hd95_mm": float(np.mean([scores["hd95_mm"] for scores in per_class.values()])),
        "slice_dice": slices.summary()["dice"],
        "slices": len(slices),
        "per_class": per_class,
        "per_volume": rows,
    }


def format_volume_table(summary: dict[str, Any]) -> str:
    """Per volume and class Dice and HD95 (mm), then the per-class means, as plain text."""
    rows = summary["per_volume"]
    lines = [f"{'case':<16} {'class':<16} {'Dice':>7} {'HD95 mm':>9}"]
    lines += [
        f"{row['case']:<16} {row['class']:<16} {row['dice']:>7.4f} {row['hd95_mm']:>9.2f}"
        for row in rows
    ]
    lines += [
        f"{'mean':<16} {name:<16} {scores['dice']:>7.4f} {scores['hd95_mm']:>9.2f}"
        for name, scores in summary["per_class"].items()
    ]
    lines.append(
        f"{summary['volumes']} volumes: mean Dice {summary['dice']:.4f}, HD95 "
        f"{summary['hd95_mm']:.2f} mm; per-slice mean Dice {summary['slice_dice']:.4f} "
        f"({summary['slices']} slices)"
    )
    return "\n".join(lines)
