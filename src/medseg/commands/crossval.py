"""k-fold cross-validation: train the folds, then say what they measured.

`cross_validate` trains a k-fold run's folds (`medseg.engine.folds.train_folds`). Once every
fold has finished (in this command or earlier ones, on this machine or others), it writes
``cv_summary.json`` and prints its table:

- ``per_fold``: each fold's best validation epoch (the one its best.pt holds) and that epoch's
  ``val_*`` values from metrics.csv, measured at the network's resolution during training;
- ``mean`` and ``std``: across the folds (the sample standard deviation, n - 1);
- ``out_of_fold``: each fold's best model predicts its own validation images, and those
  predictions, which together cover all of ``train/`` once, are scored as ``medseg evaluate``
  scores (each at its mask's own size, default TTA; per class for label maps), into one summary
  (`medseg.commands.evaluate.score_samples`); per image in ``cv_per_image.csv`` with its fold.

The summary names each fold's best.pt and metrics.csv (path, size, time); a rerun finding the
same files prints it again without predicting anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.commands.evaluate import score_samples, scored_summary, target_labels
from medseg.config import Config
from medseg.config.choices import DEFAULT_TTA
from medseg.core.console import records_console
from medseg.core.files import write_csv, write_text
from medseg.data.cache import file_identity
from medseg.data.folder import find_split, train_pairs
from medseg.data.layout import image_root
from medseg.data.splits import fold_samples
from medseg.engine.folds import KFoldRun, train_folds
from medseg.engine.run_folder import RunFolder
from medseg.metrics import MetricAccumulator
from medseg.prediction.predictor import Predictor

PER_IMAGE_NAME = "cv_per_image.csv"


@records_console  # the k-fold run's own train.log (attached once its folder is written)
def cross_validate(
    config: Config | None, data: str | Path, out: str | Path, *, folds: int | None = None,
    fold: int | None = None, resume: bool = False, overwrite: bool = False,
    progress: bool = True, changes: dict[str, Any] | None = None, **logging,
) -> dict[str, Any]:  # fmt: skip
    """Train the folds of ``out`` (`train_folds` says which), then, when all have finished,
    write and print the cross-validation summary (module docstring). Returns ``run``,
    ``folds`` (K), ``finished`` and ``trained`` (fold numbers) and ``cv`` (the summary, None
    while folds are missing)."""
    status = train_folds(
        config, data, out, folds=folds, fold=fold, resume=resume, overwrite=overwrite,
        progress=progress, changes=changes, **logging,
    )  # fmt: skip
    run = status.run
    result = {
        "run": str(run.path), "folds": status.folds, "finished": status.finished,
        "trained": sorted(status.trained), "cv": None,
    }  # fmt: skip
    if int(os.environ.get("RANK", 0)) != 0:
        return result
    if not status.complete:
        missing = [index for index in range(status.folds) if index not in status.finished]
        print(
            f"folds {', '.join(map(str, missing))} of {run.path} have not finished; "
            f"{run.summary.name} is written once every fold has (train each with "
            f"medseg train --resume {run.path} --fold N, or all with --resume {run.path})"
        )
        return result
    result["cv"] = cv_summary(run, data, progress=progress)
    print(format_cv_summary(result["cv"]))
    return result


def cv_summary(run: KFoldRun, data: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """The summary of a k-fold run whose folds have all finished: read from cv_summary.json
    when it describes the folds' best.pt files as they are, else measured and written."""
    splits = run.read_splits()
    checkpoints = [
        file_identity(path)
        for index in range(len(splits))
        for path in (run.fold(index).best, run.fold(index).metrics)
    ]
    earlier = _read_summary(run)
    if earlier is not None and earlier.get("checkpoints") == checkpoints:
        return earlier
    per_fold = [best_epoch(run.fold(index), index) for index in range(len(splits))]
    keys = [key for key in per_fold[0] if key.startswith("val_")]
    values = {key: np.array([row[key] for row in per_fold], dtype=float) for key in keys}
    out_of_fold, rows, columns = score_out_of_fold(run, splits, data, progress=progress)
    summary = {
        "run": str(run.path),
        "folds": len(splits),
        "per_fold": per_fold,
        "mean": {key: float(column.mean()) for key, column in values.items()},
        "std": {key: float(column.std(ddof=1)) for key, column in values.items()},
        "out_of_fold": out_of_fold,
        "checkpoints": checkpoints,
    }
    write_csv(run.path / PER_IMAGE_NAME, rows, columns)
    write_text(run.summary, json.dumps(summary, indent=2))
    return summary


