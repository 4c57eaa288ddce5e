"""Losses for binary segmentation: a functional core and thin `nn.Module` wrappers.

Every loss takes `logits` (N, 1, H, W), any float dtype, and `target` (N, 1, H, W) with values
in {0, 1}, and returns a scalar float32 tensor. Both are cast to float32 first: training runs
under bfloat16 autocast, whose 8-bit mantissa is too coarse for sums over a whole batch of pixels.

Dice and IoU are soft: they use p = sigmoid(logits) in place of a thresholded mask, so they have a
gradient. Unless `per_image=True`, they pool the sums over the whole batch, as the seed project
did; pooling weights large lesions more and stays defined when one image has an empty mask.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.errors import MedsegError

# ----------------------------------------------------------------------------------------------
# Functional core


def _as_float32(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check that `logits` and `target` have one shape; return both as float32."""
    if logits.shape != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same "
            "shape (N, 1, H, W); resize the mask to the model's output size"
        )
    return logits.float(), target.float()


def _sum_dims(tensor: Tensor, per_image: bool) -> tuple[int, ...]:
    """Dimensions to sum over: all but the batch one when `per_image`, otherwise all."""
    return tuple(range(1, tensor.dim())) if per_image else tuple(range(tensor.dim()))


def soft_dice(
    logits: Tensor, target: Tensor, *, smooth: float = 1.0, per_image: bool = False
) -> Tensor:
    """Soft Dice score (2·Σpt + s) / (Σp + Σt + s); shape (N,) if `per_image`, else ()."""
    logits, target = _as_float32(logits, target)
    probs = torch.sigmoid(logits)
    dims = _sum_dims(probs, per_image)
    intersection = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return (2.0 * intersection + smooth) / (total + smooth)


def dice_loss(
    logits: Tensor, target: Tensor, *, smooth: float = 1.0, per_image: bool = False
) -> Tensor:
    """1 - soft Dice, pooled over the batch or averaged over images; scalar."""
    return (1.0 - soft_dice(logits, target, smooth=smooth, per_image=per_image)).mean()


def iou_loss(logits: Tensor, target: Tensor, *, smooth: float = 1.0) -> Tensor:
    """1 - soft IoU (Σpt + s) / (Σp + Σt - Σpt + s), pooled over the batch; scalar."""
    logits, target = _as_float32(logits, target)
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum()
    union = probs.sum() + target.sum() - intersection
    return 1.0 - (intersection + smooth) / (union + smooth)


def focal_loss(
    logits: Tensor, target: Tensor, *, alpha: float | None = 0.25, gamma: float = 2.0
) -> Tensor:
    """Binary focal loss (Lin et al. 2017), mean over pixels; scalar.

    Each pixel's BCE is scaled by (1 - p_t)^gamma, p_t being the probability given to the true
    class, and by alpha for foreground / (1 - alpha) for background; `alpha=None` skips that.
    """
    logits, target = _as_float32(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # bce = -log(p_t), so exp(-bce) is p_t without a separate, less stable sigmoid.
    p_true = torch.exp(-bce)
    loss = (1.0 - p_true) ** gamma * bce
    if alpha is not None:
        loss = (alpha * target + (1.0 - alpha) * (1.0 - target)) * loss
    return loss.mean()


def dice_bce_loss(
    logits: Tensor, target: Tensor, *, smooth: float = 1.0, per_image: bool = False
) -> Tensor:
    """Mean BCE + soft Dice loss (pooled: the seed project's training loss); scalar."""
    logits, target = _as_float32(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce + dice_loss(logits, target, smooth=smooth, per_image=per_image)


# ----------------------------------------------------------------------------------------------
# Checks on settings, which come from the user's config


def _check_smooth(smooth: float) -> None:
    if smooth < 0:
        raise MedsegError(f"loss smooth must be >= 0, got {smooth}")


def _check_focal(alpha: float | None, gamma: float) -> None:
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise MedsegError(f"focal alpha must be in [0, 1] or None, got {alpha}")
    if gamma < 0:
        raise MedsegError(f"focal gamma must be >= 0, got {gamma}")


# ----------------------------------------------------------------------------------------------
# Modules


class DiceBCELoss(nn.Module):
    """Mean BCE + soft Dice loss, pooled over the batch or (`per_image`) averaged over images.

    (N,1,H,W) logits, target -> scalar.
    """

    def __init__(self, *, smooth: float = 1.0, per_image: bool = False) -> None:
        super().__init__()
        _check_smooth(smooth)
        self.smooth = smooth
        self.per_image = per_image

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return dice_bce_loss(logits, target, smooth=self.smooth, per_image=self.per_image)

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, per_image={self.per_image}"


class DiceLoss(nn.Module):
    """1 - soft Dice, pooled over the batch or (`per_image`) averaged over images -> scalar."""

    def __init__(self, *, smooth: float = 1.0, per_image: bool = False) -> None:
        super().__init__()
        _check_smooth(smooth)
        self.smooth = smooth
        self.per_image = per_image

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return dice_loss(logits, target, smooth=self.smooth, per_image=self.per_image)

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, per_image={self.per_image}"


class IoULoss(nn.Module):
    """1 - soft IoU (Jaccard), pooled over the batch. (N,1,H,W) logits, target -> scalar."""

    def __init__(self, *, smooth: float = 1.0) -> None:
        super().__init__()
        _check_smooth(smooth)
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return iou_loss(logits, target, smooth=self.smooth)

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}"


class FocalLoss(nn.Module):
    """Binary focal loss, mean over pixels; `alpha=None` means no class weighting -> scalar."""

    def __init__(self, *, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        _check_focal(alpha, gamma)
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


class DiceFocalLoss(nn.Module):
    """dice_weight · soft Dice loss + focal_weight · focal loss -> scalar."""

    def __init__(
        self,
        *,
        smooth: float = 1.0,
        per_image: bool = False,
        alpha: float | None = 0.25,
        gamma: float = 2.0,
        dice_weight: float = 1.0,
        focal_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(smooth=smooth, per_image=per_image)
        self.focal = FocalLoss(alpha=alpha, gamma=gamma)
        self.dice_weight = dice_weight
        self.focal_weight = focal_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        dice = self.dice(logits, target)
        focal = self.focal(logits, target)
        return self.dice_weight * dice + self.focal_weight * focal

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, focal_weight={self.focal_weight}"


LOSSES: dict[str, type[nn.Module]] = {
    "dice_bce": DiceBCELoss,
    "dice": DiceLoss,
    "iou": IoULoss,
    "focal": FocalLoss,
    "dice_focal": DiceFocalLoss,
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss called `name` (a key of `LOSSES`) with keyword settings `kwargs`."""
    if name not in LOSSES:
        raise MedsegError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    loss_class = LOSSES[name]
    # Bind first so a misspelt setting in the config names the loss and its valid settings,
    # rather than surfacing as a bare TypeError from deep inside the constructor.
    signature = inspect.signature(loss_class.__init__)
    try:
        signature.bind(None, **kwargs)
    except TypeError as error:
        valid = [p for p in signature.parameters if p != "self"]
        raise MedsegError(
            f"loss {name!r}: {error}; its settings are: {', '.join(valid)}"
        ) from error
    return loss_class(**kwargs)
