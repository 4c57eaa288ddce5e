"""Training: `fit` runs epochs of `train_one_epoch` and validation, saving as it goes.

A run folder holds ``config.yaml`` (the resolved settings), ``metrics.csv`` (one row per epoch,
epoch first), ``curves.png``, ``checkpoints/last.pt`` (every epoch, for ``--resume``) and
``checkpoints/best.pt`` (best validation Dice). Only rank 0 writes when training on several
processes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from medseg.config import Config, build_config, save_config
from medseg.data.cache import prepare
from medseg.data.device_augment import DeviceBatches
from medseg.data.folder import SegmentationFolder, train_val_samples
from medseg.data.sampler import EpochSampler
from medseg.data.transforms import eval_transform, train_transform
from medseg.engine.checkpoint import (
    build_model,
    config_of_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medseg.engine.evaluate import evaluate_loader
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
from medseg.errors import MedsegError
from medseg.files import (
    check_writable,
    make_folder,
    remove_partial_files,
    write_csv,
    write_text,
)
from medseg.losses import build_loss
from medseg.metrics import MetricAccumulator
from medseg.visualize import plot_training_curves

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


@releases_process_group
def fit(
    config: Config | None,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a model on ``data_root`` into ``out_dir``; return the final summary.

    With ``resume=True`` the run continues after the last finished epoch of ``out_dir`` with the
    settings it was started with (``config`` is then ignored).
    """
    out_dir = Path(out_dir)
    last_path = out_dir / "checkpoints" / "last.pt"
    state = None
    if resume:
        state, config = _resume_point(out_dir, last_path)
    else:
        _refuse_to_overwrite(out_dir, overwrite)
        config = config or Config()
    check_writable(out_dir)  # before the data is read: fail in seconds, not after the first epoch

    settings = config.train
    device = select_device(settings.device)
    ranks = init_distributed(device)
    precision = select_precision(settings.precision, device)
    seed_everything(settings.seed + ranks.rank, deterministic=settings.deterministic)

    train_loader, val_loader = _loaders(
        config, data_root, ranks, device, progress=progress and ranks.is_main
    )
    model = build_model(config, pretrained=None if state is None else False)
    if settings.sync_bn:
        model = sync_batchnorm(model, device=device, ranks=ranks)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = _optimizer(model, config)
    steps_per_epoch = len(train_loader)
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scale_loss)
    loss_fn = build_loss(settings.loss, **loss_settings(settings))

    history: list[dict[str, float]] = []
    best_dice, stale_epochs, start_epoch = -1.0, 0, 1
    if state is not None:
        _restore_training_state(state, model, optimizer, scheduler, scaler, ranks, path=last_path)
        history = [dict(row) for row in state["history"]]
        best_dice, stale_epochs = state["best_dice"], state["epochs_without_improvement"]
        start_epoch = state["epoch"] + 1

    network = model
    if ranks.distributed:
        network = distributed_data_parallel(
            model,
            device=device,
            # A frozen backbone takes no part in the backward pass.
            find_unused_parameters=settings.freeze_backbone_epochs > 0,
        )
    if settings.compile:
        network = CompiledOrEager(network)
    if ranks.is_main:
        make_folder(out_dir)
        if overwrite and not resume:
            _clear_earlier_run(out_dir)  # only now: a run that fails to start keeps the old one
        for folder in (out_dir, out_dir / "checkpoints"):
            remove_partial_files(folder)  # left by a kill in the middle of a write
        save_config(config, out_dir / "config.yaml")
        write_text(out_dir / "run.json", json.dumps({"data": str(Path(data_root).resolve())}))
        if history:  # a kill between last.pt and metrics.csv left the table one row short
            _write_history(out_dir, history)
        _announce(config, device, precision, train_loader, val_loader, ranks)

    for epoch in range(start_epoch, settings.epochs + 1):
        if stale_epochs >= settings.patience > 0:
            break
        started = time.perf_counter()
        if epoch <= settings.freeze_backbone_epochs:
            model.freeze_backbone()
        else:
            model.unfreeze_backbone()
        train_loader.batch_sampler.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(
            network, train_loader, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            loss_fn=loss_fn, device=device, precision=precision, epoch=epoch,
            grad_clip=settings.grad_clip, channels_last=settings.channels_last,
            progress=progress and ranks.is_main,
        )  # fmt: skip
        average_buffers(model, ranks)
        val_loss, val_metrics = evaluate_loader(
            model, val_loader, loss_fn=loss_fn, device=device, precision=precision,
            threshold=settings.threshold, channels_last=settings.channels_last,
        )  # fmt: skip
        summary = MetricAccumulator.from_counts(
            all_gather_counts(val_metrics.counts, ranks)
        ).summary()
        row = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": mean_across_ranks(train_loss, ranks),
            "val_loss": mean_across_ranks(val_loss, ranks, weight=len(val_metrics)),
            "val_dice": summary["dice"],
            "val_iou": summary["iou"],
            "val_accuracy": summary["accuracy"],
            "val_dice_pooled": summary["dice_pooled"],
            "seconds": time.perf_counter() - started,
        }
        if not math.isfinite(row["val_loss"]):  # weights broken by the epoch's last step
            raise MedsegError(
                f"the validation loss became {row['val_loss']} after epoch {epoch}; the "
                f"checkpoints of the epochs before are kept; train again with a lower --lr "
                f"(or --precision fp32, or --set train.grad_clip=1.0)"
            )
        history.append(row)
        improved = row["val_dice"] > best_dice
        best_dice = max(best_dice, row["val_dice"])
        stale_epochs = 0 if improved else stale_epochs + 1
        rank_rng = gather_objects(rng_state(), ranks)  # a collective: every rank takes part
        if ranks.is_main:
            checkpoint = {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "epoch": epoch,
                "metrics": row,
                "history": history,
                "best_dice": best_dice,
                "epochs_without_improvement": stale_epochs,
            }
            if improved:
                save_checkpoint(out_dir / "checkpoints" / "best.pt", checkpoint)
            resume_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rank_rng[0],
                **({"rank_rng": rank_rng} if ranks.distributed else {}),
            }
            save_checkpoint(last_path, {**checkpoint, **resume_state})
            _write_history(out_dir, history)
            _report_epoch(row, settings.epochs, improved)
    return {
        "run": str(out_dir),
        "epochs": len(history),
        "best_val_dice": best_dice,
        "history": history,
    }


