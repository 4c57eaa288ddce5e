"""``medseg tune``: a hyperparameter search with Optuna, kept whole in one study folder.

```
STUDY/
  search_space.yaml   the settings each trial draws and their values (written on the first run)
  study.db            the Optuna study (SQLite): every trial, its settings, its Dice by epoch
  trial_000/ ...      each trial's run folder (config.yaml, metrics.csv, checkpoints/best.pt)
  trials.csv          one row per trial: state, best validation Dice, epochs, settings, time
  trials.png          validation Dice by epoch of every trial, and the best trial so far
  best_config.yaml    the best trial's settings, for ``medseg train --config``
```

Each trial is a short training (``epochs`` epochs, `medseg.engine.train.fit`) with the study's
base settings and the values it drew, scored by its best validation Dice on the data's usual
validation images (``val/``, or the seeded share of ``train/``): the same images for every
trial. After each epoch its validation Dice goes to Optuna's pruner, which stops a trial that
trails the others at the same epoch. Running the command again on the folder continues the
study: finished trials are kept, and a killed trial is marked failed (after `GRACE_SECONDS`
without a heartbeat) and does not count.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.config import Config, build_config, config_from_dict, save_config
from medseg.core.errors import MedsegError
from medseg.core.files import check_writable, make_folder, write_csv, write_text
from medseg.core.optional import require
from medseg.data.folder import find_split, train_val_samples
from medseg.data.layout import image_root
from medseg.drawing import plot_trials
from medseg.engine.run_folder import RunFolder
from medseg.engine.train import fit

SPACE_NAME = "search_space.yaml"
DATABASE_NAME = "study.db"
STUDY_NAME = "medseg-tune"
TRIAL_EPOCHS = 10  # a trial's length unless --epochs says otherwise
HEARTBEAT_SECONDS = 30  # a running trial says it is alive this often ...
GRACE_SECONDS = 120  # ... and is taken for killed after this long without a word
# Settings a trial may not draw: they change the hold-out every trial is scored on, or the
# trial's length (--epochs).
FIXED_SETTINGS = ("train.seed", "data.val_fraction", "data.mask_suffix", "train.epochs")

DEFAULT_SPACE = """\
# medseg tune: the settings each trial draws, named as for --set (SECTION.KEY).
# A list: one of its values. A range: {low: 1.0e-5, high: 1.0e-2, log: true} (whole-number
# bounds draw whole numbers). Edit before the first trial: a study keeps its values.
train.lr: [1.0e-5, 1.0e-4, 1.0e-3]
train.batch_size: [8, 16, 32]
train.loss: [dice, dice_bce, dice_focal]
"""


@dataclass(frozen=True)
class StudySettings:
    """What every trial of a study shares: the data, the trial length, the base settings."""

    data: str  # the data root, resolved
    epochs: int  # epochs per trial
    base: dict[str, dict[str, Any]]  # build_config(...).to_dict(): before planning

    def trial_config(self, params: dict[str, Any], *, epochs: int | None = None) -> Config:
        """The base settings with ``params`` ({"train.lr": 1e-4, ...}); ``train.epochs`` the
        trial's (None: the base's, for a full training)."""
        values = {section: dict(keys) for section, keys in self.base.items()}
        changes = dict(params, **({"train.epochs": epochs} if epochs is not None else {}))
        for dotted, value in changes.items():
            section, _, key = dotted.partition(".")
            values[section][key] = value
        return config_from_dict(values, source="the study's settings")


def tune(
    data: str | Path | None,
    out: str | Path,
    *,
    trials: int,
    epochs: int | None = None,
    space: str | Path | None = None,
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    pruner=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run trials until the study in ``out`` holds ``trials`` finished (complete or pruned)
    ones; returns the summary (`study_summary`) and writes the folder's tables and files.

    A new study takes ``data``, ``epochs`` per trial (default `TRIAL_EPOCHS`), the search space
    ``space`` (default `DEFAULT_SPACE`) and its base settings (``preset``, ``config_file``,
    ``overrides``, as `medseg.config.build_config`). An existing one keeps its own: settings
    given again must match them. ``pruner``: an Optuna pruner (default: the median of the other
    trials at the same epoch, from epoch 2 and after 3 finished trials).
    """
    optuna = require("optuna", extra="medseg[tune]", purpose="medseg tune")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every rank would run a study of its own
        raise MedsegError(
            "medseg tune trains its trials one after another in one process; start it without "
            "torchrun (each trial then uses the whole machine)"
        )
    folder = Path(out)
    check_writable(folder)
    given = _given_settings(data, epochs, preset, config_file, overrides)
    with _quiet_optuna(optuna):
        storage = _storage(optuna, folder)
        settings = _study_settings(storage, folder, given)
        distributions = _open_space(optuna, folder, space, storage)
        study = _study(optuna, storage, settings, pruner)
        finished = _finished(optuna, study)
        if finished < trials:
            print(
                f"tuning: {trials - finished} more trials of {settings.epochs} epochs in "
                f"{folder} ({finished} finished before)"
            )
            objective = Objective(optuna, folder, settings, distributions, progress=progress)
            study.optimize(objective, n_trials=trials - finished, catch=(MedsegError,))
        return write_results(optuna, study, folder, settings)


