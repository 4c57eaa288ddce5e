"""The Python API: the same operations as the command line, for notebooks and scripts.

import medseg
medseg.train(data="isic2017", out="runs/first", overrides={"train.epochs": 5})
summary = medseg.evaluate(checkpoint="runs/first", data="isic2017/test", out="runs/first/eval")
medseg.predict(checkpoint="runs/first", source="new_images/", output="masks/")

Every ``checkpoint`` may also be an ensemble: a k-fold run folder, a list of checkpoints, or
``medseg.formats.source.resolve_source("runs/cv", folds=[0, 2])`` for chosen folds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.commands.crossval import cross_validate
from medseg.commands.evaluate import evaluate_folder, format_summary, score_pair
from medseg.commands.export import export as export_model
from medseg.commands.predict import predict as predict_files
from medseg.commands.serve import serve as serve_model
from medseg.commands.tune import tune as tune_study
from medseg.commands.volumes import evaluate_volumes, predict_volumes
from medseg.config import Config, build_config
from medseg.config.choices import DEFAULT_TTA, OPSET
from medseg.core.errors import MedsegError
from medseg.core.files import check_writable, refuse_existing
from medseg.data.cache import cache_layout, prepare
from medseg.data.folder import SPLIT_NAMES, find_pairs, find_split, resolve_split_folder
from medseg.data.io import read_image, read_target
from medseg.data.layout import image_root, is_nifti, is_volume_root
from medseg.data.plan import plan
from medseg.drawing import save_prediction_figure
from medseg.engine.folds import KFoldRun
from medseg.engine.tracking import check_loggers
from medseg.engine.train import fit
from medseg.formats import safetensors
from medseg.formats.source import Checkpoint, ModelSource, resolve_source
from medseg.model import DeepLabV3Plus
from medseg.prediction.outputs import PredictionReport
from medseg.prediction.predictor import Predictor


def train(
    *,
    data: str | Path,
    out: str | Path,
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    config: Config | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    folds: int | None = None,
    fold: int | None = None,
    log: tuple[str, ...] | list[str] = (),
    images_every: int | None = None,
) -> dict[str, Any]:
    """Train on ``data`` (a root with train/) into the run folder ``out``; returns a summary.

    ``resume=True`` continues the run in ``out`` with its own settings; ``overrides`` may then
    only raise ``train.epochs`` or change ``data.num_workers``. ``folds`` (K ≥ 2) makes ``out``
    a k-fold cross-validation run (`medseg.commands.crossval.cross_validate`, whose summary it
    returns), ``fold`` trains one of its folds only. ``log``: "tensorboard" and/or "mlflow"
    beside each run's train.log, with validation images every ``images_every`` epochs.
    """
    log = tuple(log)
    check_loggers(log)  # a missing package is said now, not after the data is read
    logging = {"log": log, "images_every": images_every}
    if resume:
        if preset != "default" or config_file is not None or config is not None or overwrite:
            raise MedsegError(
                f"--resume continues {out} with the settings it was started with; a preset, "
                f"a config file or --overwrite cannot apply (start a new run with --out instead)"
            )
        out, fold = _kfold_target(out, fold)
        if folds is not None or fold is not None or KFoldRun.holds(out):
            return cross_validate(
                None, data, out, folds=folds, fold=fold, resume=True, progress=progress,
                changes=overrides, **logging,
            )  # fmt: skip
        return fit(None, data, out, resume=True, progress=progress, changes=overrides, **logging)
    if config is None:
        config = build_config(preset=preset, config_file=config_file, overrides=overrides)
    if folds is not None or fold is not None:
        return cross_validate(
            config, data, out, folds=folds, fold=fold, overwrite=overwrite, progress=progress,
            **logging,
        )  # fmt: skip
    if KFoldRun.holds(out):
        raise MedsegError(
            f"{out} is a k-fold run (it has splits.json); train its folds with --folds K or "
            f"--fold N, continue it with --resume {out}, or choose another --out"
        )
    return fit(config, data, out, overwrite=overwrite, progress=progress, **logging)


def _kfold_target(out: str | Path, fold: int | None) -> tuple[str | Path, int | None]:
    """--resume RUN/fold_1 continues fold 1 of the k-fold run RUN (on that fold's split)."""
    found = KFoldRun.of_fold(out)
    if found is None:
        return out, fold
    run, index = found
    if fold is not None and fold != index:
        raise MedsegError(f"--resume {out} continues fold {index}; drop --fold {fold}")
    return run.path, index


def evaluate(
    *, checkpoint: Checkpoint | ModelSource, data: str | Path, out: str | Path, **options
) -> dict[str, Any]:
    """Score a checkpoint on a folder of pairs (`medseg.commands.evaluate.evaluate_folder`), on
    an nnU-Net root's 2D slices, or volume by volume on an nnU-Net root of NIfTI volumes
    (`medseg.commands.volumes.evaluate_volumes`, which takes no ``report`` or ``roi``)."""
    checkpoint = _resolved(checkpoint)
    if is_volume_root(data):
        return evaluate_volumes(checkpoint, data, out, **options)
    return evaluate_folder(checkpoint, image_root(data), out, **options)


def predict(
    *, checkpoint: Checkpoint | ModelSource, source: str | Path, output: str | Path, **options
) -> PredictionReport:
    """Segment images into masks at their own size (0/255, or class indices for a multi-class
    checkpoint; `medseg.commands.predict.predict`), or NIfTI volumes into label volumes
    (`medseg.commands.volumes.predict_volumes`, which writes no probabilities or overlays)."""
    checkpoint = _resolved(checkpoint)
    if is_nifti(source):
        return predict_volumes(checkpoint, source, output, **options)
    return predict_files(checkpoint, source, output, **options)


def _resolved(checkpoint: Checkpoint | ModelSource) -> Checkpoint | ModelSource:
    """Several checkpoints as the one ensemble they name, so that results name it readably."""
    return resolve_source(checkpoint) if isinstance(checkpoint, (list, tuple)) else checkpoint


def visualize(
    *,
    checkpoint: Checkpoint | ModelSource,
    data: str | Path,
    out: str | Path,
    num_samples: int = 8,
    tta: str = DEFAULT_TTA,
    postprocess: bool = False,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    compile: bool = False,
    threshold: float | None = None,
) -> list[Path]:
    """The seed's figure for the first ``num_samples`` pairs: image, truth, prediction, overlay.

    A multi-class checkpoint's figures show each class in its colour, with a legend of the
    class names; ``threshold`` (binary checkpoints only; None: the checkpoint's) cuts the
    foreground probability.
    """
    out = Path(out)
    predictor = Predictor.from_checkpoint(
        checkpoint,
        device=device,
        precision=precision,
        tta=tta,
        postprocess=postprocess,
        compile=compile,
        threshold=threshold,
    )
    pairs = find_pairs(resolve_split_folder(data), mask_suffix=predictor.config.data.mask_suffix)
    targets = {sample: out / f"{sample.id}_prediction.png" for sample in pairs[:num_samples]}
    # Checked before the first figure, so none is half replaced.
    earlier = [path for path in targets.values() if path.exists()]
    refuse_existing(
        earlier,
        what="figures",
        overwrite=overwrite,
        advice="choose another --out or pass --overwrite",
    )
    check_writable(out)
    paths = []
    data = predictor.config.data
    for sample, path in targets.items():
        image = read_image(sample.image, channels=data.channels)
        truth = read_target(sample.mask, data.labels)
        prediction = predictor.masks([image])[0]
        score = score_pair(sample.id, prediction, truth, labels=data.labels)
        title = f"{sample.id}: Dice {score['dice']:.3f}, IoU {score['iou']:.3f}"
        figure = save_prediction_figure(
            path, image, truth, prediction, title=title, labels=data.labels
        )
        paths.append(figure)
    return paths


def export(
    *,
    checkpoint: Checkpoint | ModelSource,
    out: str | Path,
    format: str = "safetensors",
    quantize: str | None = None,
    calibration: str | Path | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
    folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Ship a checkpoint (a .pt file or a run folder) as a folder ``out`` with a model card;
    an ensemble (a k-fold run, of which ``folds`` chooses folds, or a list of checkpoints) as
    a folder per member with ensemble.json (safetensors) or one averaging graph (ONNX).

    ``format`` "safetensors" writes model.safetensors and config.json (load them with
    `Predictor.from_pretrained` or `load_pretrained`); "onnx" writes model.onnx
    and medseg.json (onnxruntime), ``quantize="int8"`` calibrated on the images in
    ``calibration``. Every prediction command accepts the folder as its checkpoint. Returns
    what was written (see `medseg.commands.export.export`).
    """
    return export_model(
        checkpoint, out, format=format, quantize=quantize, calibration=calibration,
        overwrite=overwrite, opset=opset, folds=folds,
    )  # fmt: skip


def load_pretrained(folder: str | os.PathLike) -> DeepLabV3Plus:
    """The network `save_pretrained` (or ``medseg export --format safetensors``) wrote into
    ``folder``, in eval mode; only JSON and raw tensors are read, nothing is unpickled."""
    model, _ = safetensors.load_pretrained(folder)
    return model


def save_pretrained(
    model: DeepLabV3Plus, folder: str | os.PathLike, *, config: Config | None = None, **options
) -> Path:
    """Write model.safetensors, config.json and a model card into ``folder``.

    ``config`` is the run's resolved `medseg.config.Config`, which a Predictor needs (input
    size, classes, threshold); ``options``: see `medseg.formats.safetensors.save_pretrained`.
    """
    return safetensors.save_pretrained(model, folder, config=config, **options)


def prepare_data(
    data: str | Path,
    *,
    size: int | None = None,
    mask_suffix: str = "_segmentation",
    skip_bad: bool = False,
) -> list[tuple[Path, int, list[str]]]:
    """Fill the training cache for every split of a data root (or one split folder).

    ``size`` defaults to what training plans for this data (`medseg.data.plan`), and the
    channels and classes come from its dataset.json, so training finds the cache ready.
    Returns (folder, pairs cached, "file: reason" of each pair skipped) per split folder.
    """
    root = Path(image_root(data))
    folders = (
        [find_split(root, split) for split in SPLIT_NAMES]
        if not (root / "images").is_dir()
        else [root]
    )
    folders = [folder for folder in folders if folder is not None] or [resolve_split_folder(root)]
    overrides = {"data.mask_suffix": mask_suffix, **({"data.image_size": size} if size else {})}
    data_root = root if find_split(root, "train") else folders[0].parent
    settings = plan(build_config(overrides=overrides), data_root).data
    layout = cache_layout(settings)
    results = []
    for folder in folders:
        pairs = find_pairs(folder, mask_suffix=mask_suffix)
        cache = prepare(pairs, **layout, skip_bad=skip_bad)
        results.append((folder, len(cache.samples), cache.bad))
    return results


DEMO_SETTINGS = {
    # Small enough to train in a few minutes on two CPU cores, big enough to learn real shapes.
    "data.image_size": 128,
    "model.pretrained": False,
    "train.epochs": 12,
    "train.warmup_epochs": 1.0,
}


def demo(
    *,
    out: str | Path = "medseg-demo",
    epochs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate synthetic dermoscopy-like data, train, evaluate and draw figures, all offline."""
    from medseg.data.synthetic import make_synthetic_dataset

    out = Path(out)
    print(
        "medseg demo: the images are SYNTHETIC (generated lesions on generated skin), made here so "
        "the demo needs no data and no network. Its numbers say nothing about real lesions."
    )
    data = make_synthetic_dataset(out / "synthetic-data", n_train=160, n_test=40, size=128, seed=0)
    overrides = dict(DEMO_SETTINGS, **({"train.epochs": epochs} if epochs else {}))
    run = out / "run"
    result = train(data=data, out=run, overrides=overrides, overwrite=overwrite, progress=progress)
    summary = evaluate(
        checkpoint=run,
        data=data / "test",
        out=run / "evaluation-test",
        overwrite=True,
        progress=progress,
    )
    figures = visualize(
        checkpoint=run, data=data / "test", out=run / "figures", num_samples=6, overwrite=True
    )
    print(format_summary(summary))
    print(
        f"demo finished: test Dice {summary['dice']:.4f} on {summary['images']} synthetic images; "
        f"run folder {run} (metrics.csv, curves.png, checkpoints/, evaluation-test/, {len(figures)} figures in figures/)"
    )
    return {"train": result, "test": summary}


def tune(
    *,
    data: str | Path | None,
    out: str | Path,
    trials: int,
    epochs: int | None = None,
    space: str | Path | None = None,
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    pruner=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search training settings with Optuna in the study folder ``out`` until it holds
    ``trials`` finished trials of ``epochs`` epochs each (`medseg.commands.tune.tune`); needs
    the extra ``medseg[tune]``. Returns the trials, the best one and its ``best_config``
    (a YAML for ``train(config_file=...)``)."""
    return tune_study(
        data, out, trials=trials, epochs=epochs, space=space, preset=preset,
        config_file=config_file, overrides=overrides, pruner=pruner, progress=progress,
    )  # fmt: skip


def serve(*, checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 7860, **options):
    """Serve ``checkpoint`` as a local web page and HTTP endpoint until Ctrl-C
    (`medseg.commands.serve.serve`; ``options``: device, precision, max_pixels). Needs the
    extra ``medseg[serve]`` (Gradio)."""
    serve_model(checkpoint, host=host, port=port, **options)


__all__ = [
    "demo",
    "evaluate",
    "export",
    "load_pretrained",
    "predict",
    "prepare_data",
    "save_pretrained",
    "serve",
    "train",
    "tune",
    "visualize",
]