def _restore_training_state(
    state, model, optimizer, scheduler, scaler, ranks: Ranks, *, path
) -> None:
    """Put weights, optimizer, schedule, loss scale and random streams back as `last.pt` saved them."""
    load_weights(model, state["model"], path=path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    # Each rank continues its own random stream (dropout) where the interruption left it.
    rank_rng = state.get("rank_rng", [])
    same_ranks = len(rank_rng) == ranks.world_size
    set_rng_state(rank_rng[ranks.rank] if same_ranks else state["rng"])


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
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
) -> float:
    """One pass over `loader`; returns the mean training loss. Stops on a non-finite loss."""
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # Reading the loss makes the host wait for the device. A GPU is read every few steps, so
    # the host prepares and queues the next batches while it computes; a CPU every step.
    read_every = 1 if device.type == "cpu" else 20
    total, steps = torch.zeros((), device=device), 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, batch in enumerate(bar, start=1):
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
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
            if not math.isfinite(mean):
                # The weights are spoilt, but nothing of this epoch has been saved yet.
                raise MedsegError(
                    f"the training loss became {mean} by epoch {epoch}, step {step}; the "
                    f"checkpoints of the epochs before are kept; train again with a lower --lr "
                    f"(or --precision fp32, or --set train.grad_clip=1.0)"
                )
            bar.set_postfix(loss=f"{mean:.4f}")
    return total.item() / max(steps, 1)


def _loaders(config: Config, data_root, ranks: Ranks, device: torch.device, *, progress: bool):
    data, settings = config.data, config.train
    train_samples, val_samples = train_val_samples(
        data_root, mask_suffix=data.mask_suffix, val_fraction=data.val_fraction, seed=settings.seed
    )
    with main_rank_first(ranks):  # rank 0 builds the cache; the others then read it
        train_cache = prepare(
            train_samples, size=data.image_size, skip_bad=data.skip_bad, progress=progress
        )
        val_cache = prepare(
            val_samples, size=data.image_size, skip_bad=data.skip_bad, progress=progress
        )
    for bad in train_cache.bad + val_cache.bad:
        print(f"skipped: {bad}")
    train_set = SegmentationFolder(
        train_cache.samples, train_transform(data.image_size, data.augment), cache=train_cache
    )
    val_set = SegmentationFolder(
        val_cache.samples, eval_transform(data.image_size), cache=val_cache
    )
    per_rank = math.ceil(len(train_set) / ranks.world_size)
    # Drop a last partial batch, unless the data set is smaller than one batch: BatchNorm
    # cannot normalise a batch of one image, and a tiny last batch gives a noisy step.
    drop_last = per_rank > settings.batch_size
    train_sampler = EpochSampler(
        len(train_set), seed=settings.seed, rank=ranks.rank, world_size=ranks.world_size
    )
    val_sampler = EpochSampler(
        len(val_set),
        seed=settings.seed,
        shuffle=False,
        rank=ranks.rank,
        world_size=ranks.world_size,
        even=False,
    )
    common = {
        "num_workers": data.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": data.num_workers > 0,
    }
    train_batches = BatchSampler(train_sampler, settings.batch_size, drop_last=drop_last)
    if augment_on_device(data.augment_on, device):
        train_loader = DeviceBatches(
            train_cache, train_batches, augment=data.augment, device=device
        )
    else:
        train_loader = DataLoader(train_set, batch_sampler=train_batches, **common)
    val_loader = DataLoader(
        val_set,
        batch_sampler=BatchSampler(val_sampler, settings.batch_size, drop_last=False),
        **common,
    )
    return train_loader, val_loader


