"""Validation during training: loss and per-image counts over a loader, at network resolution.

Scoring a checkpoint on a folder of pairs, at each mask's own size, is `medseg.commands.evaluate`,
which sits above inference; this module serves the training loop and uses only the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medseg.core.progress import progress_bar
from medseg.engine.runtime import Precision
from medseg.metrics import MetricAccumulator, binarize, foreground_classes


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader,
    *,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision,
    threshold: float = 0.5,
    labels: Sequence[str] = (),
    channels_last: bool = False,
    progress: bool = False,
) -> tuple[float, MetricAccumulator]:
    """Mean loss over images, and per-image, per-class confusion counts.

    `loader` yields dicts with "image" (N, channels, H, W) float and "mask" (N, 1, H, W): in
    [0, 1] for a binary model (one output, a pixel counting as foreground above `threshold`),
    class indices 0..K-1 for a model of K outputs (the arg-max class counts). ``labels`` is
    ``config.data.labels``; it names the classes of the returned accumulator and must name K
    classes for K outputs. Each image's loss is taken on that image alone, and the metrics come
    from per-image counts, so both are per-image means that do not depend on how the images fall
    into batches (a loss that pools over its batch, such as the soft Dice, would otherwise
    change with the split).
    """
    model.eval()
    metrics = MetricAccumulator(classes=foreground_classes(labels))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in progress_bar(loader, desc="validating", leave=False, enabled=progress):
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        masks = batch["mask"].to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
        logits = logits.float()
        loss_sum += _summed_image_losses(loss_fn, logits, masks)
        metrics.update(*_predicted_and_true(logits, masks, threshold, len(metrics.classes)))
    # One host sync for the whole pass, not one per batch.
    return float(loss_sum) / max(len(metrics), 1), metrics


def _predicted_and_true(
    logits: Tensor, masks: Tensor, threshold: float, classes: int
) -> tuple[Tensor, Tensor]:
    """(N,K,H,W) logits and (N,1,H,W) masks -> the predicted and true masks (K = 1) or label
    maps (K > 1) that `MetricAccumulator.update` takes."""
    outputs = logits.shape[1]
    if outputs == 1:
        return binarize(torch.sigmoid(logits), threshold), binarize(masks)
    if outputs != classes + 1:
        raise ValueError(
            f"the model gives {outputs} class scores but labels make {classes + 1} classes "
            f"(background first); pass labels=config.data.labels"
        )
    return logits.argmax(1), masks[:, 0]


def _summed_image_losses(loss_fn: nn.Module, logits: Tensor, masks: Tensor) -> Tensor:
    """Σ over the N images of loss_fn on that image alone; (N,K,H,W) logits and (N,1,H,W)
    masks -> float64 scalar."""
    losses = [loss_fn(logits[i : i + 1], masks[i : i + 1]) for i in range(logits.shape[0])]
    return torch.stack(losses).double().sum()