# ---------------------------------------------------------------------------------------------
# The study and its settings


def _storage(optuna, folder: Path):
    """The study's SQLite storage, with heartbeats so that a killed trial is marked failed."""
    make_folder(folder)
    url = f"sqlite:///{(folder / DATABASE_NAME).resolve()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
        )


def _given_settings(data, epochs, preset, config_file, overrides) -> dict[str, Any] | None:
    """The settings the command line gave, resolved; None when it gave none (to continue)."""
    named = preset != "default" or config_file is not None or overrides or epochs is not None
    if data is None and not named:
        return None
    base = build_config(preset=preset, config_file=config_file, overrides=overrides)
    return {
        "data": None if data is None else str(Path(data).resolve()),
        "epochs": epochs,
        "base": base.to_dict(),
        "named": bool(named),
    }


def _study_settings(storage, folder: Path, given: dict[str, Any] | None) -> StudySettings:
    """A new study's settings (checked against the data), or those an existing one keeps."""
    studies = {summary.study_name for summary in storage.get_all_studies()}
    if STUDY_NAME in studies:
        study_id = storage.get_study_id_from_name(STUDY_NAME)
        kept = storage.get_study_user_attrs(study_id)
        settings = StudySettings(data=kept["data"], epochs=kept["epochs"], base=kept["base"])
        _check_same(settings, given, folder)
        return settings
    if given is None or given["data"] is None:
        raise MedsegError(f"{folder} holds no study yet; start one with --data DATA_ROOT")
    earlier = sorted(folder.glob("trial_*"))
    if earlier:
        raise MedsegError(
            f"{folder} holds trial folders ({earlier[0].name}) but no {DATABASE_NAME}: the "
            f"study they belong to is gone; choose another --out"
        )
    settings = StudySettings(
        data=given["data"], epochs=given["epochs"] or TRIAL_EPOCHS, base=given["base"]
    )
    _announce_hold_out(settings)
    return settings


def _check_same(settings: StudySettings, given: dict[str, Any] | None, folder: Path) -> None:
    """Refuse settings that differ from those the study in ``folder`` was started with."""
    if given is None:
        return
    if given["data"] is not None and given["data"] != settings.data:
        _refuse_change(folder, f"--data {settings.data}")
    if given["epochs"] is not None and given["epochs"] != settings.epochs:
        _refuse_change(folder, f"--epochs {settings.epochs}")
    if given["named"]:
        for section, keys in settings.base.items():
            for key, value in keys.items():
                if given["base"][section].get(key) != value:
                    _refuse_change(folder, f"{section}.{key}={value!r}")