def _read_summary(run: KFoldRun) -> dict[str, Any] | None:
    try:
        return json.loads(run.summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none yet, or damaged: measured again


def best_epoch(fold: RunFolder, index: int) -> dict[str, Any]:
    """A fold's best validation epoch (highest val_dice, the first of equals: what best.pt
    holds) as ``fold``, ``best_epoch``, ``epochs`` and that row's ``val_*`` values."""
    rows = fold.metric_rows()
    best = max(rows, key=lambda row: float(row["val_dice"]))  # max keeps the first of equals
    return {
        "fold": index,
        "best_epoch": int(best["epoch"]),
        "epochs": len(rows),
        **{key: float(value) for key, value in best.items() if key.startswith("val_")},
    }


def score_out_of_fold(
    run: KFoldRun, splits: list[dict], data: str | Path, *, progress: bool = True
) -> tuple[dict[str, Any], list[dict], tuple[str, ...]]:
    """Each fold's best model on its own validation pairs, all scored into one summary; with
    the per-image rows (a ``fold`` column first) and their columns. One model at a time."""
    images = image_root(data)
    folder = find_split(images, "train")
    metrics, auc, rows = None, None, []
    for index, split in enumerate(splits):
        predictor = Predictor.from_checkpoint(run.fold(index).path, tta=DEFAULT_TTA)
        pairs = train_pairs(images, mask_suffix=predictor.config.data.mask_suffix)
        _, val = fold_samples(pairs, split)
        labels = target_labels(run.fold(index).path, predictor, folder)
        fold_metrics, fold_auc = score_samples(predictor, val, labels=labels, progress=progress)
        rows += [{"fold": index, **row} for row in fold_metrics.rows()]
        metrics = fold_metrics if metrics is None else metrics.merge(fold_metrics)
        if fold_auc is not None:
            auc = fold_auc if auc is None else auc.merge(fold_auc)
        tta = predictor.tta
        del predictor  # one model in memory at a time
    summary = _scored(metrics, auc, tta=tta, data=data)
    return summary, rows, ("fold", *metrics.columns())


def _scored(metrics: MetricAccumulator, auc, *, tta: str, data: str | Path) -> dict[str, Any]:
    summary = scored_summary(metrics, auc)
    summary.update({"data": str(data), "tta": tta})
    return summary


def format_cv_summary(summary: dict[str, Any]) -> str:
    """The printed table: a row per fold (best epoch, its validation Dice, IoU and each class's
    Dice), the mean ± std, then the out-of-fold scores."""
    per_fold = summary["per_fold"]
    keys = ["val_dice", "val_iou", *(k for k in per_fold[0] if k.startswith("val_dice_"))]
    keys = [key for key in keys if key != "val_dice_pooled"]
    names = [_heading(key) for key in keys]
    width = max(15, *(len(name) for name in names))
    lines = [
        f"cross-validation of {summary['run']}: {summary['folds']} folds, each at its best "
        f"validation epoch (network resolution)",
        f"{'fold':<6}{'epoch':>6}  " + "  ".join(f"{name:>{width}}" for name in names),
    ]
    for row in per_fold:
        cells = "  ".join(f"{row[key]:>{width}.4f}" for key in keys)
        lines.append(f"{row['fold']:<6}{row['best_epoch']:>6}  {cells}")
    spread = [f"{summary['mean'][k]:.4f} ± {summary['std'][k]:.4f}" for k in keys]
    lines.append(f"{'mean ± std':<12}  " + "  ".join(f"{cell:>{width}}" for cell in spread))
    lines.append(_out_of_fold_line(summary["out_of_fold"]))
    return "\n".join(lines)


def _heading(key: str) -> str:
    if key.startswith("val_dice_"):
        return f"Dice {key.removeprefix('val_dice_')}"
    return {"val_dice": "Dice", "val_iou": "IoU"}[key]


def _interval(scores: dict[str, Any]) -> str:
    """The mean Dice's bootstrap interval as the out-of-fold line gives it, e.g.
    ``" (95% interval 0.9012-0.9288)"``; nothing for a cv_summary.json from before it."""
    if "dice_ci95" not in scores:
        return ""
    low, high = scores["dice_ci95"]
    return f" (95% interval {low:.4f}-{high:.4f})"


def _out_of_fold_line(scores: dict[str, Any]) -> str:
    line = (
        f"out-of-fold, all {scores['images']} images of train/ in {scores['data']} at their own size "
        f"(TTA {scores['tta']}): Dice {scores['dice']:.4f}{_interval(scores)}, IoU {scores['iou']:.4f}"
    )
    if "per_class" in scores:
        classes = ", ".join(f"{name} {v['dice']:.4f}" for name, v in scores["per_class"].items())
        line += f"; Dice per class: {classes}"
    return line
