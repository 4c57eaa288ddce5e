"""Training in named steps: build a `TrainingSetup`, then run epochs while a `TrainingState` keeps
the score, saving both into a `RunFolder` after every epoch.

- `TrainingSetup.build(config, data_root)`: device, ranks, precision, loaders, model, optimizer,
  schedule and loss, everything a run trains with.
- `TrainingState`: finished epochs, their metrics and early stopping's count, plus the weights,
  optimizer, schedule, loss scale and random streams; `state_dict()` is what `last.pt` holds and
  `load_state_dict()` puts it back, so a resumed run continues exactly.
- `fit`: the loop. Only rank 0 writes when training on several processes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset

from medseg.config import (
    Config,
    DataConfig,
    TrainConfig,
    config_from_dict,
    read_saved_config,
    save_config,
)
from medseg.core.console import records_console
from medseg.core.errors import MedsegError
from medseg.core.files import check_writable, write_csv
from medseg.core.progress import progress_bar
from medseg.data.cache import cache_layout, prepare
from medseg.data.device_augment import DEVICE_PIPELINES, DeviceBatches
from medseg.data.folder import SegmentationFolder, train_pairs, train_val_samples
from medseg.data.layout import image_root
from medseg.data.patches import PatchFolder, patches_per_image
from medseg.data.plan import describe_classes, plan, planned_epochs
from medseg.data.sampler import EpochSampler
from medseg.data.splits import Split, fold_samples
from medseg.data.transforms import ImageCorrection, eval_transform, train_transform
from medseg.drawing import plot_training_curves
from medseg.engine import budget
from medseg.engine.budget import TimeBudget, budget_spent
from medseg.engine.checkpoint import (
    config_of_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medseg.engine.ema import WeightAverage, best_checkpoint, kept_weights
from medseg.engine.run_folder import RunFolder
from medseg.engine.runtime import (
    CompiledOrEager,
    Precision,
    Ranks,
    all_gather_counts,
    average_buffers,
    distributed_data_parallel,
    gather_objects,
    init_distributed,
    main_rank_first,
    mean_across_ranks,
    releases_process_group,
    seed_everything,
    select_device,
    select_precision,
    sync_batchnorm,
)
from medseg.engine.sliding_window import SlidingWindow
from medseg.engine.tracking import Tracker, tracked
from medseg.engine.validation import evaluate_loader
from medseg.losses import build_loss
from medseg.metrics import MetricAccumulator
from medseg.model import DeepLabV3Plus

METRIC_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_iou",
    "val_accuracy",
    "val_dice_pooled",
    "seconds",
)

# What --resume may change: none alters what the finished epochs computed. More epochs (or
# a new time limit) stretch the schedule from where the run stands.
RESUMABLE_SETTINGS = ("train.epochs", "data.num_workers", "train.time_limit")

RETRY_ADVICE = "train again with a lower --lr (or --precision fp32, or --set train.grad_clip=1.0)"


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the weights are spoilt (`fit` adds what to do)."""


# ---------------------------------------------------------------------------------------------
# The loop