def _refuse_change(folder: Path, kept: str) -> None:
    raise MedsegError(
        f"the study in {folder} was started with {kept}; its trials are compared only under "
        f"the same settings: run the same command again (or leave the settings out), or start "
        f"a new study with another --out"
    )


def _announce_hold_out(settings: StudySettings) -> None:
    """Say which images score every trial (and fail in seconds on data that cannot train)."""
    config = settings.trial_config({})
    root = image_root(settings.data)
    train, val = train_val_samples(
        root, mask_suffix=config.data.mask_suffix, val_fraction=config.data.val_fraction,
        seed=config.train.seed,
    )  # fmt: skip
    seed = config.train.seed
    where = "val/" if find_split(root, "val") else f"held out of train/ by seed {seed}"
    print(
        f"every trial trains on {len(train)} images and is scored on the same {len(val)} "
        f"validation images ({where})"
    )


def _study(optuna, storage, settings: StudySettings, pruner):
    """The study (created on the first run), with a sampler seeded anew for each run."""
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, direction="maximize", load_if_exists=True
    )
    if not study.user_attrs:
        for key in ("data", "epochs", "base"):
            study.set_user_attr(key, getattr(settings, key))
    # Seeded by the trials already drawn, so that a resumed search does not draw them again.
    seed = settings.base["train"]["seed"] + len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    study.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    return study


def _finished(optuna, study) -> int:
    """Trials that count towards --trials: complete or pruned (not failed, not killed)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


@contextlib.contextmanager
def _quiet_optuna(optuna):
    """Optuna's own log lines (and a failed trial's traceback) off: the trials print theirs."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------
# The search space


def _open_space(optuna, folder: Path, space: str | Path | None, storage) -> dict[str, Any]:
    """The study's distributions: from ``space`` (checked, then copied into the folder) on the
    first run, else from the folder's own file; refused where they differ from those its
    trials drew from."""
    path = folder / SPACE_NAME
    if space is None:
        source = path if path.is_file() else None
        text = path.read_text(encoding="utf-8") if source else DEFAULT_SPACE
    else:
        source = Path(space)
        text = _read_text(source)
        if path.is_file() and text != path.read_text(encoding="utf-8"):
            raise MedsegError(
                f"{folder} already has its search space ({path}); edit that file, or start a "
                f"new study with another --out"
            )
    distributions = read_space(optuna, text, source=str(source or "the default search space"))
    if not path.is_file():
        write_text(path, text)
    drawn = {}
    for trial in _all_trials(storage):
        drawn.update(trial.distributions)
    for name, distribution in drawn.items():
        if name in distributions and distributions[name] != distribution:
            raise MedsegError(
                f"{path} changes the values of {name} after trials drew from the earlier ones; "
                f"Optuna compares trials only over one space: start a new study with another --out"
            )
    return distributions


def _all_trials(storage) -> list:
    studies = {summary.study_name for summary in storage.get_all_studies()}
    if STUDY_NAME not in studies:
        return []
    return storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME), deepcopy=False)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MedsegError(f"search space file not found: {path}")
    return path.read_text(encoding="utf-8")


def read_space(optuna, text: str, *, source: str) -> dict[str, Any]:
    """``{"train.lr": distribution, ...}`` from a search space's YAML (`DEFAULT_SPACE`), read
    from ``source``; every value a trial can draw is checked as a setting first, so a typo
    fails before any trial."""
    path = source
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise MedsegError(f"{path} is not valid YAML: {error}".splitlines()[0]) from None
    if not isinstance(values, dict) or not values:
        raise MedsegError(f"{path} must map settings (train.lr, ...) to the values to try")
    distributions = {}
    for name, choice in values.items():
        if name in FIXED_SETTINGS:
            raise MedsegError(
                f"{path}: {name} cannot be searched: every trial is scored on the same "
                f"validation images for the same --epochs ({', '.join(FIXED_SETTINGS)} are fixed)"
            )
        distributions[name] = _distribution(optuna, str(name), choice, path)
        for value in _edges(choice):
            try:
                build_config(overrides={name: value})
            except MedsegError as error:
                raise MedsegError(f"{path}: {error}") from None
    return distributions