def loss_settings(settings) -> dict[str, Any]:
    """The loss's keyword settings from the train config (only those it was asked to change)."""
    return {"per_image": True} if settings.loss_per_image else {}


def augment_on_device(choice: str, device: torch.device) -> bool:
    """Whether training batches are augmented on the device (``data.augment_on``)."""
    return choice == "device" or (choice == "auto" and device.type == "cuda")


def _optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    settings = config.train
    # No weight decay on BatchNorm scales and biases: decaying them only fights the normalisation.
    decay = [p for name, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer_class = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    try:  # one fused kernel for all parameters: on a CPU ~15× faster than the per-tensor loop
        return optimizer_class(groups, lr=settings.lr, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused CPU kernel
        return optimizer_class(groups, lr=settings.lr)


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


def _scheduler(
    optimizer, config: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    settings = config.train
    total_steps = settings.epochs * steps_per_epoch
    warmup_steps = round(settings.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return learning_rate_factor(
            step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=settings.schedule
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _refuse_to_overwrite(out_dir: Path, overwrite: bool) -> None:
    earlier = [
        out_dir / name
        for name in ("checkpoints", "metrics.csv", "config.yaml")
        if (out_dir / name).exists()
    ]
    if earlier and not overwrite:
        raise MedsegError(
            f"{out_dir} already holds a run ({earlier[0].name}); continue it with --resume, "
            f"choose another --out, or pass --overwrite to replace it"
        )


def _clear_earlier_run(out_dir: Path) -> None:
    """With --overwrite: remove the earlier run's results, so none is mistaken for this run's."""
    for stale in ("checkpoints/best.pt", "checkpoints/last.pt", "metrics.csv"):
        (out_dir / stale).unlink(missing_ok=True)


def _resume_point(out_dir: Path, last_path: Path) -> tuple[dict[str, Any] | None, Config]:
    """The saved state (None: start at epoch 1) and the settings to continue ``out_dir`` with.

    A run killed before its first epoch ended has its config.yaml but no last.pt: it starts
    again from the beginning, with the settings it was started with.
    """
    if last_path.is_file():
        state = load_checkpoint(last_path)
        return state, config_of_checkpoint(state, path=last_path)
    if (out_dir / "config.yaml").is_file():
        return None, build_config(config_file=out_dir / "config.yaml")
    raise MedsegError(
        f"cannot resume {out_dir}: it holds neither checkpoints/last.pt nor config.yaml (no "
        f"medseg run started there); start one with --data and --out"
    )


def _write_history(out_dir: Path, history: list[dict[str, float]]) -> None:
    write_csv(out_dir / "metrics.csv", history, METRIC_COLUMNS)
    plot_training_curves(history, out_dir / "curves.png")


def _announce(config, device, precision, train_loader, val_loader, ranks: Ranks) -> None:
    model = config.model
    print(
        f"training DeepLabv3+ ({model.backbone}, {model.variant} variant) on {device} in "
        f"{precision.name}; {len(train_loader.dataset)} training / {len(val_loader.dataset)} "
        f"validation images; {config.train.epochs} epochs"
        + (f"; {ranks.world_size} processes" if ranks.distributed else "")
    )


def _report_epoch(row: dict[str, float], epochs: int, improved: bool) -> None:
    print(
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}  val loss "
        f"{row['val_loss']:.4f}  val Dice {row['val_dice']:.4f}  IoU {row['val_iou']:.4f}  "
        f"({row['seconds']:.0f} s){'  best' if improved else ''}"
    )
