"""k-fold cross-validation runs: their folder, their splits, and training their folds.

```
RUN/
  splits.json        nnU-Net's: [{"train": [ids], "val": [ids]}, ...], written first, then reused
  config.yaml        the settings every fold trains with (as given; each fold plans its own copy)
  run.json           where the data is, so --resume needs no --data
  train.log          what the console showed, every command on this run one after the other
  fold_0/ ... fold_{K-1}/   each a run folder (`medseg.engine.run_folder.RunFolder`)
  cv_summary.json    written by `medseg.commands.crossval` once every fold has finished
```

`train_folds` trains the folds one after another (all, or one: ``--fold i``, so folds can run
on several machines or days), each as `fit` trains a run, on its split of ``train/``
(`medseg.data.splits`). A fold already finished is kept; one started and stopped continues
with ``--resume``. A run is never mixed: another K, splits that no longer cover ``train/``, or
other settings than the run's config.yaml are refused before anything is written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.config import Config, read_saved_config, save_config
from medseg.core import console
from medseg.core.errors import MedsegError
from medseg.core.files import make_folder, write_text
from medseg.data.folder import train_pairs
from medseg.data.layout import image_root
from medseg.data.splits import Split, check_splits, make_splits, units_of
from medseg.engine.checkpoint import config_of_checkpoint, load_checkpoint
from medseg.engine.run_folder import RunFolder
from medseg.engine.runtime import init_distributed, releases_process_group, select_device
from medseg.engine.train import finish_reason, fit, with_changes

SPLITS_NAME = "splits.json"
SUMMARY_NAME = "cv_summary.json"
LOG_NAME = "train.log"
FOLD_FOLDER = re.compile(r"^fold_(\d+)$")
# What a fold may set otherwise than its run's config.yaml: where it trains, not what it learns.
MACHINE_SETTINGS = ("train.device", "data.num_workers")


class KFoldRun:
    """The files of a k-fold run (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.splits = self.path / SPLITS_NAME
        self.summary = self.path / SUMMARY_NAME
        self.config = self.path / "config.yaml"
        self.log = self.path / LOG_NAME
        self.record = RunFolder(self.path)  # run.json: the data root

    def fold(self, index: int) -> RunFolder:
        return RunFolder(self.path / f"fold_{index}")

    @staticmethod
    def holds(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a k-fold run (it has splits.json)."""
        return (Path(path) / SPLITS_NAME).is_file()

    @classmethod
    def of_fold(cls, path: str | os.PathLike) -> tuple[KFoldRun, int] | None:
        """The k-fold run and fold number of a fold's folder (``RUN/fold_1``), else None."""
        path = Path(path)
        match = FOLD_FOLDER.match(path.resolve().name)
        if match is None or not cls.holds(path.resolve().parent):
            return None
        return cls(path.resolve().parent), int(match[1])

    def read_splits(self) -> list[Split]:
        try:
            return json.loads(self.splits.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise MedsegError(
                f"{self.splits} cannot be read ({type(error).__name__}); it is written by "
                f"medseg train --folds K: restore it, or start the run again in another --out"
            ) from error


@dataclass
class FoldsStatus:
    """What `train_folds` left: the run, its K, which folds have finished, what ran now."""

    run: KFoldRun
    folds: int
    finished: list[int]
    trained: dict[int, dict[str, Any]] = field(default_factory=dict)  # fit's summaries

    @property
    def complete(self) -> bool:
        return len(self.finished) == self.folds


@releases_process_group
def train_folds(
    config: Config | None, data_root: str | Path, out: str | Path, *, folds: int | None = None,
    fold: int | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
    changes: dict[str, Any] | None = None, **logging,
) -> FoldsStatus:  # fmt: skip
    """Train the folds of the k-fold run ``out`` (all, or only ``fold``) on ``data_root``.

    A new run needs ``folds`` (K ≥ 2); its splits are made and written first. On an existing run
    ``folds`` must equal its K. ``resume`` continues the run with its own settings (``config``
    ignored; ``changes`` may set `medseg.engine.train.RESUMABLE_SETTINGS`). ``logging``: fit's
    ``log`` and ``images_every``.
    """
    run = KFoldRun(out)
    images = image_root(data_root)
    if resume:
        config = with_changes(_saved_config(run), changes or {}, run.record)
    else:
        config = config or Config()
        _refuse_other_run(run, config)
    by_case = Path(images) != Path(data_root)  # an nnU-Net root's slices: folds of cases
    pairs = train_pairs(images, mask_suffix=config.data.mask_suffix)
    units = set(units_of(pairs, by_case=by_case))
    splits = _splits(
        run, config, images, units, k=folds, by_case=by_case, progress=progress and _is_main()
    )
    chosen = _chosen(run, len(splits), fold)
    # Under torchrun, one process group for every fold (fit leaves a group it did not make).
    init_distributed(select_device(config.train.device))
    if not resume:
        _refuse_started(run, chosen, overwrite)
    if _is_main():
        _write_start(run, config, data_root, splits)
    status = FoldsStatus(run, len(splits), finished=[])
    unit = "cases" if by_case else "images"
    for index in chosen:
        target, split = run.fold(index), splits[index]
        _say(
            f"fold {index} of {run.path} ({len(splits)} folds): {len(split['train'])} training / "
            f"{len(split['val'])} validation {unit}"
        )
        if not resume and not overwrite and fold_finished(target):
            _say(f"fold {index} has finished already; kept as it is")
            continue
        started = resume and (target.last.is_file() or target.config.is_file())
        status.trained[index] = fit(
            None if started else config, data_root, target.path, resume=started,
            overwrite=overwrite, progress=progress, changes=changes if started else None,
            split=split, **logging,
        )  # fmt: skip
    status.finished = [index for index in range(len(splits)) if fold_finished(run.fold(index))]
    return status


def _saved_config(run: KFoldRun) -> Config:
    if not run.config.is_file():
        raise MedsegError(
            f"{run.path} has no config.yaml, so it is no k-fold run medseg started; start one "
            f"with --data, --out and --folds K"
        )
    return read_saved_config(run.config)


def _refuse_other_run(run: KFoldRun, config: Config) -> None:
    """A folder holding a single run, or a k-fold run trained with other settings, is refused."""
    if RunFolder(run.path).results():
        raise MedsegError(
            f"{run.path} holds a single training run, not a k-fold run; choose another --out "
            f"for the folds"
        )
    if not run.config.is_file():
        return
    saved, given = _flat(read_saved_config(run.config)), _flat(config)
    differing = [
        f"{key} ({given[key]!r}, not {saved.get(key)!r})"
        for key in given
        if key not in MACHINE_SETTINGS and given[key] != saved.get(key)
    ]
    if differing:
        raise MedsegError(
            f"{run.path} trains its folds with the settings of its config.yaml; this command "
            f"differs in {', '.join(differing[:3])}{' and more' if len(differing) > 3 else ''}: "
            f"pass the settings the run was started with, or choose another --out"
        )


def _flat(config: Config) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        for key, value in values.items()
    }


def _splits(run: KFoldRun, config: Config, images, units: set[str], *, k: int | None,
            by_case: bool, progress: bool) -> list[Split]:  # fmt: skip
    """The run's splits.json, checked against ``k`` and ``train/`` now; else new ones."""
    if run.splits.is_file():
        splits = run.read_splits()
        check_splits(splits, units, where=str(run.splits), k=k)
        return splits
    if k is None:
        raise MedsegError(
            f"{run.path} has no splits.json: it is no k-fold run; start one with --folds K"
        )
    return make_splits(
        images, k=k, seed=config.train.seed, mask_suffix=config.data.mask_suffix,
        by_case=by_case, progress=progress,
    )  # fmt: skip


def _chosen(run: KFoldRun, k: int, fold: int | None) -> list[int]:
    if fold is None:
        return list(range(k))
    if not 0 <= fold < k:
        raise MedsegError(
            f"--fold {fold} is not a fold of {run.path}: its {k} folds are numbered 0 to {k - 1}"
        )
    return [fold]


def _refuse_started(run: KFoldRun, chosen: list[int], overwrite: bool) -> None:
    """Before any fold trains: a fold started but not finished continues with --resume."""
    if overwrite:
        return
    for index in chosen:
        target = run.fold(index)
        if target.results() and not fold_finished(target):
            raise MedsegError(
                f"fold {index} of {run.path} was started and has not finished; continue it "
                f"with: medseg train --resume {run.path} --fold {index} (or pass --overwrite to "
                f"train it again)"
            )


def _write_start(run: KFoldRun, config: Config, data_root, splits: list[Split]) -> None:
    """splits.json first (kept once written), then the settings and the data's place."""
    make_folder(run.path)
    if not run.splits.is_file():
        write_text(run.splits, json.dumps(splits, indent=1))
    save_config(config, run.config)
    run.record.write_record(data_root)
    recording = console.current()
    if recording is not None:  # the k-fold run's own train.log: every fold's lines
        recording.attach(run.log, append=True)


def fold_finished(run: RunFolder) -> bool:
    """Whether a fold's run has trained all its epochs, stopped early, or ended at its time
    limit (its last.pt says)."""
    if not run.last.is_file():
        return False
    checkpoint = load_checkpoint(run.last)
    return finish_reason(checkpoint, config_of_checkpoint(checkpoint, path=run.last)) is not None


def _say(line: str) -> None:
    if _is_main():
        print(line)


def _is_main() -> bool:
    """Rank 0 under torchrun (each rank computes the same splits; one writes the files)."""
    return int(os.environ.get("RANK", 0)) == 0