def _distribution(optuna, name: str, choice, path: str):
    """A list: one of its values; a mapping {low, high[, log]}: a number in the range."""
    if isinstance(choice, list) and choice and len(set(map(repr, choice))) == len(choice):
        return optuna.distributions.CategoricalDistribution(choice)
    if isinstance(choice, dict) and {"low", "high"} <= set(choice) <= {"low", "high", "log"}:
        low, high, log = choice["low"], choice["high"], bool(choice.get("log", False))
        if _is_number(low) and _is_number(high) and low < high and (low > 0 or not log):
            if isinstance(low, int) and isinstance(high, int):
                return optuna.distributions.IntDistribution(low, high, log=log)
            return optuna.distributions.FloatDistribution(float(low), float(high), log=log)
    raise MedsegError(
        f"{path}: {name}: {choice!r} is neither a list of different values nor a range "
        f"{{low: A, high: B, log: true|false}} with A < B (and A > 0 for log)"
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _edges(choice) -> list:
    """The values to check a setting with: a list's values, a range's two ends."""
    return list(choice) if isinstance(choice, list) else [choice["low"], choice["high"]]


# ---------------------------------------------------------------------------------------------
# One trial


class Objective:
    """One trial: draw the settings, train into ``STUDY/trial_NNN``, report each epoch's
    validation Dice to the pruner; returns the trial's best validation Dice."""

    def __init__(self, optuna, folder: Path, settings: StudySettings, distributions, *, progress):
        self.optuna, self.folder, self.settings = optuna, folder, settings
        self.distributions, self.progress = distributions, progress

    def __call__(self, trial) -> float:
        params = {name: _suggest(trial, name, d) for name, d in self.distributions.items()}
        described = ", ".join(f"{name}={value}" for name, value in params.items())
        earlier = _same_settings(trial, params)
        if earlier is not None:
            return self._repeat(trial, earlier, described)
        run = self.folder / f"trial_{trial.number:03d}"
        config = self.settings.trial_config(params, epochs=self.settings.epochs)
        print(f"trial {trial.number}: {described}")
        started = time.perf_counter()
        try:
            summary = fit(
                config, self.settings.data, run, progress=self.progress,
                on_epoch=lambda row: self._report(trial, row, described),
            )  # fmt: skip
        except MedsegError as error:
            trial.set_user_attr("failure", str(error))
            print(f"trial {trial.number} failed: {error}")
            raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - started)
            RunFolder(run).last.unlink(missing_ok=True)  # only for resuming; trials never are
        print(
            f"trial {trial.number}: best validation Dice {summary['best_val_dice']:.4f} "
            f"(epochs: {summary['epochs']})"
        )
        return summary["best_val_dice"]

    def _report(self, trial, row: dict[str, float], described: str) -> None:
        """An epoch's validation Dice to the pruner; the trial stops where it says so."""
        epoch = int(row["epoch"])
        trial.report(row["val_dice"], epoch)
        if trial.should_prune():
            print(
                f"trial {trial.number} pruned after epoch {epoch}: validation Dice "
                f"{row['val_dice']:.4f} trails the other trials at that epoch ({described})"
            )
            raise self.optuna.TrialPruned(f"pruned after epoch {epoch}")

    def _repeat(self, trial, earlier, described: str) -> float:
        """The sampler drew settings an earlier trial ran: its result, not a second training."""
        trial.set_user_attr("same_as", earlier.number)
        print(f"trial {trial.number}: {described} ran as trial {earlier.number}; its result kept")
        if earlier.state != self.optuna.trial.TrialState.COMPLETE:
            raise self.optuna.TrialPruned(f"repeats the pruned trial {earlier.number}")
        return earlier.value


