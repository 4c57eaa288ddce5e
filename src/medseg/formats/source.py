"""What ``--checkpoint`` names, decided in one place for every command and the Python API.

A checkpoint is one of: a ``.pt`` file that ``medseg train`` wrote; a run folder (its
``checkpoints/best.pt``); a safetensors export (``config.json`` and ``model.safetensors``); an
ONNX export (a folder with ``model.onnx`` and ``medseg.json``, or the ``.onnx`` file itself).

An ensemble is one of: a k-fold run (``splits.json`` and ``fold_0/`` ...: the folds' best.pt,
or those ``folds`` chooses); an exported ensemble (``ensemble.json`` and a safetensors folder per
member); several checkpoints given together (a list), each of any kind above, each counting
equally (a k-fold run among them: its folds share its part, as nnU-Net ensembles
configurations). Its `ModelSource` holds the members; the Predictor averages their
probabilities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.core.errors import MedsegError
from medseg.engine.run_folder import RunFolder
from medseg.formats.ensemble import (
    fold_folder,
    is_ensemble_export,
    is_kfold_run,
    kfold_count,
    read_ensemble,
)
from medseg.formats.onnx import META_NAME, onnx_paths
from medseg.formats.safetensors import CONFIG_NAME, WEIGHTS_NAME, is_pretrained

CHECKPOINT = "checkpoint"  # a .pt file, or a run folder's best.pt
SAFETENSORS = "safetensors"
ONNX = "onnx"
KFOLD = "kfold"  # a k-fold run: its folds' best.pt
ENSEMBLE = "ensemble"  # a folder medseg export wrote for an ensemble
SEVERAL = "several"  # several checkpoints given together

KINDS_HINT = (
    "a .pt file, a run folder (checkpoints/best.pt), a k-fold run (splits.json and fold_0/ ...), "
    "or a folder medseg export wrote (config.json and model.safetensors, model.onnx and "
    "medseg.json, or ensemble.json)"
)

Checkpoint = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--checkpoint``: its kind, the path given, and the file holding the weights
    (what a prediction record's SHA-256 is taken of); for an ensemble, its ``members`` (each a
    ModelSource) with their ``shares`` of the average (summing to 1) and, for folds, each
    member's fold number (``folds``), ``complete`` when every fold is there."""

    kind: str
    path: Path
    weights: Path | None = None  # None for an ensemble: see `weight_files`
    members: tuple[ModelSource, ...] = ()
    shares: tuple[float, ...] = ()
    folds: tuple[int, ...] = ()
    complete: bool = True

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    def leaves(self) -> list[tuple[ModelSource, float]]:
        """Every single model of the source with its share of the average (a lone model: 1)."""
        if not self.members:
            return [(self, 1.0)]
        return [
            (leaf, share * inner)
            for member, share in zip(self.members, self.shares, strict=True)
            for leaf, inner in member.leaves()
        ]

    @property
    def weight_files(self) -> list[Path]:
        """The weights file of every single model (`leaves`), in the order they are averaged."""
        return [leaf.weights for leaf, _ in self.leaves()]

    @property
    def run(self) -> RunFolder:
        """The run folder a checkpoint belongs to, or the export or k-fold run folder (for
        several checkpoints: the first's): where results of this model go by default."""
        if self.kind == CHECKPOINT:
            return RunFolder.of_checkpoint(self.weights)
        if self.kind == SEVERAL:
            return self.members[0].run
        return RunFolder(self.path if self.path.is_dir() else self.path.parent)

    def describe(self) -> str:
        if self.kind == KFOLD:
            return f"an ensemble of folds {_listed(self.folds)} of a k-fold run"
        if self.kind == ENSEMBLE:
            return f"an exported ensemble of {len(self.members)} models"
        if self.kind == SEVERAL:
            return f"an ensemble of {len(self.members)} checkpoints"
        return {
            CHECKPOINT: "a PyTorch checkpoint",
            SAFETENSORS: "a safetensors export",
            ONNX: "an ONNX export",
        }[self.kind]

    def results_name(self, name: str) -> str:
        """``name`` for this source's results beside its run (`run`): as is for one model or
        every fold, with the folds chosen, or the number of checkpoints, otherwise."""
        if self.kind == SEVERAL:
            return f"{name}-ensemble-of-{len(self.members)}"
        if not self.complete:
            return f"{name}-folds-{'-'.join(map(str, self.folds))}"
        return name

    def __str__(self) -> str:
        if self.kind == SEVERAL:
            return " + ".join(str(member) for member in self.members)
        if self.kind == KFOLD or not self.complete:
            return f"{self.path} (folds {_listed(self.folds)})"
        return str(self.path)


