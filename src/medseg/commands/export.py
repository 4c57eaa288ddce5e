"""`export`: a checkpoint as a pretrained folder (safetensors) or an ONNX model, with its card.

Every export is written into a staging folder beside the output and moved into place only
when complete (`medseg.formats.folder.staged_export`), so a failed or killed export leaves the
output folder as it was. An ONNX graph is checked against the PyTorch model on a batch before
it is kept; an int8 model is calibrated on images preprocessed by the Predictor itself.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config import Config
from medseg.config.choices import EXPORT_FORMATS as FORMATS
from medseg.config.choices import OPSET, QUANTIZATIONS
from medseg.core.errors import MedsegError
from medseg.core.optional import require
from medseg.core.version import __version__
from medseg.data.folder import list_images
from medseg.data.io import read_image
from medseg.data.transforms import (
    CLAHE_CLIP_LIMIT,
    CLAHE_TILES,
    SHADES_OF_GRAY_POWER,
    normalisation,
)
from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from medseg.engine.run_folder import RunFolder
from medseg.engine.runtime import Precision
from medseg.engine.sliding_window import inference_tile
from medseg.formats.card import EnsembleMember, Provenance, model_card
from medseg.formats.ensemble import ENSEMBLE_NAME, ensemble_description, fold_of
from medseg.formats.folder import check_export_folder, staged_export
from medseg.formats.onnx import (
    FORMAT,
    FORMAT_VERSION,
    FP32_NAME,
    INPUT_NAME,
    META_NAME,
    ONNX_NAME,
    ONNX_PACKAGE,
    OUTPUT_NAME,
    open_session,
)
from medseg.formats.safetensors import SAFETENSORS_PACKAGE, load_pretrained, save_pretrained
from medseg.formats.source import (
    CHECKPOINT,
    KFOLD,
    ONNX,
    SAFETENSORS,
    Checkpoint,
    ModelSource,
    resolve_source,
)
from medseg.model import DeepLabV3Plus
from medseg.model.ensemble import ProbabilityAverage
from medseg.prediction.ensemble import check_compatible
from medseg.prediction.outputs import file_sha256
from medseg.prediction.predictor import Predictor, resolve_tta

CALIBRATION_IMAGES = 32  # int8 ranges from a few dozen images, spread over the folder
ONNX_USAGE = """\
```bash
medseg predict --checkpoint THIS_FOLDER -i images/ -o masks/
```

```python
import medseg

predictor = medseg.Predictor.from_pretrained("THIS_FOLDER")  # runs through onnxruntime
masks = predictor.masks([uint8_image])
```

Without medseg: feed `model.onnx` a float32 (N, C, H, W) image as medseg.json's `input` says
(resize, scale to 0..1, subtract `mean`, divide by `std`), and read its logits as its `output`
says (sigmoid and `threshold`, or arg-max over the classes)."""


def export(
    checkpoint: Checkpoint | ModelSource,
    out: str | os.PathLike,
    *,
    format: str = "safetensors",
    quantize: str | None = None,
    calibration: str | os.PathLike | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
    folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write ``checkpoint`` (a .pt file, a run folder or a safetensors export) into the folder
    ``out`` as ``format``.

    "safetensors": model.safetensors, config.json and README.md (`save_pretrained`). "onnx":
    model.onnx (opset ``opset``, batch, height and width dynamic), medseg.json and README.md;
    with ``quantize`` "int8", model.onnx is the int8 model calibrated on ``calibration`` (a
    folder of images, or a data root whose train/images is used) and the float one is kept as
    model-fp32.onnx. A folder that already holds a model is refused unless ``overwrite``.

    An ensemble (a k-fold run, of which ``folds`` chooses folds; several checkpoints in a list;
    an exported ensemble) is written whole: as safetensors, a folder per member (fold_0/ ...)
    with ensemble.json; as ONNX, one graph that averages the members' probabilities
    (`medseg.model.ensemble.ProbabilityAverage`), checked against the members run one by one.
    Returns what was written: {"out", "format", "files", "source", "sha256", ...} (for an
    ensemble, "sha256" lists every member's).
    """
    _check_request(format, quantize, calibration, opset)
    source = resolve_source(checkpoint, folds=folds)  # a folder holding no model is named here
    _check_out(Path(out), source)
    check_export_folder(out, overwrite=overwrite)
    calibration_paths = _calibration_images(calibration) if quantize else []
    if source.is_ensemble:
        options = {"quantize": quantize, "calibration": calibration, "opset": opset}
        return _export_ensemble(
            source, Path(out), format=format, overwrite=overwrite,
            calibration_paths=calibration_paths, **options,
        )  # fmt: skip
    model, config, provenance = _load_source(source, given=str(checkpoint))
    tta = resolve_tta("auto", config)
    weights = str(source.weights)
    result = {"out": str(out), "format": format, "source": weights, "sha256": provenance.sha256}
    if format == "safetensors":
        save_pretrained(
            model, out, config=config, overwrite=overwrite, provenance=provenance, tta=tta
        )
        return {**result, "files": ["model.safetensors", "config.json", "README.md"]}
    with staged_export(out, overwrite=overwrite) as staging:
        files, quantization = _write_onnx_folder(
            staging, model, config, provenance, tta=tta, opset=opset, quantize=quantize,
            calibration=calibration, calibration_paths=calibration_paths,
        )  # fmt: skip
    return {**result, "files": [*files, META_NAME, "README.md"], "quantization": quantization}