def _suggest(trial, name: str, distribution):
    """``trial``'s value of ``name`` drawn from ``distribution`` (as `_distribution` builds)."""
    if hasattr(distribution, "choices"):
        return trial.suggest_categorical(name, distribution.choices)
    suggest = trial.suggest_int if isinstance(distribution.low, int) else trial.suggest_float
    return suggest(name, distribution.low, distribution.high, log=distribution.log)


def _same_settings(trial, params: dict[str, Any]):
    """The earliest complete or pruned trial that trained with ``params``, or None."""
    for earlier in trial.study.get_trials(deepcopy=False):
        if earlier.number >= trial.number or earlier.params != params:
            continue
        if earlier.state.name in ("COMPLETE", "PRUNED") and "same_as" not in earlier.user_attrs:
            return earlier
    return None


# ---------------------------------------------------------------------------------------------
# What the study folder shows


TRIAL_COLUMNS = ("trial", "state", "val_dice", "epochs")


def trial_rows(optuna, study) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per trial (`TRIAL_COLUMNS`, then each searched setting, seconds, run folder)."""
    with warnings.catch_warnings():  # experimental in Optuna, and what a kill needs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials a kill left running
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    rows = []
    for trial in trials:
        dice = list(trial.intermediate_values.values())
        row = {
            "trial": trial.number,
            "state": _state(trial),
            "val_dice": max(dice) if dice else (trial.value if trial.value is not None else ""),
            "epochs": len(dice),
            **{name: trial.params.get(name, "") for name in names},
            "seconds": round(trial.user_attrs.get("seconds", 0.0), 1),
            "run": f"trial_{trial.number:03d}" if "same_as" not in trial.user_attrs else "",
            "curve": [
                trial.intermediate_values[step] for step in sorted(trial.intermediate_values)
            ],
        }
        rows.append(row)
    return rows, names


def _state(trial) -> str:
    """complete, pruned, failed, running; a repeat names the trial whose result it took."""
    if "same_as" in trial.user_attrs:
        return f"same as {trial.user_attrs['same_as']}"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(
        trial.state.name, trial.state.name.lower()
    )


def write_results(optuna, study, folder: Path, settings: StudySettings) -> dict[str, Any]:
    """trials.csv, trials.png and best_config.yaml; returns the study's summary."""
    rows, names = trial_rows(optuna, study)
    columns = (*TRIAL_COLUMNS, *names, "seconds", "run")
    write_csv(folder / "trials.csv", [_without_curve(row) for row in rows], columns)
    if rows:
        plot_trials(rows, folder / "trials.png", title=f"{folder.name}: validation Dice")
    best = _best_trial(optuna, study)
    best_config = None
    if best is not None:
        best_config = folder / "best_config.yaml"
        save_config(settings.trial_config(best.params), best_config)
    return {
        "study": str(folder),
        "data": settings.data,
        "trials": [_without_curve(row) for row in rows],
        "settings": names,
        "best": None
        if best is None
        else {"trial": best.number, "val_dice": best.value, **best.params},
        "best_config": None if best_config is None else str(best_config),
    }


def _without_curve(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "curve"}


def _best_trial(optuna, study):
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda trial: trial.value) if complete else None


def format_trials(summary: dict[str, Any], *, limit: int = 10) -> str:
    """The best ``limit`` trials as a plain-text table, best first, as ``medseg tune`` prints."""
    names = summary["settings"]
    scored = [row for row in summary["trials"] if isinstance(row["val_dice"], float)]
    scored.sort(key=lambda row: -row["val_dice"])
    headings = ["trial", "state", "val Dice", "epochs", *names]
    table = [
        [str(row["trial"]), row["state"], f"{row['val_dice']:.4f}", str(row["epochs"])]
        + [_short(row[name]) for name in names]
        for row in scored[:limit]
    ]
    widths = [max(len(cell) for cell in column) for column in zip(headings, *table, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in [headings, *table]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = ["DEFAULT_SPACE", "format_trials", "read_space", "tune"]