def _listed(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers))


def resolve_source(
    checkpoint: Checkpoint | ModelSource, *, folds: Sequence[int] | None = None
) -> ModelSource:
    """The `ModelSource` ``checkpoint`` names: a path, several paths (a list: an ensemble), or
    a ModelSource already resolved. ``folds`` chooses folds of a k-fold run or an exported
    ensemble (None: all of them) and is refused for any other model.

    A folder that is none of the kinds is refused in one line naming them; a missing .pt file
    is left to `medseg.engine.checkpoint.load_checkpoint`, which names it.
    """
    if isinstance(checkpoint, ModelSource):
        return checkpoint if folds is None else _single(checkpoint.path, folds)
    if isinstance(checkpoint, (list, tuple)):
        if len(checkpoint) == 1:
            return resolve_source(checkpoint[0], folds=folds)
        return _several(checkpoint, folds)
    return _single(Path(checkpoint), folds)


def _single(path: Path, folds: Sequence[int] | None) -> ModelSource:
    if is_ensemble_export(path):
        return _exported_ensemble(path, folds)
    if is_kfold_run(path):
        return _kfold_run(path, folds)
    if folds is not None:
        raise MedsegError(
            f"--folds {','.join(map(str, folds))} chooses folds of a k-fold run (a folder with "
            f"splits.json and fold_0/ ...), but {path} is not one; leave --folds out"
        )
    if is_pretrained(path):
        return ModelSource(SAFETENSORS, path, path / WEIGHTS_NAME)
    onnx = onnx_paths(path)
    if onnx is not None:
        return ModelSource(ONNX, path, onnx[0])
    if path.is_dir():
        # RunFolder names what the folder lacks, in one line.
        return ModelSource(CHECKPOINT, path, RunFolder(path).best_checkpoint(KINDS_HINT))
    return _file_source(path)


# Files medseg writes beside its models, which a --checkpoint may name by mistake.
NOT_CHECKPOINTS = {
    ".json": "a JSON file",
    ".yaml": "a YAML file",
    ".yml": "a YAML file",
    ".csv": "a table",
    ".safetensors": "a safetensors file without its config.json",
    ".md": "a text file",
    ".png": "an image",
}


def _file_source(path: Path) -> ModelSource:
    """A file given as --checkpoint: a file of an export folder stands for the export (its
    weights, config.json or medseg.json); a file that cannot be a checkpoint is named; any
    other is taken as a .pt file, which `medseg.engine.checkpoint.load_checkpoint` checks."""
    folder = path.parent
    if path.name in (WEIGHTS_NAME, CONFIG_NAME) and is_pretrained(folder):
        return ModelSource(SAFETENSORS, folder, folder / WEIGHTS_NAME)
    onnx = onnx_paths(folder) if path.name == META_NAME else None
    if onnx is not None:
        return ModelSource(ONNX, folder, onnx[0])
    kind = NOT_CHECKPOINTS.get(path.suffix.lower())
    if kind is not None and path.is_file():
        raise MedsegError(f"{path} is {kind}, not a model; --checkpoint takes {KINDS_HINT}")
    return ModelSource(CHECKPOINT, path, path)


