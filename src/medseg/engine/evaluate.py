"""Validation during training: loss and per-image counts over a loader, at network resolution.

Scoring a checkpoint on a folder of pairs, at each mask's own size, is `medseg.evaluation`,
which sits above inference; this module serves the training loop and uses only the metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from medseg.engine.runtime import Precision
from medseg.metrics import MetricAccumulator, binarize


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader,
    *,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision,
    threshold: float = 0.5,
    channels_last: bool = False,
    progress: bool = False,
) -> tuple[float, MetricAccumulator]:
    """Mean loss over images, and per-image confusion counts at `threshold`.

    `loader` yields dicts with "image" (N, 3, H, W) float and "mask" (N, 1, H, W) in [0, 1].
    Each image's loss is taken on that image alone, and the metrics come from per-image counts,
    so both are per-image means that do not depend on how the images fall into batches (a loss
    that pools over its batch, such as the soft Dice, would otherwise change with the split).
    """
    model.eval()
    metrics = MetricAccumulator()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc="validating", leave=False, disable=not progress):
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        masks = batch["mask"].to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
        logits = logits.float()
        loss_sum += _summed_image_losses(loss_fn, logits, masks)
        metrics.update(binarize(torch.sigmoid(logits), threshold), binarize(masks))
    # One host sync for the whole pass, not one per batch.
    return float(loss_sum) / max(len(metrics), 1), metrics


def _summed_image_losses(loss_fn: nn.Module, logits: Tensor, masks: Tensor) -> Tensor:
    """Σ over the N images of loss_fn on that image alone; (N,1,H,W) each -> float64 scalar."""
    losses = [loss_fn(logits[i : i + 1], masks[i : i + 1]) for i in range(logits.shape[0])]
    return torch.stack(losses).double().sum()