def _write_onnx_folder(
    staging: Path, model: torch.nn.Module, config: Config, provenance: Provenance, *, tta: str,
    opset: int, quantize: str | None, calibration, calibration_paths: list[Path],
    ensemble: OnnxEnsemble | None = None,
) -> tuple[dict[str, dict], dict | None]:  # fmt: skip
    """model.onnx (and model-fp32.onnx when quantized), medseg.json and the card; for an
    ``ensemble``, ``model`` is its `ProbabilityAverage`, checked against its members."""
    verify = ensemble.verify if ensemble else _verify
    difference = _write_onnx(model, config, staging / ONNX_NAME, opset=opset, verify=verify)
    files = {ONNX_NAME: {"precision": "fp32"}}
    quantization = None
    if quantize:
        os.replace(staging / ONNX_NAME, staging / FP32_NAME)
        quantization = _quantize_int8(model, config, staging, calibration_paths, source=calibration)
        files = {ONNX_NAME: {"precision": "int8"}, FP32_NAME: {"precision": "fp32"}}
    for name, described in files.items():
        described["sha256"] = file_sha256(staging / name)
    meta = _describe(config, provenance, tta=tta, opset=opset)
    checked = "verified_max_probability_difference" if ensemble else "verified_max_logit_difference"
    meta.update(
        {checked: difference},
        files=files,
        quantization=quantization,
        **({"ensemble": ensemble.described} if ensemble else {}),
        config=meta.pop("config"),  # last: the long part
    )
    if ensemble:
        meta["source_checkpoint_sha256"] = None  # one per member, in "ensemble"
        meta["output"]["ensemble"] = (
            "the logits of the members' averaged probabilities: log p - log(1 - p) (binary) "
            "or log p (classes), so sigmoid or softmax gives the average back"
        )
    (staging / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    listed = ", ".join(f"{name} ({described['precision']})" for name, described in files.items())
    card = model_card(
        config,
        provenance,
        files=f"{listed} for onnxruntime, {META_NAME} (how to feed it)",
        tta=tta,
        usage=ONNX_USAGE,
        ensemble=ensemble.members if ensemble else None,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    return files, quantization


def _check_out(out: Path, source: ModelSource) -> None:
    """An export goes into a folder of its own, never over the run or the model it comes from
    (for an ensemble: nor over any member's)."""
    protected = {source.path.resolve()}
    for leaf, _ in source.leaves():
        protected |= {leaf.path.resolve(), leaf.weights.parent.resolve()}
        if leaf.kind == CHECKPOINT:
            protected.add(leaf.run.path.resolve())
    if out.resolve() in protected:
        raise MedsegError(
            f"--out {out} is the folder of the model being exported; the export's files would "
            f"overwrite the run's own: choose a new folder, e.g. {out / 'export'}"
        )


def _load_source(source: ModelSource, *, given: str) -> tuple[DeepLabV3Plus, Config, Provenance]:
    """The network, its config and where it came from, for a checkpoint or a safetensors export.

    An ONNX export holds a graph, not the network's weights in a form PyTorch rebuilds from.
    """
    if source.kind == ONNX:
        raise MedsegError(
            f"{source.path} is an ONNX export, which cannot be exported again; pass the .pt "
            f"file, run folder or safetensors folder it was made from"
        )
    if source.kind == SAFETENSORS:
        model, config = load_pretrained(source.path)
        return model, config, Provenance(source=given, sha256=file_sha256(source.weights))
    state = load_checkpoint(source.weights)  # names a missing or damaged file
    model, config = model_from_checkpoint(state, path=source.weights)
    sha256 = file_sha256(source.weights)
    provenance = Provenance.of_checkpoint(source.weights, state, given=given, sha256=sha256)
    return model, config, provenance


def _check_request(
    format: str, quantize: str | None, calibration: str | os.PathLike | None, opset: int
) -> None:
    """Refuse impossible options, and missing packages, before anything is loaded."""
    if format not in FORMATS:
        raise MedsegError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MedsegError(
            f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    if quantize and format != "onnx":
        raise MedsegError(f"--quantize {quantize} applies to --format onnx, not {format}")
    if quantize and calibration is None:
        raise MedsegError(
            f"--quantize {quantize} needs --calibration DIR: a folder of images like those the "
            f"model will segment (or a data root, whose train/images is used)"
        )
    if calibration is not None and not quantize:
        raise MedsegError("--calibration is for --quantize int8; add it or leave --calibration out")
    if format == "onnx" and opset < OPSET:
        raise MedsegError(f"--opset {opset} is too old; use {OPSET} or newer")
    if format == "safetensors":
        require("safetensors.torch", **SAFETENSORS_PACKAGE)
        return
    for module in ("onnx", "onnxruntime", *(["onnxruntime.quantization"] if quantize else [])):
        require(module, extra=ONNX_PACKAGE["extra"], purpose="exporting to ONNX")


def _calibration_images(calibration: str | os.PathLike) -> list[Path]:
    """Up to `CALIBRATION_IMAGES` image files spread evenly over the calibration folder."""
    root = Path(calibration)
    if not root.is_dir():
        raise MedsegError(f"calibration folder not found: {root}; pass a folder of images")
    for folder in (root / "train" / "images", root / "images", root):
        if folder.is_dir():
            images = list_images(folder)
            if images:
                step = max(1, len(images) // CALIBRATION_IMAGES)
                return images[::step][:CALIBRATION_IMAGES]
    raise MedsegError(
        f"no images found in {root} (nor in its images/ or train/images/); pass a folder of "
        f"images like those the model will segment"
    )


def _write_onnx(
    model: torch.nn.Module, config: Config, path: Path, *, opset: int, verify=None
) -> float:
    """Export ``model`` to ``path`` and check it against PyTorch (``verify``: `_verify`, or an
    ensemble's own check)."""
    onnx = require("onnx", **ONNX_PACKAGE)
    size, channels = _traced_size(config), config.data.channels
    model = model.eval().float()
    example = torch.zeros(1, channels, size, size)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter: it runs on every torch medseg supports (2.1 on), takes
    # dynamic_axes, and needs no onnxscript; torch 2.9+ warns that it is no longer the default.
    legacy = (
        {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
            **legacy,
        )
    # Shape inference loses the class count at the final Resize; it is fixed, so say so, and
    # any runtime (and `onnx_runtime._check_graph`) can read it from the graph.
    graph = onnx.load(str(path))
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = config.model.num_classes
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))
    return (verify or _verify)(model, path, channels=channels, size=size)


def _traced_size(config: Config) -> int:
    """The side the graph is traced at: the training size, or for a patch-trained model the
    tile it predicts with, larger than the patch, so that the graph holds the windowed image
    pooling that such tiles take (`medseg.model.aspp.ImagePooling`; a graph traced at the patch
    would average every tile whole)."""
    patch = config.data.image_size
    if config.data.mode != "patch":
        return patch
    return inference_tile(patch)


def _verify(model: DeepLabV3Plus, path: Path, *, channels: int, size: int) -> float:
    """The largest logit difference between the graph and PyTorch on a batch of two random
    images at another size than the example it was traced with (batch, height and width are
    dynamic); a graph that differs by more than float32 rounding is refused, not shipped."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(2, channels, size + 16, size, generator=generator)
    with torch.no_grad():
        expected = model(batch).numpy()
    try:
        (logits,) = open_session(path).run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
        found = float(np.abs(logits - expected).max())
    except Exception as error:  # a graph fixed to the traced shape fails here, or broadcasts
        found = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    if isinstance(found, str) or not found <= 1e-3 * (1 + float(np.abs(expected).max())):
        raise MedsegError(
            f"the ONNX graph does not reproduce the PyTorch model on a test batch ({found}); "
            f"this is a bug with torch {torch.__version__}: export --format safetensors "
            f"instead, and report it"
        )
    return found


def _calibration_batches(
    model: DeepLabV3Plus, config: Config, images: list[Path], *, source
) -> tuple[list[np.ndarray], list[str]]:
    """The calibration images preprocessed as `Predictor.probabilities` does (the Predictor
    runs nothing here), and the reasons of those that could not be read."""
    predictor = Predictor(model, config, torch.device("cpu"), Precision("fp32", None), tta="none")
    batches, unreadable = [], []
    for path in images:
        try:
            image = read_image(path, channels=config.data.channels)
        except MedsegError as error:
            unreadable.append(str(error))
            continue
        batches.append(predictor.preprocess([image]).numpy())
    if not batches:
        raise MedsegError(
            f"none of the {len(images)} calibration images in {source} could be read "
            f"(first: {unreadable[0]}); pass a folder of readable images"
        )
    return batches, unreadable


def _quantize_int8(
    model: DeepLabV3Plus,
    config: Config,
    folder: Path,
    images: list[Path],
    *,
    source: str | os.PathLike,
) -> dict[str, Any]:
    """Quantize folder/model-fp32.onnx into folder/model.onnx; describe how.

    Static quantization in QDQ format (what onnxruntime's CPU kernels fuse), weights per
    output channel as int8, activations as uint8 with ranges from the calibration images
    (min-max), each preprocessed by the Predictor as prediction will.
    """
    quantization = require("onnxruntime.quantization", **ONNX_PACKAGE)
    batches, unreadable = _calibration_batches(model, config, images, source=source)

    class Images(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    fp32, int8 = folder / FP32_NAME, folder / ONNX_NAME
    # onnxruntime's recommended first step: shapes inferred and the exporter's constants folded
    # into initializers, without which quantize_static leaves biases it cannot see unquantized.
    prepared = folder / "prepared-for-quantization.onnx"
    quantization.quant_pre_process(str(fp32), str(prepared))
    quantization.quantize_static(
        str(prepared),
        str(int8),
        Images(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax,
    )
    prepared.unlink()
    return {
        "type": "int8",
        "format": "QDQ: weights int8 per output channel, activations uint8 (min-max ranges)",
        "calibration_images": len(batches),
        "calibration_source": str(source),
        "unreadable_calibration_images": unreadable,
        "fp32_model": FP32_NAME,
        # How far int8 strays from float32 where it was calibrated (likely more elsewhere).
        "calibration_probability_mae": _probability_difference(config, fp32, int8, batches),
    }


def _probability_difference(
    config: Config, fp32: Path, int8: Path, batches: list[np.ndarray]
) -> float:
    """Mean absolute difference of the two graphs' probabilities (sigmoid or softmax)."""
    sessions = [open_session(fp32), open_session(int8)]
    differences = []
    for batch in batches:
        logits = [
            torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
            for session in sessions
        ]
        if config.model.num_classes > 1:
            probabilities = [values.softmax(1) for values in logits]
        else:
            probabilities = [torch.sigmoid(values) for values in logits]
        differences.append(float((probabilities[0] - probabilities[1]).abs().mean()))
    return float(np.mean(differences))


def _describe(config: Config, provenance: Provenance, *, tta: str, opset: int) -> dict[str, Any]:
    """medseg.json: what any runtime needs around the graph, and the config medseg rebuilds from."""
    data, model = config.data, config.model
    mean, std = normalisation(data.channels)
    binary = model.num_classes == 1
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medseg_version": __version__,
        "source_checkpoint_sha256": provenance.sha256,
        "opset": opset,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", data.channels, "height", "width"],
            "dtype": "float32",
            "size": [data.image_size, data.image_size],
            "channels": data.channels,
            "channel_order": "RGB" if data.channels == 3 else "gray (ITU-R 601 luma of RGB)",
            "resize": "to size, aspect ratio not kept: area averaging where it shrinks, "
            "bilinear where it grows (OpenCV INTER_AREA / INTER_LINEAR)",
            "colour_constancy": _colour_step(data.colour_constancy),
            "contrast": _contrast_step(data.contrast),
            "scale": "uint8 pixel / 255, then (x - mean) / std per channel",
            "mean": list(mean),
            "std": list(std),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", model.num_classes, "height", "width"],
            "activation": "sigmoid" if binary else "softmax",
            "threshold": config.train.threshold if binary else None,
            "labels": list(data.labels) or ["background", "foreground"],
            "mask": "sigmoid(logits) > threshold, at the image's size after resizing the "
            "probabilities back"
            if binary
            else "arg-max over the classes of the probabilities resized to the image's size",
        },
        "tta": tta,
        "config": config.to_dict(),
    }


def _colour_step(method: str) -> str | None:
    """What medseg.json tells a runtime to do to the resized uint8 image before scaling."""
    if method == "none":
        return None
    return (
        f"{method}: per channel c, L_c = mean(x_c ** {SHADES_OF_GRAY_POWER}) ** "
        f"(1/{SHADES_OF_GRAY_POWER}) over the resized image; x_c * sqrt(mean(L ** 2)) / L_c, "
        "rounded and clipped to 0..255"
    )


def _contrast_step(method: str) -> str | None:
    """What medseg.json tells a runtime to do after the colour step, before scaling."""
    if method == "none":
        return None
    return (
        f"{method}: OpenCV createCLAHE(clipLimit={CLAHE_CLIP_LIMIT}, tileGridSize=({CLAHE_TILES}, "
        f"{CLAHE_TILES})) applied to the L channel of cv2.COLOR_RGB2LAB (then back to RGB); "
        "to each channel of a gray or other image"
    )


# --- ensembles --------------------------------------------------------------------------------

ENSEMBLE_USAGE = """\
```bash
medseg predict --checkpoint THIS_FOLDER -i images/ -o masks/  # every member, averaged
medseg evaluate --checkpoint THIS_FOLDER --data DATA_ROOT/test
```

```python
import medseg

predictor = medseg.Predictor.from_pretrained("THIS_FOLDER")  # an EnsemblePredictor
masks = predictor.masks([uint8_image])
model = medseg.load_pretrained("THIS_FOLDER/MEMBER")  # one member's nn.Module
```"""


@dataclass
class OnnxEnsemble:
    """What an ONNX ensemble's folder holds beyond one model's: its members for the card and
    medseg.json, and the networks its graph is checked against."""

    members: list[EnsembleMember]
    described: list[dict[str, Any]]
    networks: list[DeepLabV3Plus]
    shares: list[float]

    def verify(self, model, path: Path, *, channels: int, size: int) -> float:
        """The largest probability difference between the graph and the members run one by one
        in PyTorch, their probabilities averaged, on two random images at another size than the
        traced one; more than 1e-4 is refused, not shipped."""
        generator = torch.Generator().manual_seed(0)
        batch = torch.randn(2, channels, size + 16, size, generator=generator)
        with torch.no_grad():
            expected = sum(
                share * _probabilities(network.eval()(batch))
                for network, share in zip(self.networks, self.shares, strict=True)
            )
        try:
            (logits,) = open_session(path).run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
            found = float((_probabilities(torch.from_numpy(logits)) - expected).abs().max())
        except Exception as error:  # onnxruntime's own error types
            found = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        if isinstance(found, str) or not found <= 1e-4:
            raise MedsegError(
                f"the ONNX graph does not reproduce the ensemble's averaged probabilities on a "
                f"test batch ({found}); export --format safetensors instead, and report it"
            )
        return found


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits as probabilities: softmax over K classes, sigmoid for one."""
    return logits.softmax(1) if logits.shape[1] > 1 else logits.sigmoid()


def _member_names(source: ModelSource) -> list[tuple[str, str, int | None]]:
    """(name, folder, fold) of each member: "fold i" in fold_i/ where every member is a
    different fold, else "member j" in member_j/."""
    folds = [fold_of(leaf.path) for leaf, _ in source.leaves()]
    if None not in folds and len(set(folds)) == len(folds):
        return [(f"fold {fold}", f"fold_{fold}", fold) for fold in folds]
    return [(f"member {index}", f"member_{index}", None) for index in range(len(folds))]


def _load_member(
    source: ModelSource, leaf: ModelSource, first: tuple[ModelSource, Config] | None
) -> tuple[DeepLabV3Plus, Config, Provenance]:
    """One member's network, config and provenance, checked against the ``first`` member's."""
    model, config, provenance = _load_source(leaf, given=str(leaf.weights))
    if first is not None:
        check_compatible(*first, leaf, config)
        if config.model.num_classes == 1 and config.train.threshold != first[1].train.threshold:
            raise MedsegError(
                f"{first[0]} and {leaf} cut at different thresholds ({first[1].train.threshold}"
                f" and {config.train.threshold}); an export of {source} holds one: ensemble "
                f"models trained alike"
            )
    return model, config, provenance


def _export_ensemble(
    source: ModelSource, out: Path, *, format: str, overwrite: bool, quantize: str | None,
    calibration, opset: int, calibration_paths: list[Path],
) -> dict[str, Any]:  # fmt: skip
    """Every member of ``source`` into ``out``: a safetensors folder each with ensemble.json, or
    one ONNX graph averaging them. One member is in memory at a time for safetensors; the graph
    needs them all."""
    names = _member_names(source)
    result = {"out": str(out), "format": format, "source": str(source), "folds": source.folds}
    if format == "safetensors":
        with staged_export(out, overwrite=overwrite) as staging:
            members, described = _write_member_folders(staging, source, names)
            _write_ensemble_card(staging, source, members, described)
        folders = [f"{item['folder']}/" for item in described]
        return {
            **result,
            "sha256": [item["sha256"] for item in described],
            "files": [*folders, ENSEMBLE_NAME, "README.md"],
        }
    networks, members, described, first = [], [], [], None
    for (leaf, share), (name, _, fold) in zip(source.leaves(), names, strict=True):
        model, config, provenance = _load_member(source, leaf, first)
        first = first or (leaf, config)
        networks.append(model.eval().float())
        members.append(EnsembleMember(name, "", share, provenance))
        described.append(_member_entry(None, fold, share, provenance))
    shares = [share for _, share in source.leaves()]
    ensemble = OnnxEnsemble(members, described, networks, shares)
    config, provenance = first[1], _ensemble_provenance(source, members)
    with staged_export(out, overwrite=overwrite) as staging:
        files, quantization = _write_onnx_folder(
            staging, ProbabilityAverage(networks, shares), config, provenance,
            tta=resolve_tta("auto", config), opset=opset, quantize=quantize,
            calibration=calibration, calibration_paths=calibration_paths, ensemble=ensemble,
        )  # fmt: skip
    return {
        **result,
        "sha256": [item["sha256"] for item in described],
        "files": [*files, META_NAME, "README.md"],
        "quantization": quantization,
    }


def _write_member_folders(
    staging: Path, source: ModelSource, names: list[tuple[str, str, int | None]]
) -> tuple[list[EnsembleMember], list[dict[str, Any]]]:
    """Each member as a safetensors export in its folder, loaded and written one at a time."""
    members, described, first = [], [], None
    for (leaf, share), (name, folder, fold) in zip(source.leaves(), names, strict=True):
        model, config, provenance = _load_member(source, leaf, first)
        first = first or (leaf, config)
        save_pretrained(
            model, staging / folder, config=config, provenance=provenance,
            tta=resolve_tta("auto", config),
        )  # fmt: skip
        del model
        members.append(EnsembleMember(name, folder, share, provenance))
        described.append(_member_entry(folder, fold, share, provenance))
    return members, described


def _member_entry(folder: str | None, fold: int | None, share: float, provenance) -> dict:
    """A member as ensemble.json (or medseg.json's "ensemble") lists it."""
    entry = {"folder": folder} if folder else {}
    return {**entry, "fold": fold, "share": share, "source": provenance.source,
            "sha256": provenance.sha256}  # fmt: skip


def _ensemble_provenance(source: ModelSource, members: list[EnsembleMember]) -> Provenance:
    """The card's provenance of an ensemble; a k-fold run's evaluations of these very folds
    (evaluation-<data>/ for all folds, evaluation-<data>-folds-0-2/ for folds 0 and 2)."""
    run = RunFolder(source.path) if source.kind == KFOLD else None
    provenance = Provenance.of_ensemble(members, given=str(source), run=run)
    suffix = source.results_name("")
    provenance.evaluations = [
        summary
        for summary in provenance.evaluations
        if (summary["folder"].endswith(suffix) if suffix else "-folds-" not in summary["folder"])
    ]
    return provenance


def _write_ensemble_card(
    staging: Path, source: ModelSource, members: list[EnsembleMember], described: list[dict]
) -> None:
    """ensemble.json and the card of a safetensors ensemble (its members already written)."""
    config = load_pretrained(staging / members[0].folder)[1]
    folders = ", ".join(f"{member.folder}/" for member in members)
    card = model_card(
        config,
        _ensemble_provenance(source, members),
        files=f"{ENSEMBLE_NAME} (the members and their shares) and a folder per member "
        f"({folders}), each a safetensors export (model.safetensors, config.json) for PyTorch",
        tta=resolve_tta("auto", config),
        usage=ENSEMBLE_USAGE.replace("MEMBER", members[0].folder),
        ensemble=members,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    description = ensemble_description(described, source=str(source))
    (staging / ENSEMBLE_NAME).write_text(json.dumps(description, indent=2) + "\n", "utf-8")
