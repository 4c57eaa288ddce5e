"""Checkpoints: everything needed to predict (and to resume), written atomically, read safely.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, loaded with
``torch.load(weights_only=True)``: a file that carries pickled code is refused, never run.

Keys: ``format`` (marks a medseg checkpoint), ``version``, ``config`` (the resolved run config,
which holds the model arguments, the image size and the threshold), ``model`` (state dict),
``epoch``, ``metrics``; for resuming also ``optimizer``, ``scheduler``, ``scaler``, ``rng``,
``best_dice``, ``epochs_without_improvement``.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config import Config, config_from_dict
from medseg.errors import MedsegError
from medseg.files import atomic_path
from medseg.model import DeepLabV3Plus

FORMAT = "medseg-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically: a crash leaves the previous file intact."""
    with atomic_path(path) as temporary:
        torch.save({"format": FORMAT, "version": VERSION, **state}, temporary)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a medseg checkpoint; a one-line MedsegError says what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        path = _checkpoint_in_run(path)
    if not path.is_file():
        raise MedsegError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise MedsegError(
            f"{path} was refused: it holds Python objects beyond tensors and plain data, which "
            f"medseg never unpickles (it may carry code); "
            f"{str(error).splitlines()[0][:120]}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise MedsegError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {error}".splitlines()[0]
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedsegError(f"{path} is not a medseg checkpoint (no 'format: {FORMAT}' entry)")
    if state.get("version", 0) > VERSION:
        raise MedsegError(
            f"{path} was written by a newer medseg (checkpoint version {state['version']}); upgrade medseg"
        )
    return state


def model_from_checkpoint(
    state: dict[str, Any], *, path: str | Path = "checkpoint"
) -> tuple[DeepLabV3Plus, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights (no download)."""
    config = config_from_dict(state["config"], source=str(path))
    model = build_model(config, pretrained=False)
    load_weights(model, state["model"], path=path)
    return model, config


def build_model(config: Config, *, pretrained: bool | str | None = None) -> DeepLabV3Plus:
    """The DeepLabV3Plus a config describes (``pretrained`` overrides the config's choice)."""
    model_config = config.model
    return DeepLabV3Plus(
        num_classes=1,
        backbone=model_config.backbone,
        variant=model_config.variant,
        output_stride=model_config.output_stride,
        pretrained=model_config.pretrained if pretrained is None else pretrained,
        aspp_dropout=model_config.aspp_dropout,
    )


def load_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], *, path: str | Path
) -> None:
    """Load a state dict, turning a mismatch into a one-line error naming the first difference."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise MedsegError(
            f"{path} was made for another model: {len(missing)} weights missing and "
            f"{len(unexpected)} unexpected (first: {first!r})"
        )
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise MedsegError(
                f"{path} was made for another model: {key} has shape {tuple(tensor.shape)}, "
                f"this model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(weights)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states as plain data (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1] or None))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_in_run(run_dir: Path) -> Path:
    for candidate in (run_dir / "checkpoints" / "best.pt", run_dir / "best.pt"):
        if candidate.is_file():
            return candidate
    raise MedsegError(
        f"{run_dir} is a folder without checkpoints/best.pt; pass the .pt file itself"
    )