@releases_process_group
@records_console  # train.log: the console from the command's first line (engine.tracking)
def fit(
    config: Config | None,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    changes: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    split: Split | None = None,
    log: tuple[str, ...] = (),
    images_every: int | None = None,
) -> dict[str, Any]:
    """Train a model on ``data_root`` into the run folder ``out_dir``; return a summary.

    With ``resume=True`` the run continues after its last finished epoch with the settings it
    was started with (``config`` is ignored; ``changes`` may set `RESUMABLE_SETTINGS`).
    ``on_epoch`` is called on rank 0 with each finished epoch's row of metrics.csv, once the
    epoch is saved; it may stop training by raising (`medseg tune` prunes trials so).
    ``split`` (one fold of a k-fold run, `medseg.engine.folds`) names the ids of ``train/`` to
    train and validate on. ``log`` names loggers beside train.log ("tensorboard", "mlflow"),
    with validation images every ``images_every`` epochs (`medseg.engine.tracking`).
    """
    run = RunFolder(out_dir)
    if resume:
        checkpoint, config = resume_point(run, changes or {})
        if checkpoint is not None and _nothing_left(run, checkpoint, config):
            return _summary(run, TrainingState.from_checkpoint(checkpoint))
    else:
        checkpoint, config = None, config or Config()
        run.refuse_to_overwrite(overwrite)
    check_writable(run.path)  # before the data is read: fail in seconds, not after an epoch

    setup = TrainingSetup.build(
        config, data_root, pretrained=None if checkpoint is None else False, progress=progress,
        split=split,
    )  # fmt: skip
    config = setup.config  # as planned from the data
    state = TrainingState(setup)
    if checkpoint is not None:
        state.load_state_dict(checkpoint, path=run.last)
    is_main = setup.ranks.is_main
    with run.claim(clear=overwrite and not resume) if is_main else contextlib.nullcontext():
        if is_main:
            if not resume:
                run.refuse_to_overwrite(overwrite)  # again: a run may have finished meanwhile
            _start(run, config, data_root, state)
            setup.announce()
        logging = {"log": log, "images_every": images_every, "resumed": resume}
        with tracked(run, setup, state, enabled=is_main, **logging) as tracker:
            try:
                _train_epochs(
                    setup, state, run, progress=progress and is_main, tracker=tracker,
                    on_epoch=on_epoch,
                )  # fmt: skip
            except TrainingDiverged as diverged:
                raise MedsegError(f"{diverged}; {_after_divergence(run, state)}") from None
    return _summary(run, state)