def _kfold_run(path: Path, folds: Sequence[int] | None) -> ModelSource:
    """The folds of a k-fold run (all of them, or ``folds``), each its fold_<i>/ best.pt."""
    count = kfold_count(path)
    chosen = _choose_folds(list(range(count)), folds, where=f"{path} (a {count}-fold run)")
    members, unfinished = [], []
    for fold in chosen:
        run = RunFolder(path / fold_folder(fold))
        best = next((file for file in (run.best, run.path / "best.pt") if file.is_file()), None)
        if best is None:
            unfinished.append(fold)
        else:
            members.append(ModelSource(CHECKPOINT, run.path, best))
    if unfinished:
        finished = [fold for fold in chosen if fold not in unfinished]
        hint = (
            f"train them first, or choose finished ones with --folds {','.join(map(str, finished))}"
            if finished
            else "train them first"
        )
        raise MedsegError(
            f"{path}: fold{'s' * (len(unfinished) > 1)} {_listed(unfinished)} of its {count} "
            f"folds ha{'ve' if len(unfinished) > 1 else 's'} no checkpoints/best.pt yet "
            f"(not trained, or no epoch finished); {hint}"
        )
    shares = tuple(1 / len(members) for _ in members)
    return ModelSource(
        KFOLD, path, None, tuple(members), shares, tuple(chosen), complete=len(chosen) == count
    )


def _exported_ensemble(path: Path, folds: Sequence[int] | None) -> ModelSource:
    """An ensemble ``medseg export`` wrote (ensemble.json), all members or those of ``folds``."""
    described = read_ensemble(path)
    numbers = [member["fold"] for member in described]
    if folds is not None:
        if any(not isinstance(number, int) for number in numbers):
            raise MedsegError(
                f"--folds chooses folds, but the members of the ensemble {path} are not all "
                f"folds of one k-fold run; leave --folds out"
            )
        chosen = _choose_folds(numbers, folds, where=f"the ensemble {path}")
        described = [member for member in described if member["fold"] in chosen]
    members = []
    for member in described:
        folder = path / member["folder"]
        if not is_pretrained(folder):
            raise MedsegError(
                f"{folder} lacks model.safetensors or config.json, which {path}/ensemble.json "
                f"lists; export the ensemble again with: medseg export"
            )
        members.append(ModelSource(SAFETENSORS, folder, folder / WEIGHTS_NAME))
    total = sum(member["share"] for member in described)
    return ModelSource(
        ENSEMBLE,
        path,
        None,
        tuple(members),
        tuple(member["share"] / total for member in described),
        tuple(member["fold"] for member in described if isinstance(member["fold"], int)),
        complete=folds is None,
    )


def _choose_folds(available: list[int], folds: Sequence[int] | None, *, where: str) -> list[int]:
    """``folds`` (each once, each one of ``available``), or all of ``available`` for None."""
    if folds is None:
        return available
    folds = list(folds)
    repeated = sorted({fold for fold in folds if folds.count(fold) > 1})
    missing = [fold for fold in folds if fold not in available]
    if not folds or repeated or missing:
        problem = (
            "no fold is chosen"
            if not folds
            else f"fold {repeated[0]} is chosen twice"
            if repeated
            else f"there is no fold {missing[0]}"
        )
        raise MedsegError(
            f"{where} has folds {_listed(available)}; {problem}: choose among them, "
            f"e.g. --folds {','.join(map(str, available[:2]))}"
        )
    return folds


def _several(checkpoints: Sequence, folds: Sequence[int] | None) -> ModelSource:
    """Several checkpoints as one ensemble, each an equal share; ``folds`` applies to those that
    have folds (k-fold runs, exported ensembles of folds)."""
    if not checkpoints:
        raise MedsegError("no --checkpoint given; pass at least one")
    takes_folds = [is_kfold_run(path) or is_ensemble_export(path) for path in checkpoints]
    if folds is not None and not any(takes_folds):
        raise MedsegError(
            f"--folds {','.join(map(str, folds))} chooses folds of a k-fold run (a folder with "
            f"splits.json and fold_0/ ...), but none of the {len(checkpoints)} checkpoints is "
            f"one; leave --folds out"
        )
    members = tuple(
        _single(Path(path), folds if takes else None)
        for path, takes in zip(checkpoints, takes_folds, strict=True)
    )
    seen: dict[Path, ModelSource] = {}
    for member in members:
        for leaf, _ in member.leaves():
            key = leaf.weights.resolve()
            if key in seen:
                raise MedsegError(
                    f"{leaf.weights} is in the ensemble twice (through {seen[key]} and "
                    f"{member}); name each model once"
                )
            seen[key] = member
    shares = tuple(1 / len(members) for _ in members)
    return ModelSource(SEVERAL, members[0].path, None, members, shares)
