"""Running an ONNX export: its graph in onnxruntime, its settings from medseg.json beside it.

The graph holds the network alone (normalised image in, logits out); everything around it,
resizing, normalising, TTA, softmax or sigmoid, thresholds and post-processing, is the
Predictor's own code, run on the session's logits exactly as on the PyTorch model's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from medseg.config import Config, config_from_saved
from medseg.core.errors import MedsegError
from medseg.core.optional import require
from medseg.formats.folder import read_json

FORMAT = "medseg-onnx"
FORMAT_VERSION = 1
ONNX_NAME = "model.onnx"
FP32_NAME = "model-fp32.onnx"  # with --quantize int8: the float model beside the int8 one
META_NAME = "medseg.json"
INPUT_NAME = "image"  # float32 (N, C, H, W), normalised
OUTPUT_NAME = "logits"  # float32 (N, K, H, W)
ONNX_PACKAGE = {"extra": "medseg[onnx]", "purpose": "running an ONNX model"}


def onnx_paths(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """(model, medseg.json) when ``path`` names an ONNX export: a folder holding model.onnx or
    medseg.json, or a .onnx file; None for anything else (a .pt file, a run folder)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx" and not path.is_dir():
        return path, path.parent / META_NAME
    if path.is_dir() and ((path / ONNX_NAME).is_file() or (path / META_NAME).is_file()):
        return path / ONNX_NAME, path / META_NAME
    return None


class OnnxNetwork:
    """An onnxruntime session called as the PyTorch model is: a float (N, C, H, W) tensor in,
    logits (N, K, H, W) out, on the CPU."""

    def __init__(self, session, path: Path):
        self.session = session
        self.path = path
        self.input = session.get_inputs()[0].name
        self.output = session.get_outputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # TTA views are flipped or turned views of the batch: onnxruntime needs C-ordered memory.
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run([self.output], {self.input: array})
        return torch.from_numpy(logits)


def open_session(path: Path):
    """An onnxruntime CPU session for the graph at ``path``; a file it cannot read is refused."""
    onnxruntime = require("onnxruntime", **ONNX_PACKAGE)
    options = onnxruntime.SessionOptions()
    # As many threads as torch uses here, so --device cpu means the same load either way.
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    try:
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own types for a bad or missing file
        raise MedsegError(
            f"{path} is not a readable ONNX model (truncated or corrupt?): "
            f"{type(error).__name__}: {error}".splitlines()[0][:300]
            + "; export it again with: medseg export --format onnx"
        ) from error


def load_onnx(path: str | os.PathLike) -> tuple[OnnxNetwork, Config, dict]:
    """The session, the config and the medseg.json of an ONNX export (see `onnx_paths`).

    A graph without its medseg.json, or one that does not fit it (other input channels, other
    output classes), is refused in one line; so is a medseg.json whose description for other
    runtimes (``input``, ``output``) contradicts its own config.
    """
    paths = onnx_paths(path)
    if paths is None:
        raise MedsegError(f"{path} is not an ONNX export (no {ONNX_NAME} there)")
    model_path, meta_path = paths
    advice = "export the model again with: medseg export --format onnx"
    if not model_path.is_file():
        raise MedsegError(f"ONNX model not found: {model_path}; {advice}")
    if not meta_path.is_file():
        raise MedsegError(
            f"{model_path} has no {META_NAME} beside it, which says how to feed it (input size, "
            f"normalisation, classes, threshold); {advice}, which writes both"
        )
    meta = read_json(meta_path, advice=advice)
    if meta.get("format") != FORMAT:
        raise MedsegError(f"{meta_path} is not a medseg ONNX description (no 'format: {FORMAT}')")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MedsegError(
            f"{meta_path} was written by a newer medseg (format version {version}); upgrade medseg"
        )
    if not isinstance(meta.get("config"), dict):
        raise MedsegError(f"{meta_path} lacks the model's config; {advice}")
    config = config_from_saved(meta["config"], source=str(meta_path))
    session = open_session(model_path)
    _check_graph(session, config, model_path, meta_path)
    _check_description(meta, config, meta_path)
    return OnnxNetwork(session, model_path), config, meta


def described(config: Config) -> dict[str, object]:
    """What medseg.json's ``input`` and ``output`` say of the network, by dotted key: written by
    the export, checked against the config on load."""
    labels = list(config.data.labels) or ["background", "foreground"]
    return {
        "input.channels": config.data.channels,
        "input.size": [config.data.image_size] * 2,
        "output.shape": ["batch", config.model.num_classes, "height", "width"],
        "output.labels": labels,
    }


def _check_description(meta: dict, config: Config, meta_path: Path) -> None:
    """Refuse a medseg.json whose ``input`` or ``output`` (what runtimes other than medseg
    read) disagrees with its ``config`` (what medseg runs): one of them was edited. An entry
    left out is not checked."""
    for key, expected in described(config).items():
        section, _, name = key.partition(".")
        part = meta.get(section)
        found = part.get(name) if isinstance(part, dict) else None
        if found is not None and found != expected:
            raise MedsegError(
                f"{meta_path}: {key} is {found!r} but its config describes {expected!r} (the "
                f"file was edited); export the model again with: medseg export --format onnx"
            )


def _check_graph(session, config: Config, model_path: Path, meta_path: Path) -> None:
    """The graph must take the config's channels and return its classes, each as (N, ·, H, W).

    A class count the graph does not state (medseg's exports state it) is read from its output
    on a small blank image.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    advice = "export it again with: medseg export --format onnx"
    for what, tensors, wanted in [
        ("input channels", inputs, config.data.channels),
        ("output channels", outputs, config.model.num_classes),
    ]:
        shape = tensors[0].shape if len(tensors) == 1 else None
        if shape is None or len(shape) != 4:
            described = [tuple(tensor.shape) for tensor in tensors]
            raise MedsegError(
                f"{model_path} is not a medseg network (its {what.split()[0]}s are {described}, "
                f"not one (N, C, H, W) tensor); {advice}"
            )
        found = shape[1]
        if not isinstance(found, int) and tensors is outputs:
            side = config.data.image_size or 64  # a patch model's graph takes no less
            probe = np.zeros((1, config.data.channels, side, side), np.float32)
            try:
                found = session.run(None, {inputs[0].name: probe})[0].shape[1]
            except Exception as error:  # onnxruntime's own error types
                raise MedsegError(
                    f"{model_path} does not run on a {config.data.channels}-channel image as "
                    f"{meta_path.name} describes ({type(error).__name__}); {advice}"
                ) from error
        if isinstance(found, int) and found != wanted:
            raise MedsegError(
                f"{model_path} has {found} {what} but {meta_path.name} describes {wanted} "
                f"(the two files come from different models); {advice}"
            )
