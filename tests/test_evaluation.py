"""Validation during training (`medseg.engine.evaluate.evaluate_loader`)."""

import pytest
import torch

import medseg
from medseg.engine.evaluate import evaluate_loader
from medseg.engine.runtime import select_precision
from medseg.losses import DiceBCELoss
from medseg.metrics import binarize, confusion_counts, dice

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Validation during training


@pytest.fixture(scope="module")
def five_images():
    """An untrained resnet18 in eval mode and 5 random 64×64 images with masks, one empty."""
    torch.manual_seed(0)
    model = medseg.DeepLabV3Plus(num_classes=1, backbone="resnet18").eval()
    images = torch.randn(5, 3, 64, 64)
    masks = (torch.rand(5, 1, 64, 64) > 0.7).float()
    masks[3] = 0.0
    return model, images, masks


def _validate(model, images, masks, batch_size):
    loader = [
        {
            "image": images[start : start + batch_size],
            "mask": masks[start : start + batch_size],
        }
        for start in range(0, len(images), batch_size)
    ]
    return evaluate_loader(
        model,
        loader,
        loss_fn=DiceBCELoss(),  # pools its soft Dice over the batch it is given
        device=CPU,
        precision=select_precision("fp32", CPU),
    )


def test_validation_does_not_depend_on_the_batch_split(five_images):
    model, images, masks = five_images
    loss_of_2, metrics_of_2 = _validate(model, images, masks, batch_size=2)
    loss_of_5, metrics_of_5 = _validate(model, images, masks, batch_size=5)
    # The mean over images of each image's own loss, whatever the batches were.
    with torch.no_grad():
        logits = model(images)
    per_image = [
        float(DiceBCELoss()(logits[i : i + 1], masks[i : i + 1])) for i in range(5)
    ]
    assert loss_of_2 == pytest.approx(sum(per_image) / 5, rel=1e-5)
    assert loss_of_5 == pytest.approx(sum(per_image) / 5, rel=1e-5)
    assert len(metrics_of_2) == len(metrics_of_5) == 5
    assert torch.equal(metrics_of_2.counts, metrics_of_5.counts)
    # val_dice is the mean over images of each image's Dice at threshold 0.5.
    counts = confusion_counts(binarize(torch.sigmoid(logits)), binarize(masks))
    expected_dice = float(dice(counts).mean())
    assert metrics_of_2.summary()["dice"] == pytest.approx(expected_dice)
    assert metrics_of_5.summary()["dice"] == pytest.approx(expected_dice)


def test_validation_threshold_moves_the_masks(five_images):
    model, images, masks = five_images
    loader = [{"image": images, "mask": masks}]
    options = {
        "loss_fn": DiceBCELoss(),
        "device": CPU,
        "precision": select_precision("fp32", CPU),
    }
    _, everything = evaluate_loader(model, loader, threshold=0.0, **options)
    _, nothing = evaluate_loader(model, loader, threshold=1.0, **options)
    tp, fp, _, _ = everything.counts.sum(0).tolist()
    assert tp + fp == 5 * 64 * 64  # every pixel is above probability 0
    assert nothing.counts[:, :2].sum() == 0  # none above probability 1