def _train_epochs(
    setup: TrainingSetup, state: TrainingState, run: RunFolder, *, progress, tracker: Tracker,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> None:  # fmt: skip
    settings = setup.config.train
    for epoch in range(state.epoch + 1, settings.epochs + 1):
        if state.stopped_early(settings.patience) or epoch > state.budget.epochs:
            break  # early stopping, or the time limit holds no more (medseg.engine.budget)
        state.budget.begin_epoch(epoch)
        row = setup.run_epoch(epoch, progress=progress, after_step=state.budget.after_step)
        improved = state.record(row)
        state.budget.end_epoch()  # re-plans from what the epoch took, before last.pt keeps it
        checkpoint = state.state_dict()  # a collective under torchrun: every rank takes part
        if setup.ranks.is_main:
            if improved:
                save_checkpoint(run.best, without_resume_state(best_checkpoint(checkpoint, row)))
            save_checkpoint(run.last, checkpoint)
            _write_history(run.path, state.history)
            _report_epoch(row, state.budget.epochs, improved)
            tracker.epoch(row, setup)
            if on_epoch is not None:
                on_epoch(row)


def _start(run: RunFolder, config: Config, data_root, state: TrainingState) -> None:
    save_config(config, run.config)
    run.write_record(data_root)
    if state.history:  # a kill between last.pt and metrics.csv left the table one row short
        _write_history(run.path, state.history)


def _summary(run: RunFolder, state: TrainingState) -> dict[str, Any]:
    return {
        "run": str(run.path),
        "epochs": len(state.history),
        "best_val_dice": state.best_dice,
        "history": state.history,
    }


def _after_divergence(run: RunFolder, state: TrainingState) -> str:
    """What is left after a divergence, and a retry that works as printed."""
    if state.epoch == 0:
        return f"no epoch had finished, so nothing was saved; {RETRY_ADVICE}"
    return (
        f"the checkpoints of epochs 1-{state.epoch} are kept in {run.checkpoints}; to "
        f"{RETRY_ADVICE}, choose another --out or add --overwrite"
    )


# ---------------------------------------------------------------------------------------------
# Resuming


def resume_point(run: RunFolder, changes: dict[str, Any]) -> tuple[dict[str, Any] | None, Config]:
    """The saved state (None: start at epoch 1) and the settings to continue ``run`` with.

    A run killed before its first epoch ended has its config.yaml but no last.pt: it starts
    again from the beginning, with the settings it was started with.
    """
    if run.last.is_file():
        checkpoint = load_checkpoint(run.last)
        config = config_of_checkpoint(checkpoint, path=run.last)
    elif run.config.is_file():
        checkpoint, config = None, read_saved_config(run.config)
        print(f"resuming {run.path}: no epoch had finished; starting again from epoch 1")
    else:
        what = (
            "the folder does not exist" if not run.path.is_dir() else "no medseg run started there"
        )
        raise MedsegError(
            f"there is no run to resume in {run.path} ({what}: it has neither "
            f"checkpoints/last.pt nor config.yaml); start one with --data and --out"
        )
    return checkpoint, with_changes(config, changes, run)


def with_changes(config: Config, changes: dict[str, Any], run: RunFolder) -> Config:
    refused = sorted(set(changes) - set(RESUMABLE_SETTINGS))
    if refused:
        raise MedsegError(
            f"--resume continues {run.path} with the settings it was started with, so "
            f"{', '.join(refused)} cannot change (only {', '.join(RESUMABLE_SETTINGS)} can); "
            f"start a new run with --data and --out to train with other settings"
        )
    values = config.to_dict()
    for dotted, value in changes.items():
        section, _, key = dotted.partition(".")
        values[section][key] = value
    return config_from_dict(values, source="the command line")


def finish_reason(checkpoint: dict[str, Any], config: Config) -> str | None:
    """Why a run saved as ``checkpoint`` has nothing left to train ("stopped early", "time
    limit" or "all epochs"), or None while epochs remain."""
    state = TrainingState.from_checkpoint(checkpoint)
    epochs = config.train.epochs
    if state.stopped_early(config.train.patience):
        return "stopped early"
    if budget_spent(
        checkpoint.get("budget"), config.train.time_limit, finished=state.epoch, planned=epochs
    ):
        return "time limit"
    return "all epochs" if state.epoch >= epochs else None


def _nothing_left(run: RunFolder, checkpoint: dict[str, Any], config: Config) -> bool:
    """Say what --resume will do; True when the run has nothing left to train."""
    state = TrainingState.from_checkpoint(checkpoint)
    epochs, best = config.train.epochs, state.best_dice
    reason = finish_reason(checkpoint, config)
    if reason == "stopped early":
        print(
            f"{run.path} stopped early after epoch {state.epoch} (no better validation Dice for "
            f"{config.train.patience} epochs; best {best:.4f}); nothing to do"
        )
    elif reason == "time limit":
        print(
            f"{run.path} ended at its time limit after epoch {state.epoch} (best validation Dice "
            f"{best:.4f}); nothing to do; pass a longer --time-limit to train it further"
        )
    elif reason == "all epochs":
        print(
            f"{run.path} has finished all {epochs} epochs (best validation Dice {best:.4f}); "
            f"nothing to do; pass --epochs N (more than {epochs}) to train it further"
        )
    else:
        print(
            f"resuming {run.path} after epoch {state.epoch} of {epochs} "
            f"(best validation Dice {best:.4f})"
        )
    return reason is not None


# ---------------------------------------------------------------------------------------------
# What a run trains with, and what it has done


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass
class TrainingSetup:
    """Everything a run trains with, built from its config, data and device by `build`."""

    config: Config
    device: torch.device
    ranks: Ranks
    precision: Precision
    model: DeepLabV3Plus  # the module whose weights are saved
    network: nn.Module  # what runs the steps: the model, or its DDP / compiled wrapper
    train_loader: Iterable
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    ema: WeightAverage | None = None  # train.ema: the moving average of the weights
    started: float = 0.0  # budget.clock() when the setup began: a time limit counts from there

    @classmethod
    def build(
        cls,
        config: Config,
        data_root: str | Path,
        *,
        pretrained: bool | str | None = None,
        progress: bool = True,
        split: Split | None = None,
    ) -> TrainingSetup:
        """Set up training; ``pretrained`` overrides the config's (False when resuming), ``split``
        chooses a fold's training and validation ids of ``train/`` (`medseg.data.splits`).

        Settings the config leaves to the data are planned first (`medseg.data.plan`). An
        nnU-Net raw root trains on its 2D slices (`medseg.data.layout.image_root`); the run
        records the root itself, so a resumed run finds the slices again.
        """
        started = budget.clock()
        data_root = image_root(data_root)
        config = plan(config, data_root)
        settings = config.train
        device = select_device(settings.device)
        ranks = init_distributed(device)
        precision = select_precision(settings.precision, device)
        seed_everything(settings.seed + ranks.rank, deterministic=settings.deterministic)
        train_loader, val_loader = build_loaders(
            config, data_root, ranks, device, progress=progress and ranks.is_main, split=split
        )
        config = planned_epochs(config, steps_per_epoch=len(train_loader))
        model = DeepLabV3Plus.from_config(config.model, pretrained=pretrained)
        model.zero_taps_out_of_reach(config.data.image_size)
        if settings.sync_bn:
            model = sync_batchnorm(model, device=device, ranks=ranks)
        model = model.to(device, memory_format=memory_format(settings.channels_last))
        optimizer = build_optimizer(model, config)
        return cls(
            config=config,
            device=device,
            ranks=ranks,
            precision=precision,
            model=model,
            network=_network(model, config, device, ranks),
            train_loader=train_loader,
            val_loader=val_loader,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, config, len(train_loader)),
            scaler=torch.amp.GradScaler(device.type, enabled=precision.scale_loss),
            loss_fn=build_loss(settings.loss, **loss_settings(settings)),
            ema=WeightAverage(model, decay=settings.ema_decay) if settings.ema else None,
            started=started,
        )

    def run_epoch(
        self, epoch: int, *, progress: bool = False, after_step: Callable[[], bool] | None = None
    ) -> dict[str, float]:
        """Train one epoch, then validate; returns the epoch's row of metrics.csv.

        ``after_step`` is called after each optimizer step (and the moving average's update);
        True stops the epoch there (a time limit, `medseg.engine.budget`).
        """
        started = time.perf_counter()
        settings = self.config.train
        if epoch <= settings.freeze_backbone_epochs:
            self.model.freeze_backbone()
        else:
            self.model.unfreeze_backbone()
        self.train_loader.batch_sampler.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(
            self.network, self.train_loader, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, loss_fn=self.loss_fn, device=self.device,
            precision=self.precision, epoch=epoch, grad_clip=settings.grad_clip,
            channels_last=settings.channels_last, progress=progress,
            after_step=self._after_step(after_step),
        )  # fmt: skip
        average_buffers(self.model, self.ranks)
        val_loss, val_metrics = evaluate_loader(
            self.validated_network(), self.val_loader, loss_fn=self.loss_fn, device=self.device,
            precision=self.precision, threshold=settings.threshold,
            labels=self.config.data.labels, channels_last=settings.channels_last,
        )  # fmt: skip
        counts = all_gather_counts(val_metrics.counts, self.ranks)
        summary = MetricAccumulator.from_counts(counts, classes=val_metrics.classes).summary()
        row = {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": mean_across_ranks(train_loss, self.ranks),
            "val_loss": mean_across_ranks(val_loss, self.ranks, weight=len(val_metrics)),
            "val_dice": summary["dice"],
            "val_iou": summary["iou"],
            "val_accuracy": summary["accuracy"],
            "val_dice_pooled": summary["dice_pooled"],
            **self._class_dice(summary),
            **self._validate_average(),
            "seconds": time.perf_counter() - started,
        }
        if not math.isfinite(row["val_loss"]):  # weights broken by the epoch's last step
            raise TrainingDiverged(
                f"the validation loss became {row['val_loss']} after epoch {epoch}"
            )
        return row

    def validated_network(self, model: nn.Module | None = None) -> nn.Module:
        """The model (or ``model``: the moving average) as validation runs it: whole images,
        or by sliding window in patch mode."""
        model = self.model if model is None else model
        if self.config.data.mode != "patch":
            return model
        return SlidingWindow(
            model, patch=self.config.data.image_size, tile_batch=self.config.train.batch_size
        )

    def _after_step(self, then: Callable[[], bool] | None) -> Callable[[], bool]:
        """What follows each optimizer step: the moving average's update, then ``then``."""

        def after_step() -> bool:
            if self.ema is not None:
                self.ema.update(self.model)
            return then is not None and then()

        return after_step

    def _validate_average(self) -> dict[str, float]:
        """The moving average's validation Dice, ``{"val_dice_ema": ...}`` (none without it)."""
        if self.ema is None:
            return {}
        average_buffers(self.ema.model, self.ranks)
        _, metrics = evaluate_loader(
            self.validated_network(self.ema.model), self.val_loader, loss_fn=self.loss_fn,
            device=self.device, precision=self.precision, threshold=self.config.train.threshold,
            labels=self.config.data.labels, channels_last=self.config.train.channels_last,
        )  # fmt: skip
        counts = all_gather_counts(metrics.counts, self.ranks)
        summary = MetricAccumulator.from_counts(counts, classes=metrics.classes).summary()
        return {"val_dice_ema": summary["dice"]}

    def _class_dice(self, summary: dict[str, Any]) -> dict[str, float]:
        """Each foreground class's validation Dice, for several classes (metrics.csv columns)."""
        if self.config.model.num_classes == 1:
            return {}
        return {f"val_dice_{name}": values["dice"] for name, values in summary["per_class"].items()}

    def announce(self) -> None:
        model, ranks, size = self.config.model, self.ranks, self.config.data.image_size
        training = self.train_loader.dataset
        if isinstance(training, PatchFolder):
            images = len(training.images)
            shape = f"as {training.per_image} patches of {size}×{size} per image and epoch"
        else:
            images, shape = len(training), f"at {size}×{size}"
        print(
            # The network by its flag: "seed variant" was read as the recipe --preset seed.
            f"training DeepLabv3+ ({model.backbone}, --variant {model.variant}) on {self.device} in "
            f"{self.precision.name}; {describe_classes(self.config)} {shape}; "
            f"{images} training / "
            f"{len(self.val_loader.dataset)} validation images; {self.config.train.epochs} epochs"
            + (f"; {ranks.world_size} processes" if ranks.distributed else "")
        )


