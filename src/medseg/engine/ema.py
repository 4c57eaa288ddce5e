"""An exponential moving average of the weights (``train.ema``), validated beside them.

timm's ``ModelEmaV2`` convention: after every optimizer step each parameter of the average
moves towards the model's, ``average = decay * average + (1 - decay) * weight``; BatchNorm's
buffers (running statistics) are copied, as they are statistics of the data, not weights.
The decay warms up as TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` does,
``min(decay, (1 + n) / (10 + n))`` after n updates: a run of a few hundred steps from random
weights would otherwise average in the random start (0.999 ** 600 = 0.55 of it).

Each epoch validates both; the better becomes ``best.pt`` (metrics.csv: ``val_dice`` for the
weights, ``val_dice_ema`` for the average), and ``last.pt`` carries the average and its count
of updates, so a resumed run continues it exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The moving average of ``model``'s weights: a frozen copy of the model, in eval mode."""

    def __init__(self, model: nn.Module, *, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses (warmed up: see the module docstring)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the same network, after an optimizer step)."""
        decay = self.current_decay()
        for average, weight in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(weight.detach(), 1.0 - decay)
        for average, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def kept_weights(row: dict[str, float]) -> tuple[float, str]:
    """An epoch's validation Dice and the weights that gave it: "average" where the moving
    average validated better than the weights, else "weights"."""
    average = row.get("val_dice_ema")
    if average is not None and average > row["val_dice"]:
        return average, "average"
    return row["val_dice"], "weights"


def best_checkpoint(checkpoint: dict[str, Any], row: dict[str, float]) -> dict[str, Any]:
    """``checkpoint`` (without its resume state) as best.pt: the weights that validated better,
    and which they were (``"weights"``: the model's own, ``"average"``: the moving average)."""
    _, kept = kept_weights(row)
    if kept == "average":
        return {**checkpoint, "model": checkpoint["ema"]["model"], "weights": kept}
    return {**checkpoint, "weights": kept} if "ema" in checkpoint else checkpoint
