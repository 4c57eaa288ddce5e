"""Losses against hand-computed values on a 2×2 example, plus dtype, gradient and builder checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from medseg.core.errors import MedsegError
from medseg.losses import (
    DiceBCELoss,
    DiceFocalLoss,
    DiceLoss,
    FocalLoss,
    IoULoss,
    build_loss,
    cross_entropy,
    dice_loss,
    soft_dice,
)

LN3 = math.log(3.0)


def example():
    """One 2×2 image: p = sigmoid(logits) = [[0.75, 0.25], [0.5, 0.5]], target [[1, 0], [1, 0]].

    Hand sums: Σpt = 0.75 + 0.5 = 1.25, Σp = 2.0, Σt = 2.
    """
    logits = torch.tensor([[[[LN3, -LN3], [0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    return logits, target


# BCE per pixel: -ln .75, -ln .75, -ln .5, -ln .5 -> mean = (ln(4/3) + ln 2) / 2
BCE = (math.log(4 / 3) + math.log(2)) / 2  # 0.4904146
# Focal, gamma 2: p_t = .75, .75, .5, .5 -> (1 - p_t)² = 1/16, 1/16, 1/4, 1/4
FOCAL_TERMS = (math.log(4 / 3) / 16, math.log(4 / 3) / 16, math.log(2) / 4, math.log(2) / 4)
# alpha 0.25 weights the foreground pixels (first and third) 0.25, the others 0.75.
FOCAL_ALPHA = (
    0.25 * FOCAL_TERMS[0] + 0.75 * FOCAL_TERMS[1] + 0.25 * FOCAL_TERMS[2] + 0.75 * FOCAL_TERMS[3]
) / 4  # 0.0478167


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        # dice = (2·1.25 + 1) / (2 + 2 + 1) = 3.5 / 5 = 0.7 -> loss 0.3
        (DiceLoss(), 0.3),
        # smooth 0: dice = 2.5 / 4 = 0.625 -> loss 0.375
        (DiceLoss(smooth=0.0), 0.375),
        # iou = (1.25 + 1) / (2 + 2 - 1.25 + 1) = 2.25 / 3.75 = 0.6 -> loss 0.4
        (IoULoss(), 0.4),
        # iou, smooth 0: 1.25 / 2.75 -> loss 1.5 / 2.75
        (IoULoss(smooth=0.0), 1.5 / 2.75),
        # BCE + Dice loss: 0.4904146 + 0.3
        (DiceBCELoss(), BCE + 0.3),
        # no alpha: mean of the four focal terms = 0.0956335
        (FocalLoss(alpha=None), sum(FOCAL_TERMS) / 4),
        (FocalLoss(), FOCAL_ALPHA),
        # gamma 1, no alpha: (1 - p_t) = 1/4, 1/4, 1/2, 1/2 times the BCE terms
        (FocalLoss(alpha=None, gamma=1.0), (math.log(4 / 3) / 2 + math.log(2)) / 4),
        (DiceFocalLoss(), 0.3 + FOCAL_ALPHA),
        (DiceFocalLoss(dice_weight=2.0, focal_weight=0.5), 0.6 + 0.5 * FOCAL_ALPHA),
    ],
)
def test_loss_matches_hand_computed_value(loss, expected):
    logits, target = example()
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_dice_per_image_differs_from_pooled():
    # Image 1 is the example (dice 0.7); image 2 has p = 0.5 everywhere and an empty target:
    # dice = (0 + 1) / (2 + 0 + 1) = 1/3.
    logits, target = example()
    logits = torch.cat([logits, torch.zeros_like(logits)])
    target = torch.cat([target, torch.zeros_like(target)])
    # Per image: mean(1 - 0.7, 1 - 1/3) = (0.3 + 2/3) / 2
    per_image = DiceLoss(per_image=True)(logits, target)
    assert per_image.item() == pytest.approx((0.3 + 2 / 3) / 2, rel=1e-6)
    # Pooled: Σpt = 1.25, Σp = 4, Σt = 2 -> dice = 3.5 / 7 = 0.5
    pooled = DiceLoss()(logits, target)
    assert pooled.item() == pytest.approx(0.5, rel=1e-6)
    # Dice+BCE adds the same BCE to either Dice.
    bce = F.binary_cross_entropy_with_logits(logits, target).item()
    per_image_bce = DiceBCELoss(per_image=True)(logits, target).item()
    assert per_image_bce == pytest.approx(bce + (0.3 + 2 / 3) / 2, rel=1e-6)
    assert DiceBCELoss()(logits, target).item() == pytest.approx(bce + 0.5, rel=1e-6)


def test_focal_with_gamma_0_and_no_alpha_is_bce():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 7, generator=generator) * 3
    target = (torch.rand(2, 1, 5, 7, generator=generator) > 0.5).float()
    focal = FocalLoss(alpha=None, gamma=0.0)(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert focal.item() == pytest.approx(bce.item(), rel=1e-6)


ALL_LOSSES = [
    DiceBCELoss(),
    DiceLoss(),
    DiceLoss(per_image=True),
    IoULoss(),
    FocalLoss(),
    DiceFocalLoss(),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: repr(loss))
def test_perfect_prediction_gives_near_zero_overlap_loss(loss):
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1
    logits = (target * 2 - 1) * 30  # sigmoid(±30) is 1 or 0 within 1e-13
    assert loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: repr(loss))
def test_bfloat16_logits_give_float32_loss_equal_to_upcast(loss):
    logits, target = example()
    logits = logits.repeat(2, 1, 3, 3).bfloat16()
    target = target.repeat(2, 1, 3, 3)
    value = loss(logits, target)
    assert value.dtype == torch.float32
    assert value.dim() == 0
    # The loss casts to float32 first, so it must equal the loss of the upcast logits exactly.
    assert value.item() == loss(logits.float(), target).item()


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: repr(loss))
def test_gradient_flows_to_every_logit(loss):
    logits, target = example()
    logits = logits.repeat(2, 1, 1, 1).requires_grad_()
    target = target.repeat(2, 1, 1, 1)
    loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).all()
    # Raising a foreground logit must lower the loss: its gradient is negative.
    assert logits.grad[0, 0, 0, 0] < 0


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"need a target of shape \(1, 1, 4, 4\)"):
        DiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="need a target"):  # one channel of class indices
        DiceLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


# --- several classes: softmax, categorical cross-entropy, Dice over the foreground classes ---


def confident(labels: torch.Tensor, classes: int, *, margin: float = 30.0) -> torch.Tensor:
    """Logits (N, K, H, W) that put all probability on the classes of (N, 1, H, W) labels."""
    one_hot = F.one_hot(labels[:, 0].long(), classes).movedim(-1, 1)
    return one_hot.float() * margin


def test_multiclass_losses_of_a_perfect_prediction_are_zero():
    labels = torch.tensor([[[[0, 1], [2, 2]]]]).float()
    logits = confident(labels, 3)
    for loss in (DiceBCELoss(smooth=0.0), DiceLoss(smooth=0.0), IoULoss(smooth=0.0)):
        assert float(loss(logits, labels)) == pytest.approx(0.0, abs=1e-6)


def test_multiclass_cross_entropy_of_uniform_logits_is_log_k():
    labels = torch.tensor([[[[0, 1], [2, 3]]]]).float()
    assert float(cross_entropy(torch.zeros(1, 4, 2, 2), labels)) == pytest.approx(math.log(4))


def test_multiclass_soft_dice_by_hand():
    # 1×4 image, 3 classes; probabilities made exactly by softmax of log-probabilities.
    probs = torch.tensor(
        [
            [0.8, 0.1, 0.1, 0.2],  # background
            [0.1, 0.8, 0.1, 0.2],  # class 1
            [0.1, 0.1, 0.8, 0.6],  # class 2
        ]
    )
    logits = probs.log().reshape(1, 3, 1, 4)
    labels = torch.tensor([0.0, 1.0, 2.0, 2.0]).reshape(1, 1, 1, 4)
    # Class 1: 2·0.8 / (1.2 + 1); class 2: 2·1.4 / (1.6 + 2); background is not scored.
    expected = torch.tensor([1.6 / 2.2, 2.8 / 3.6])
    assert torch.allclose(soft_dice(logits, labels, smooth=0.0), expected, atol=1e-6)
    assert float(dice_loss(logits, labels, smooth=0.0)) == pytest.approx(
        1 - float(expected.mean()), abs=1e-6
    )
    # Cross-entropy: mean of -log p(true class) = -(log .8 + log .8 + log .8 + log .6) / 4.
    expected_ce = -(3 * math.log(0.8) + math.log(0.6)) / 4
    assert float(cross_entropy(logits, labels)) == pytest.approx(expected_ce, abs=1e-6)
    assert float(DiceBCELoss(smooth=0.0)(logits, labels)) == pytest.approx(
        expected_ce + 1 - float(expected.mean()), abs=1e-6
    )


def test_focal_loss_refuses_several_classes_in_one_line():
    with pytest.raises(MedsegError, match="binary only"):
        FocalLoss()(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("dice_bce", {}, DiceBCELoss),
        ("dice_bce", {"per_image": True}, DiceBCELoss),
        ("dice", {"per_image": True}, DiceLoss),
        ("iou", {"smooth": 0.0}, IoULoss),
        ("focal", {"alpha": None, "gamma": 1.0}, FocalLoss),
        ("dice_focal", {"focal_weight": 0.5}, DiceFocalLoss),
    ],
)
def test_build_loss_passes_settings(name, kwargs, cls):
    loss = build_loss(name, **kwargs)
    assert type(loss) is cls
    for key, value in kwargs.items():
        assert getattr(loss, key) == value


def test_build_loss_unknown_name_lists_valid_names():
    with pytest.raises(MedsegError, match="dice_bce, dice, iou, focal, dice_focal"):
        build_loss("tversky")


def test_build_loss_unknown_setting_lists_valid_settings():
    with pytest.raises(MedsegError, match="smooth, per_image"):
        build_loss("dice", smoth=1.0)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("dice", {"smooth": -1.0}), ("focal", {"alpha": 1.5}), ("focal", {"gamma": -2.0})],
)
def test_build_loss_rejects_impossible_settings(name, kwargs):
    with pytest.raises(MedsegError):
        build_loss(name, **kwargs)
