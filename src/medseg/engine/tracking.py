"""What a training run tells beyond metrics.csv: ``train.log``, TensorBoard and MLflow.

Every run folder gets ``train.log``, the console's lines (`medseg.core.console`). With
``--log tensorboard`` (events in ``RUN/tensorboard/``) or ``--log mlflow`` (a local ``mlruns/``
by default; ``MLFLOW_TRACKING_URI`` honoured), every finished epoch's row of metrics.csv is
logged at step = epoch (the learning rate is its ``lr``), the resolved config as
hyper-parameters, and every ``images_every`` epochs (and the last) a few validation images,
truth beside prediction.

``RUN/tracking.json`` remembers the loggers, the last epoch they hold and MLflow's run, so
``--resume`` continues the same logged run: epochs a kill left unlogged are logged then, and
none twice (TensorBoard drops what a killed run wrote past that epoch: its ``purge_step``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml

from medseg.core import console
from medseg.core.files import make_folder, write_text
from medseg.core.optional import require
from medseg.drawing import overlay
from medseg.engine.checkpoint import rng_state, set_rng_state
from medseg.engine.run_folder import RunFolder

LOG_NAME = "train.log"
RECORD_NAME = "tracking.json"
TENSORBOARD_FOLDER = "tensorboard"
IMAGES_EVERY = 5  # epochs between validation images (and the last epoch's)
IMAGES = 4  # validation images drawn each time (the first of the validation set)
EXPERIMENT = "medseg"  # MLflow's experiment, unless MLFLOW_EXPERIMENT_NAME names another


def check_loggers(names: Sequence[str]) -> None:
    """Refuse, before any work, a logger whose package is missing (one line naming the extra)."""
    for name in names:
        require(name, extra=f"medseg[{name}]", purpose=f"--log {name}")


@dataclass
class TrackingRecord:
    """``tracking.json``: what was logged where, so a resumed run continues it."""

    loggers: list[str] = field(default_factory=list)
    images_every: int = IMAGES_EVERY
    logged_epoch: int = 0  # every epoch up to this one is in every logger
    mlflow: dict[str, str] = field(default_factory=dict)  # tracking_uri, run_id

    @classmethod
    def read(cls, run: RunFolder) -> TrackingRecord:
        path = run.path / RECORD_NAME
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**values)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError):
            print(f"note: {path} is damaged; the run's logging starts afresh")
            return cls()

    def write(self, run: RunFolder) -> None:
        write_text(run.path / RECORD_NAME, json.dumps(self.__dict__, indent=2))


def flat_config(config) -> dict[str, Any]:
    """``{"section.key": value}`` of a Config, lists and None as text (hyper-parameters)."""
    return {
        f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else str(value)
        for section, values in config.to_dict().items()
        for key, value in values.items()
    }


@contextlib.contextmanager
def tracked(run: RunFolder, setup, state, *, log: Sequence[str] = (), images_every: int | None = None,
            resumed: bool, enabled: bool = True) -> Iterator[Tracker]:  # fmt: skip
    """The run's `Tracker` for the block: ``train.log`` attached, the loggers of ``log`` (and
    those the run logged to before) opened, epochs they lack logged; closed with the block.

    ``setup`` and ``state`` are the run's `TrainingSetup` and `TrainingState`. Nothing is
    written when not ``enabled`` (a rank other than 0).
    """
    if not enabled:
        yield Tracker(run, TrackingRecord(), [])
        return
    recording = console.current()
    if recording is not None:
        recording.attach(run.path / LOG_NAME, append=resumed)
    record = TrackingRecord.read(run) if resumed else TrackingRecord()
    earlier = set(record.loggers) if record.logged_epoch > 0 else set()
    record.loggers = list(dict.fromkeys([*record.loggers, *log]))
    if images_every is not None:
        record.images_every = images_every
    loggers = [
        LOGGERS[name](run, setup.config, record, continuing=name in earlier)
        for name in record.loggers
    ]
    tracker = Tracker(run, record, loggers)
    record.write(run)  # MLflow's run id, before anything can end this process
    status = "FAILED"
    try:
        tracker.catch_up(state.history, continuing=[name in earlier for name in record.loggers])
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for logger in loggers:
            logger.close(status)


class Tracker:
    """Logs each finished epoch to the run's loggers and records how far they got."""

    def __init__(self, run: RunFolder, record: TrackingRecord, loggers: list):
        self.run, self.record, self.loggers = run, record, loggers

    def epoch(self, row: dict[str, float], setup) -> None:
        """Log a finished epoch's row of metrics.csv (and its images, when due)."""
        if not self.loggers:
            return
        epoch = int(row["epoch"])
        values = _values(row)
        pictures = validation_images(setup) if self._images_due(epoch, setup) else []
        for logger in self.loggers:
            logger.log(values, epoch)
            for name, picture in pictures:
                logger.image(name, picture, epoch)
            logger.flush()
        self.record.logged_epoch = epoch
        self.record.write(self.run)

    def catch_up(self, history: list[dict[str, float]], *, continuing: list[bool]) -> None:
        """Log the finished epochs a logger lacks: after its last logged epoch (a kill came
        between saving an epoch and logging it), or all of them for a logger new to the run."""
        for logger, known in zip(self.loggers, continuing, strict=True):
            for row in history[self.record.logged_epoch if known else 0 :]:
                logger.log(_values(row), int(row["epoch"]))
            logger.flush()
        if history:
            self.record.logged_epoch = int(history[-1]["epoch"])
            self.record.write(self.run)

    def _images_due(self, epoch: int, setup) -> bool:
        every = self.record.images_every
        return every > 0 and (epoch % every == 0 or epoch == setup.config.train.epochs)


