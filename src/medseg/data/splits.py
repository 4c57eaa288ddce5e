"""k-fold splits of a data root's ``train/``: stratified, disjoint, covering, and checked.

A split is nnU-Net's: ``{"train": [ids], "val": [ids]}``, one per fold, the ``val`` lists
disjoint and together every id of ``train/``. The ids are the images' (``<id>.png``), or for an
nnU-Net raw root the cases' (its slices ``<case>_z<k>`` stay together, so no fold validates on
slices of a volume it trained on).

`make_splits` stratifies so that every fold sees small and large cases: the units (images or
cases) are grouped by the classes they hold (label maps; one group for binary masks), sorted by
their foreground fraction within a group, and dealt out in runs of K, each run to the K folds in
a seeded random order (a run shorter than K to the folds holding the fewest). Each fold thus
gets one of every K neighbours in foreground size, and fold sizes differ by at most one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.core.errors import MedsegError
from medseg.core.progress import progress_bar
from medseg.data.dataset import read_dataset_info
from medseg.data.folder import Sample, train_pairs
from medseg.data.io import read_target

Split = dict[str, list[str]]  # {"train": [ids], "val": [ids]}

_SLICE = re.compile(r"^(?P<case>.+)_z\d+$")  # medseg.data.nnunet's slice names


@dataclass(frozen=True)
class Profile:
    """What stratification knows of a unit: its classes present (label maps), its foreground
    share of pixels."""

    classes: tuple[int, ...]
    foreground: float


def units_of(samples: list[Sample], *, by_case: bool) -> dict[str, list[Sample]]:
    """``{unit id: its samples}``: each sample its own unit, or (``by_case``, the slices of an
    nnU-Net root) the slices ``<case>_z<k>`` of one case together under ``<case>``."""
    units: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        match = _SLICE.match(sample.id) if by_case else None
        units[match["case"] if match else sample.id].append(sample)
    return dict(units)


def profiles(
    units: dict[str, list[Sample]], *, labels: tuple[str, ...], progress: bool = True
) -> dict[str, Profile]:
    """Each unit's `Profile`, from its masks read as training reads them (`read_target`)."""
    multi_class = len(labels) > 2
    found = {}
    bar = progress_bar(units.items(), desc="reading masks for the folds", enabled=progress)
    for unit, samples in bar:
        present: set[int] = set()
        foreground = pixels = 0
        for sample in samples:
            target = read_target(sample.mask, labels)
            values = np.unique(target)
            present.update(int(value) for value in values if value > 0)
            foreground += int(np.count_nonzero(target))
            pixels += target.size
        classes = tuple(sorted(present)) if multi_class else ()
        found[unit] = Profile(classes, foreground / max(pixels, 1))
    return found


def stratified_folds(units: dict[str, Profile], k: int, *, seed: int) -> list[Split]:
    """``k`` splits of the units (module docstring), each list sorted; the same for the same
    units, profiles and seed."""
    if k < 2:
        raise MedsegError(f"--folds {k} is impossible; cross-validation needs at least 2 folds")
    if len(units) < k:
        raise MedsegError(
            f"train/ holds {len(units)} {'case' if len(units) == 1 else 'cases'}, too few for "
            f"{k} folds (each fold validates on at least one); use --folds {max(2, len(units))} "
            f"or fewer"
        )
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for unit, profile in units.items():
        groups[profile.classes].append(unit)
    assigned: dict[int, list[str]] = {fold: [] for fold in range(k)}
    for classes in sorted(groups):
        ordered = sorted(groups[classes], key=lambda unit: (units[unit].foreground, unit))
        for start in range(0, len(ordered), k):
            run = ordered[start : start + k]
            for unit, fold in zip(run, _folds_for(len(run), assigned, rng), strict=True):
                assigned[fold].append(unit)
    every = sorted(units)
    splits = []
    for fold in range(k):
        val = set(assigned[fold])
        splits.append({"train": [u for u in every if u not in val], "val": sorted(val)})
    return splits


def _folds_for(count: int, assigned: dict[int, list[str]], rng) -> list[int]:
    """``count`` distinct folds in random order, among those holding the fewest units."""
    by_size = sorted(assigned, key=lambda fold: (len(assigned[fold]), rng.random()))
    chosen = by_size[:count]
    return [chosen[index] for index in rng.permutation(count)]


def make_splits(root: str | Path, *, k: int, seed: int, mask_suffix: str, by_case: bool,
                progress: bool = True) -> list[Split]:  # fmt: skip
    """Stratified ``k``-fold splits of ``root``'s ``train/`` (an image root: `image_root`)."""
    units = units_of(train_pairs(root, mask_suffix=mask_suffix), by_case=by_case)
    info = read_dataset_info(root)
    labels = info.labels if info is not None else ()
    return stratified_folds(profiles(units, labels=labels, progress=progress), k, seed=seed)


def check_splits(splits: object, units: set[str], *, where: str, k: int | None = None) -> None:
    """Refuse, in one line, splits that are not ``k`` disjoint folds covering ``units``
    exactly (the ids of ``train/`` now); ``where`` names the file."""
    advice = "it no longer matches the data: choose another --out, or move that run away"
    if not isinstance(splits, list) or not all(_is_split(split) for split in splits):
        raise MedsegError(f"{where} is not a list of {{'train': [...], 'val': [...]}} folds")
    if k is not None and len(splits) != k:
        raise MedsegError(
            f"{where} holds {len(splits)} folds, not the {k} of --folds {k}; continue that run "
            f"with --folds {len(splits)} (or --resume), or choose another --out for {k} folds"
        )
    seen: set[str] = set()
    for index, split in enumerate(splits):
        if set(split["val"]) & seen:
            raise MedsegError(f"{where}: fold {index} validates on ids of an earlier fold")
        seen |= set(split["val"])
    if seen != units:
        missing, extra = sorted(units - seen), sorted(seen - units)
        named = (
            f"{len(missing)} ids of train/ are in no fold (e.g. {missing[0]})"
            if missing
            else f"{len(extra)} ids are not in train/ (e.g. {extra[0]})"
        )
        raise MedsegError(f"{where} holds other splits than train/ now: {named}; {advice}")
    for index, split in enumerate(splits):
        if set(split["train"]) != units - set(split["val"]):
            raise MedsegError(
                f"{where}: fold {index} does not train on every id of train/ outside its val list"
            )


def _is_split(split: object) -> bool:
    return isinstance(split, dict) and all(
        isinstance(split.get(key), list) and all(isinstance(i, str) for i in split[key])
        for key in ("train", "val")
    )


def fold_samples(samples: list[Sample], split: Split) -> tuple[list[Sample], list[Sample]]:
    """The training and validation samples of one fold, in the order of ``samples``; a sample
    listed under its own id or its case's (``<case>_z<k>``). One in neither list is refused."""
    val, train = set(split["val"]), set(split["train"])

    def unit(sample: Sample) -> str:
        match = _SLICE.match(sample.id)
        for candidate in (sample.id, match["case"] if match else None):
            if candidate in val or candidate in train:
                return candidate
        raise MedsegError(
            f"{sample.image} is in no fold of the run's splits.json (train/ changed since the "
            f"folds were made); train on the data the run was started on, or start a new run"
        )

    units = [unit(sample) for sample in samples]
    return (
        [sample for sample, name in zip(samples, units, strict=True) if name not in val],
        [sample for sample, name in zip(samples, units, strict=True) if name in val],
    )