# Checkpoint keys needed only to continue training; best.pt goes without them.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "rank_rng", "ema", "budget")


def without_resume_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in checkpoint.items() if key not in RESUME_KEYS}


@dataclass
class TrainingState:
    """Where a run stands, and everything needed to continue it from there."""

    setup: TrainingSetup | None
    epoch: int = 0  # the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv's rows
    best_dice: float = -1.0
    epochs_without_improvement: int = 0
    budget: TimeBudget | None = None  # the time limit's accounting (built from the setup)

    def __post_init__(self) -> None:
        if self.setup is not None and self.budget is None:
            self.budget = time_budget(self.setup)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainingState:
        """The progress numbers alone (no setup: nothing to train), e.g. to report on a run."""
        state = cls(setup=None)
        state._load_progress(checkpoint)
        return state

    def record(self, row: dict[str, float]) -> bool:
        """Add a finished epoch's row; True when its validation Dice (of the weights, or of
        their moving average where that is better) is the best so far."""
        dice, _ = kept_weights(row)
        improved = dice > self.best_dice
        self.epoch = int(row["epoch"])
        self.history.append(row)
        self.best_dice = max(self.best_dice, dice)
        self.epochs_without_improvement = 0 if improved else self.epochs_without_improvement + 1
        return improved

    def stopped_early(self, patience: int) -> bool:
        return self.epochs_without_improvement >= patience > 0

    def state_dict(self) -> dict[str, Any]:
        """What last.pt holds. Gathers every rank's random state: call it on every rank."""
        setup = self.setup
        rank_rng = gather_objects(rng_state(), setup.ranks)
        return {
            "config": setup.config.to_dict(),
            "model": setup.model.state_dict(),
            "epoch": self.epoch,
            "metrics": self.history[-1] if self.history else {},
            "history": self.history,
            "best_dice": self.best_dice,
            "epochs_without_improvement": self.epochs_without_improvement,
            "optimizer": setup.optimizer.state_dict(),
            "scheduler": setup.scheduler.state_dict(),
            "scaler": setup.scaler.state_dict(),
            "rng": rank_rng[0],
            **({"rank_rng": rank_rng} if setup.ranks.distributed else {}),
            **({"ema": setup.ema.state_dict()} if setup.ema is not None else {}),
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(
        self, checkpoint: dict[str, Any], *, path: str | Path = "checkpoint"
    ) -> None:
        """Put back what `state_dict` saved: weights, optimizer, schedule, loss scale, randomness."""
        setup = self.setup
        load_weights(setup.model, checkpoint["model"], path=path)
        setup.optimizer.load_state_dict(checkpoint["optimizer"])
        setup.scheduler.load_state_dict(checkpoint["scheduler"])
        setup.scaler.load_state_dict(checkpoint["scaler"])
        if setup.ema is not None:
            setup.ema.load_state_dict(checkpoint["ema"])
        self.budget.load_state_dict(checkpoint.get("budget"))  # after the schedule's own state
        self._load_progress(checkpoint)
        # Each rank continues its own random stream (dropout) where the interruption left it.
        rank_rng = checkpoint.get("rank_rng", [])
        same_ranks = len(rank_rng) == setup.ranks.world_size
        set_rng_state(rank_rng[setup.ranks.rank] if same_ranks else checkpoint["rng"])

    def _load_progress(self, checkpoint: dict[str, Any]) -> None:
        self.epoch = int(checkpoint["epoch"])
        self.history = [dict(row) for row in checkpoint["history"]]
        self.best_dice = float(checkpoint["best_dice"])
        self.epochs_without_improvement = int(checkpoint["epochs_without_improvement"])


# ---------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision,
    epoch: int,
    grad_clip: float = 0.0,
    channels_last: bool = False,
    progress: bool = True,
    after_step: Callable[[], bool] | None = None,
) -> float:
    """One pass over `loader`; returns the mean training loss. Stops on a non-finite loss,
    or where ``after_step`` (called after each optimizer step) returns True."""
    model.train()
    layout = memory_format(channels_last)
    # Reading the loss makes the host wait for the device. A GPU is read every few steps, so
    # the host prepares and queues the next batches while it computes; a CPU every step.
    read_every = 1 if device.type == "cpu" else 20
    total, steps = torch.zeros((), device=device), 0
    bar = progress_bar(loader, desc=f"epoch {epoch}", leave=False, enabled=progress)
    for step, batch in enumerate(bar, start=1):
        images = batch["image"].to(device, non_blocking=True, memory_format=layout)
        masks = batch["mask"].to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
        loss = loss_fn(logits.float(), masks)  # the loss in float32, for stability
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach()
        steps += 1
        if step % read_every == 0 or step == len(bar):
            mean = total.item() / steps
            if not math.isfinite(mean):  # nothing of this epoch has been saved yet
                raise TrainingDiverged(
                    f"the training loss became {mean} by epoch {epoch}, step {step}"
                )
            bar.set_postfix(loss=f"{mean:.4f}")
        if after_step is not None and after_step():
            break
    return total.item() / max(steps, 1)