def _values(row: dict[str, float]) -> dict[str, float]:
    """A metrics.csv row's values by column, the epoch (their step) left out."""
    return {key: float(value) for key, value in row.items() if key != "epoch"}


# ---------------------------------------------------------------------------------------------
# Validation images


@torch.no_grad()
def validation_images(setup, count: int = IMAGES) -> list[tuple[str, np.ndarray]]:
    """(id, uint8 (H, 2W, 3) picture) of the first ``count`` validation images: the truth's
    overlay beside the prediction's. The random streams are left as they were, so a run
    trains alike with and without images logged."""
    saved = rng_state()
    dataset, config = setup.val_loader.dataset, setup.config
    network = setup.validated_network().eval()
    labels = tuple(config.data.labels) if config.model.num_classes > 1 else None
    pictures = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        image = item["image"].unsqueeze(0).to(setup.device)
        with setup.precision.autocast(setup.device):
            logits = network(image)
        logits = logits.float()[0]
        if logits.shape[0] == 1:
            prediction = torch.sigmoid(logits[0]) > config.train.threshold
        else:
            prediction = logits.argmax(0)
        raw, truth = dataset.load(index)
        prediction = prediction.to(torch.uint8).cpu().numpy()
        if prediction.shape != truth.shape:
            size = (truth.shape[1], truth.shape[0])
            prediction = cv2.resize(prediction, size, interpolation=cv2.INTER_NEAREST)
        raw = raw if raw.ndim == 2 or raw.shape[-1] in (1, 3) else raw[..., :1]
        sides = [overlay(raw, mask, labels, legend=False) for mask in (truth, prediction)]
        pictures.append((str(item["id"]), np.concatenate(sides, axis=1)))
    set_rng_state(saved)
    return pictures


# ---------------------------------------------------------------------------------------------
# The loggers


class TensorBoardLogger:
    """Scalars, images and hyper-parameters in ``RUN/tensorboard/`` (torch.utils.tensorboard)."""

    def __init__(self, run: RunFolder, config, record: TrackingRecord, *, continuing: bool):
        require("tensorboard", extra="medseg[tensorboard]", purpose="--log tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = run.path / TENSORBOARD_FOLDER
        if not continuing:  # events of a run this one replaces (--overwrite)
            for stale in folder.glob("events.out.tfevents.*"):
                stale.unlink()
        # Steps past the last logged epoch are those of an epoch a kill cut short: dropped.
        purge = {"purge_step": record.logged_epoch + 1} if continuing else {}
        self.writer = SummaryWriter(log_dir=str(folder), **purge)
        if not continuing:
            parameters = flat_config(config)
            for summary in hparams(parameters, {"val_dice": math.nan}):
                self.writer.file_writer.add_summary(summary)
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            self.writer.add_text("config", f"```\n{text}```", 0)

    def log(self, values: dict[str, float], epoch: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, epoch)

    def image(self, name: str, picture: np.ndarray, epoch: int) -> None:
        self.writer.add_image(f"validation/{name}", picture, epoch, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run per run folder: metrics by epoch, the config as parameters, images as
    artifacts. Its id is kept in tracking.json, where a resumed run finds it again."""

    def __init__(self, run: RunFolder, config, record: TrackingRecord, *, continuing: bool):
        mlflow = require("mlflow", extra="medseg[mlflow]", purpose="--log mlflow")
        self.entities = mlflow.entities
        parameters = {key: str(value) for key, value in flat_config(config).items()}
        if record.mlflow.get("run_id"):  # the run this one continues, even before epoch 1
            self.client = mlflow.MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
            self.run_id = record.mlflow["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_changed(parameters, record.logged_epoch)
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or _local_store()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        created = self.client.create_run(
            experiment_id,
            run_name=_run_name(run),
            tags={"medseg.run_folder": str(run.path.resolve())},
        )
        self.run_id = created.info.run_id
        record.mlflow = {"tracking_uri": uri, "run_id": self.run_id}
        self._log_parameters(parameters)

    def _log_parameters(self, parameters: dict[str, str]) -> None:
        items = [self.entities.Param(key, value) for key, value in parameters.items()]
        for start in range(0, len(items), 100):  # MLflow takes 100 parameters per call
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def _log_changed(self, parameters: dict[str, str], epoch: int) -> None:
        """A parameter is written once: what --resume changed goes under a name of its own."""
        logged = self.client.get_run(self.run_id).data.params
        changed = {
            f"{key}.from_epoch_{epoch + 1}": value
            for key, value in parameters.items()
            if key in logged and logged[key] != value
        }
        self._log_parameters(changed)

    def log(self, values: dict[str, float], epoch: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(key, value, now, epoch) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, name: str, picture: np.ndarray, epoch: int) -> None:
        path = f"validation/epoch_{epoch:04d}/{name}.png"
        self.client.log_image(self.run_id, picture, artifact_file=path)

    def flush(self) -> None:
        pass  # each call above is written when it returns

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _local_store() -> str:
    """``./mlruns`` (MLflow's own local default before it became a database file): a SQLite
    store in it, the artifacts beside."""
    folder = make_folder(Path("mlruns")).resolve()
    return f"sqlite:///{folder / 'mlflow.db'}"


def _run_name(run: RunFolder) -> str:
    """The run folder's name; a k-fold run's fold as ``RUN/fold_0``, told apart by its run."""
    path = run.path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("fold_") else path.name


LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}
