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
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config import Config, config_from_saved
from medseg.core.errors import MedsegError
from medseg.core.files import atomic_path
from medseg.engine.run_folder import RunFolder
from medseg.model import DeepLabV3Plus

FORMAT = "medseg-checkpoint"
VERSION = 1
CLASSIFIER_WEIGHT = "decoder.classifier.weight"  # (num_classes, C, 1, 1): tells the class count


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically: a crash leaves the previous file intact."""
    with atomic_path(path) as temporary:
        try:
            torch.save({"format": FORMAT, "version": VERSION, **state}, temporary)
        except RuntimeError as error:
            # torch's zip writer reports a failed write (a full disk, mostly) as a RuntimeError.
            free = shutil.disk_usage(temporary.parent).free
            raise OSError(
                f"the write failed ({str(error).splitlines()[0]}); {free:,} bytes free there"
            ) from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a medseg checkpoint; a one-line MedsegError says what is wrong with it."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise MedsegError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise MedsegError(
                f"{path} is not a readable checkpoint (not a PyTorch file, or corrupt): "
                f"{str(error).splitlines()[0][:120]}; pass a .pt file written by medseg train"
            ) from error
        raise MedsegError(
            f"{path} was refused: it holds Python objects beyond tensors and plain data, which "
            f"medseg never unpickles (it may carry code); use a checkpoint written by medseg train"
        ) from error
    except Exception as error:  # a damaged file fails in many ways (zip, pickle, EOF, key errors)
        raise MedsegError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {error}".splitlines()[0][:300]
            + "; pass a complete .pt file written by medseg train"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedsegError(
            f"{path} is not a medseg checkpoint (no 'format: {FORMAT}' entry); pass a .pt file "
            f"written by medseg train (a bare state dict lacks the settings needed to predict)"
        )
    if state.get("version", 0) > VERSION:
        raise MedsegError(
            f"{path} was written by a newer medseg (checkpoint version {state['version']}); upgrade medseg"
        )
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: the file itself, or a run folder's checkpoints/best.pt."""
    path = Path(path)
    return RunFolder(path).best_checkpoint() if path.is_dir() else path


def model_from_checkpoint(
    state: dict[str, Any], *, path: str | Path = "checkpoint"
) -> tuple[DeepLabV3Plus, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights (no download)."""
    missing = [key for key in ("config", "model") if not isinstance(state.get(key), dict)]
    if missing:
        raise MedsegError(
            f"{path} lacks {' and '.join(missing)}; pass a checkpoint written by medseg train"
        )
    config = config_of_checkpoint(state, path=path)
    model = DeepLabV3Plus.from_config(config.model, pretrained=False)
    load_weights(model, state["model"], path=path)
    # Checkpoints written before training zeroed them hold random values there.
    model.zero_taps_out_of_reach(config.data.image_size)
    return model, config


def config_of_checkpoint(state: dict[str, Any], *, path: str | Path) -> Config:
    """The validated settings a checkpoint was trained with."""
    return config_from_saved(state["config"], source=str(path))


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
            f"{len(unexpected)} unexpected (first: {first!r}); its weights do not match its "
            f"settings, so use the checkpoint medseg train wrote"
        )
    for key, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise MedsegError(f"{path} is damaged: {key} is not a tensor")
        if tensor.shape == expected[key].shape:
            continue
        if key == CLASSIFIER_WEIGHT:
            raise MedsegError(
                f"{path} was made for {tensor.shape[0]} classes; medseg segments one foreground "
                f"class (binary masks), so use a checkpoint trained by medseg"
            )
        raise MedsegError(
            f"{path} was made for another model: {key} has shape {tuple(tensor.shape)}, "
            f"this model expects {tuple(expected[key].shape)}; use the checkpoint medseg train wrote"
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
        "numpy_gauss": [int(numpy_state[3]), float(numpy_state[4])],  # the cached 2nd Gaussian
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1] or None))
    has_gauss, cached_gauss = state.get("numpy_gauss", (0, 0.0))  # absent in older checkpoints
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            int(has_gauss),
            float(cached_gauss),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