# ---------------------------------------------------------------------------------------------
# The parts TrainingSetup builds


def build_loaders(
    config: Config, data_root, ranks: Ranks, device: torch.device, *, progress: bool,
    split: Split | None = None,
):  # fmt: skip
    """Training and validation batches from the cached data (`medseg.data.cache`): of the
    fold ``split``, or of train/ and val/ (or a held-out share of train/)."""
    data, settings = config.data, config.train
    if split is not None:
        pairs = train_pairs(data_root, mask_suffix=data.mask_suffix)
        train_samples, val_samples = fold_samples(pairs, split)
    else:
        train_samples, val_samples = train_val_samples(
            data_root, mask_suffix=data.mask_suffix, val_fraction=data.val_fraction,
            seed=settings.seed,
        )  # fmt: skip
    patches = data.mode == "patch"
    layout = cache_layout(data)
    with main_rank_first(ranks):  # rank 0 builds the cache; the others then read it
        train_cache, val_cache = (
            prepare(samples, **layout, skip_bad=data.skip_bad, progress=progress)
            for samples in (train_samples, val_samples)
        )
    for bad in train_cache.bad + val_cache.bad:
        print(f"skipped: {bad}")
    train_set, val_set = _datasets(data, train_cache, val_cache)
    per_rank = math.ceil(len(train_set) / ranks.world_size)
    # Drop a last partial batch (a noisy step), unless the data set is smaller than one batch.
    drop_last = per_rank > settings.batch_size
    samplers = {
        "train": EpochSampler(
            len(train_set), seed=settings.seed, rank=ranks.rank, world_size=ranks.world_size
        ),
        "val": EpochSampler(
            len(val_set),
            seed=settings.seed,
            shuffle=False,
            rank=ranks.rank,
            world_size=ranks.world_size,
            even=False,
        ),  # fmt: skip
    }
    common = {
        "num_workers": data.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": data.num_workers > 0,
    }
    train_batches = BatchSampler(samplers["train"], settings.batch_size, drop_last=drop_last)
    if augment_on_device(data, device) and not patches:
        train_loader = DeviceBatches(
            train_cache, train_batches, augment=data.augment, device=device
        )
    else:
        train_loader = DataLoader(train_set, batch_sampler=train_batches, **common)
    # Whole images of their own sizes, one at a time, run by sliding window in patch mode.
    val_batch = 1 if patches else settings.batch_size
    val_batches = BatchSampler(samplers["val"], val_batch, drop_last=False)
    return train_loader, DataLoader(val_set, batch_sampler=val_batches, **common)


