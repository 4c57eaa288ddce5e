"""Validation during training: loss and confusion counts over a DataLoader."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from medseg.engine.runtime import Precision
from medseg.metrics import MetricAccumulator


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
    """Mean loss over batches and per-image confusion counts at `threshold` (network resolution)."""
    model.eval()
    metrics = MetricAccumulator()
    total_loss, batches = 0.0, 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc="validating", leave=False, disable=not progress):
        images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        masks = batch["mask"].to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(images)
        logits = logits.float()
        total_loss += float(loss_fn(logits, masks))
        batches += 1
        metrics.update(torch.sigmoid(logits) > threshold, masks > 0.5)
    return total_loss / max(batches, 1), metrics
