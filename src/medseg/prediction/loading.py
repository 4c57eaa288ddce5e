"""Loading any kind of ``--checkpoint`` into a network ready to predict (one place, for every
command): a PyTorch checkpoint or safetensors export on the requested device and precision, or
an ONNX export's onnxruntime session on the CPU in float32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medseg.config import Config
from medseg.core.errors import MedsegError
from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from medseg.engine.runtime import Precision, select_device, select_precision
from medseg.formats.onnx import load_onnx
from medseg.formats.safetensors import CONFIG_NAME, load_pretrained
from medseg.formats.source import ONNX, SAFETENSORS, Checkpoint, ModelSource, resolve_source

# What a Predictor runs: a float (N, C, H, W) batch, normalised, to logits (N, K, H, W).
Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LoadedModel:
    network: torch.nn.Module | Network
    config: Config
    device: torch.device
    precision: Precision


def load_model(
    path: Checkpoint | ModelSource, *, device: str = "auto", precision: str = "auto"
) -> LoadedModel:
    """The network ``path`` names (`medseg.formats.source.resolve_source`) with its config;
    one model, not an ensemble (whose members are loaded one by one, each by this)."""
    source = resolve_source(path)
    if source.is_ensemble:
        raise MedsegError(
            f"{source} is {source.describe()}: load it with Predictor.from_checkpoint, which "
            f"averages its members"
        )
    path = source.path
    if source.kind == ONNX:
        return _load_onnx(path, device=device, precision=precision)
    if source.kind == SAFETENSORS:
        model, config = load_pretrained(path)
        if config.data.image_size == 0:
            raise MedsegError(
                f"{path}/{CONFIG_NAME} holds the model's arguments but no input size (it "
                f"was saved without the run's config); save it with save_pretrained(folder, "
                f"config=the run's config), or export the checkpoint with medseg export"
            )
    else:
        model, config = model_from_checkpoint(load_checkpoint(source.weights), path=path)
    torch_device = select_device(device)
    return LoadedModel(model, config, torch_device, select_precision(precision, torch_device))


def _load_onnx(path, *, device: str, precision: str) -> LoadedModel:
    if device not in ("auto", "cpu"):
        raise MedsegError(
            f"{path} is an ONNX model, which runs on the CPU through onnxruntime; leave "
            f"--device out (or pass cpu), or use the PyTorch checkpoint on {device}"
        )
    if precision not in ("auto", "fp32"):
        raise MedsegError(
            f"{path} is an ONNX model, which runs at the precision it was exported in; "
            f"leave the precision out (or pass fp32)"
        )
    network, config, _ = load_onnx(path)
    return LoadedModel(network, config, torch.device("cpu"), Precision("fp32", None))
