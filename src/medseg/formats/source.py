"""What ``--checkpoint`` names, decided in one place for every command and the Python API.

A checkpoint is one of: a ``.pt`` file that ``medseg train`` wrote; a run folder (its
``checkpoints/best.pt``); a safetensors export (``config.json`` and ``model.safetensors``); an
ONNX export (a folder with ``model.onnx`` and ``medseg.json``, or the ``.onnx`` file itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medseg.engine.run_folder import RunFolder
from medseg.formats.onnx import onnx_paths
from medseg.formats.safetensors import WEIGHTS_NAME, is_pretrained

CHECKPOINT = "checkpoint"  # a .pt file, or a run folder's best.pt
SAFETENSORS = "safetensors"
ONNX = "onnx"

KINDS_HINT = (
    "a .pt file, a run folder (checkpoints/best.pt), or a folder medseg export wrote "
    "(config.json and model.safetensors, or model.onnx and medseg.json)"
)


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--checkpoint``: its kind, the path given, and the file holding the weights
    (what a prediction record's SHA-256 is taken of)."""

    kind: str
    path: Path
    weights: Path

    @property
    def run(self) -> RunFolder:
        """The run folder a checkpoint belongs to, or the export folder: where results of this
        model go by default."""
        if self.kind == CHECKPOINT:
            return RunFolder.of_checkpoint(self.weights)
        return RunFolder(self.path if self.path.is_dir() else self.path.parent)

    def describe(self) -> str:
        return {
            CHECKPOINT: "a PyTorch checkpoint",
            SAFETENSORS: "a safetensors export",
            ONNX: "an ONNX export",
        }[self.kind]


def resolve_source(path: str | os.PathLike) -> ModelSource:
    """The `ModelSource` ``path`` names. A folder that is none of the kinds is refused in one
    line naming them; a missing .pt file is left to `medseg.engine.checkpoint.load_checkpoint`,
    which names it."""
    path = Path(path)
    if is_pretrained(path):
        return ModelSource(SAFETENSORS, path, path / WEIGHTS_NAME)
    onnx = onnx_paths(path)
    if onnx is not None:
        return ModelSource(ONNX, path, onnx[0])
    if path.is_dir():
        # RunFolder names what the folder lacks, in one line.
        return ModelSource(CHECKPOINT, path, RunFolder(path).best_checkpoint(KINDS_HINT))
    return ModelSource(CHECKPOINT, path, path)