def _datasets(data: DataConfig, train_cache, val_cache) -> tuple[Dataset, SegmentationFolder]:
    """The training items (resized images, or patches cut from them at their own size:
    `medseg.data.patches`) and the validation images (whole, in patch mode)."""
    patches = data.mode == "patch"
    pixels = {"channels": data.channels, "label_map": bool(data.labels)}
    train_set = SegmentationFolder(
        train_cache.samples,
        train_transform(data.image_size, data.augment, **pixels),
        cache=train_cache,
        correction=ImageCorrection.of(data),
    )
    if patches:
        train_set = PatchFolder(
            train_set,
            size=data.image_size,
            per_image=patches_per_image(train_cache.masks.shapes, data.image_size),
            foreground_fraction=data.foreground_fraction,
        )
    val_transform = eval_transform(None if patches else data.image_size, **pixels)
    val_set = SegmentationFolder(
        val_cache.samples, val_transform, cache=val_cache, correction=ImageCorrection.of(data)
    )
    return train_set, val_set


def _network(model: nn.Module, config: Config, device: torch.device, ranks: Ranks) -> nn.Module:
    """What runs the training steps: the model, wrapped for several processes or compiled."""
    network = model
    if ranks.distributed:
        network = distributed_data_parallel(
            model,
            device=device,
            # A frozen backbone takes no part in the backward pass.
            find_unused_parameters=config.train.freeze_backbone_epochs > 0,
        )
    if config.train.compile:
        network = CompiledOrEager(network)
    return network


