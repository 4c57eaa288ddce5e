"""Segmentation losses: a functional core and thin `nn.Module` wrappers.

Every loss takes `logits` (N, C, H, W), any float dtype, and `target` (N, 1, H, W), and returns
a scalar float32 tensor. Both are cast to float32 first: training runs under bfloat16 autocast,
whose 8-bit mantissa is too coarse for sums over a whole batch of pixels.

- Binary (C = 1): `target` holds 0/1, probabilities are sigmoid(logits), the cross-entropy is BCE.
- Multi-class (C = K > 1): `target` holds class indices 0..K-1, probabilities are softmax over
  the classes, the cross-entropy is categorical, and the soft Dice (or IoU) is the mean over the
  foreground classes 1..K-1, as nnU-Net's default Dice + CE loss: background, which fills most
  of an image, would otherwise dominate the overlap term.

Dice and IoU are soft: they use probabilities in place of a thresholded mask, so they have a
gradient. Unless `per_image=True`, they pool the sums over the whole batch, as the seed project
did; pooling weights large structures more and stays defined when one image lacks a class.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.core.errors import MedsegError

# ----------------------------------------------------------------------------------------------
# Functional core


def _as_float32(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check that `target` fits `logits`; return both as float32."""
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"logits {tuple(logits.shape)} need a target of shape {expected}, got "
            f"{tuple(target.shape)}; resize the mask to the model's output size"
        )
    return logits.float(), target.float()


def _sum_dims(tensor: Tensor, per_image: bool) -> tuple[int, ...]:
    """Dimensions to sum over, class dimension kept: (N, C, H, W) -> sums of shape (N, C) when
    `per_image`, otherwise (C,)."""
    spatial = tuple(range(2, tensor.dim()))
    return spatial if per_image else (0, *spatial)


def probabilities_and_targets(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities, one-hot targets) of the classes the overlap terms score, (N, C', H, W).

    Binary: the foreground's sigmoid and the 0/1 mask. Multi-class: softmax and one-hot of the
    foreground classes 1..K-1 only.
    """
    logits, target = _as_float32(logits, target)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), target
    classes = logits.shape[1]
    one_hot = F.one_hot(target[:, 0].long(), classes).movedim(-1, 1).float()
    return torch.softmax(logits, dim=1)[:, 1:], one_hot[:, 1:]


def soft_dice(
    logits: Tensor, target: Tensor, *, smooth: float = 1.0, per_image: bool = False
) -> Tensor:
    """Soft Dice (2·Σpt + s) / (Σp + Σt + s) per scored class; (N, C') if `per_image`, else (C',)."""
    probs, target = probabilities_and_targets(logits, target)
    dims = _sum_dims(probs, per_image)
    intersection = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return (2.0 * intersection + smooth) / (total + smooth)


def dice_loss(
    logits: Tensor, target: Tensor, *, smooth: float = 1.0, per_image: bool = False
) -> Tensor:
    """1 - soft Dice, averaged over the scored classes (and images, if `per_image`); scalar."""
    return (1.0 - soft_dice(logits, target, smooth=smooth, per_image=per_image)).mean()


def iou_loss(logits: Tensor, target: Tensor, *, smooth: float = 1.0) -> Tensor:
    """1 - soft IoU (Σpt + s) / (Σp + Σt - Σpt + s), pooled over the batch; scalar."""
    probs, target = probabilities_and_targets(logits, target)
    dims = _sum_dims(probs, per_image=False)
    intersection = (probs * target).sum(dims)
    union = probs.sum(dims) + target.sum(dims) - intersection
    return (1.0 - (intersection + smooth) / (union + smooth)).mean()


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean pixel cross-entropy: binary (BCE on the one logit) or categorical; scalar."""
    logits, target = _as_float32(logits, target)
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target[:, 0].long())


def focal_loss(
    logits: Tensor, target: Tensor, *, alpha: float | None = 0.25, gamma: float = 2.0
) -> Tensor:
    """Binary focal loss (Lin et al. 2017), mean over pixels; scalar.

    Each pixel's BCE is scaled by (1 - p_t)^gamma, p_t being the probability given to the true
    class, and by alpha for foreground / (1 - alpha) for background; `alpha=None` skips that.
    """
    logits, target = _as_float32(logits, target)
    if logits.shape[1] > 1:
        raise MedsegError(
            f"the focal losses are binary only; for {logits.shape[1]} classes use one of "
            f"{', '.join(MULTI_CLASS_LOSSES)}"
        )
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
    """Cross-entropy + soft Dice loss (binary: the seed project's BCE + Dice); scalar."""
    return cross_entropy(logits, target) + dice_loss(
        logits, target, smooth=smooth, per_image=per_image
    )


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


class _OverlapLoss(nn.Module):
    """A loss with a soft Dice term: `function(logits, target, smooth=..., per_image=...)`."""

    function = staticmethod(dice_loss)

    def __init__(self, *, smooth: float = 1.0, per_image: bool = False) -> None:
        super().__init__()
        _check_smooth(smooth)
        self.smooth = smooth
        self.per_image = per_image

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.function(logits, target, smooth=self.smooth, per_image=self.per_image)

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, per_image={self.per_image}"


class DiceBCELoss(_OverlapLoss):
    """Cross-entropy (BCE for one class) + soft Dice, pooled over the batch or (`per_image`)
    averaged over images. (N,C,H,W) logits, (N,1,H,W) target -> scalar."""

    function = staticmethod(dice_bce_loss)


class DiceLoss(_OverlapLoss):
    """1 - soft Dice, pooled over the batch or (`per_image`) averaged over images -> scalar."""

    function = staticmethod(dice_loss)


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


MULTI_CLASS_LOSSES = ("dice_bce", "dice", "iou")  # those defined for K > 1 classes too


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