def loss_settings(settings) -> dict[str, Any]:
    """The loss's keyword settings from the train config (only those it was asked to change)."""
    return {"per_image": True} if settings.loss_per_image else {}


def augment_on_device(data: DataConfig, device: torch.device) -> bool:
    """Whether training batches are augmented on the device (``data.augment_on``).

    The device pipelines are those of RGB photographs without colour correction; other data is
    augmented in the loader.
    """
    corrected = bool(ImageCorrection.of(data))  # by the loader's `SegmentationFolder.load`
    if data.augment_on == "device" and corrected:
        raise MedsegError(
            f"data.colour_constancy={data.colour_constancy} and data.contrast={data.contrast} "
            f"are applied in the loader: use data.augment_on=loader (or auto)"
        )
    supported = data.augment in DEVICE_PIPELINES and data.channels == 3 and not corrected
    if data.augment_on == "device" and not supported:
        raise MedsegError(
            f"data.augment_on=device runs the RGB pipelines {', '.join(DEVICE_PIPELINES)}; "
            f"this run augments {data.augment!r} on {data.channels}-channel images: use "
            f"data.augment_on=loader (or auto)"
        )
    return data.augment_on == "device" or (
        data.augment_on == "auto" and device.type == "cuda" and supported
    )


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    settings = config.train
    groups = parameter_groups(model, settings)
    optimizer_class = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    try:  # one fused kernel for all parameters, far faster on a CPU than the per-tensor loop
        return optimizer_class(groups, lr=settings.lr, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused CPU kernel
        return optimizer_class(groups, lr=settings.lr)


def parameter_groups(model: nn.Module, settings: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's groups: no weight decay on BatchNorm scales and biases (decaying them
    only fights the normalisation), and, with ``backbone_lr_factor`` below 1, the backbone's
    parameters at that share of the learning rate, after the head's groups (so that the first
    group's rate, the one logged, is the peak)."""
    slower = settings.backbone_lr_factor != 1
    backbone = {id(p) for p in model.backbone.parameters()} if slower else set()
    parts = [
        ([p for p in model.parameters() if id(p) not in backbone], settings.lr),
        (
            [p for p in model.parameters() if id(p) in backbone],
            settings.lr * settings.backbone_lr_factor,
        ),
    ]
    groups = []
    for parameters, lr in parts:
        for decay in (True, False):
            chosen = [p for p in parameters if (p.ndim > 1) == decay]
            if chosen:
                weight_decay = settings.weight_decay if decay else 0.0
                groups.append({"params": chosen, "weight_decay": weight_decay, "lr": lr})
    return groups


def learning_rate_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return 0.01 + 0.99 * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    return 1.0


def build_scheduler(
    optimizer, config: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    settings = config.train
    factor = LearningRateSchedule(
        total_steps=settings.epochs * steps_per_epoch,
        warmup_steps=round(settings.warmup_epochs * steps_per_epoch),
        schedule=settings.schedule,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LearningRateSchedule:
    """`learning_rate_factor` as LambdaLR's factor: an object, so that a time limit can refit
    its ``total_steps`` (`medseg.engine.budget`) and LambdaLR saves them with its state."""

    def __init__(self, *, total_steps: int, warmup_steps: int, schedule: str):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return learning_rate_factor(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
            schedule=self.schedule,
        )  # fmt: skip


def time_budget(setup: TrainingSetup) -> TimeBudget:
    """The time limit's plan for ``setup`` (`medseg.engine.budget`; inert without a limit)."""
    return TimeBudget(
        limit=setup.config.train.time_limit,
        epochs=setup.config.train.epochs,
        steps_per_epoch=len(setup.train_loader),
        validation_batches=len(setup.val_loader),
        schedule=setup.scheduler.lr_lambdas[0],
        started=setup.started,
        ranks=setup.ranks,
        on_cpu=setup.device.type == "cpu",
    )


def _write_history(out_dir: Path, history: list[dict[str, float]]) -> None:
    run = RunFolder(out_dir)
    per_class = [key for key in history[0] if key not in METRIC_COLUMNS]  # several classes
    columns = (*METRIC_COLUMNS[:-1], *per_class, METRIC_COLUMNS[-1])
    write_csv(run.metrics, history, columns)
    plot_training_curves(history, run.curves)


def _report_epoch(row: dict[str, float], epochs: int, improved: bool) -> None:
    average = f"  average's Dice {row['val_dice_ema']:.4f}" if "val_dice_ema" in row else ""
    print(
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}  val loss "
        f"{row['val_loss']:.4f}  val Dice {row['val_dice']:.4f}  IoU {row['val_iou']:.4f}"
        f"{average}  "
        f"({row['seconds']:.0f} s){'  best' if improved else ''}"
    )
