"""Augmentation on the device: the same geometry for image and mask, reproducible by seed."""

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.cache import PreparedCache
from medseg.data.device_augment import DeviceBatches, augment_batch
from medseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from medseg.errors import MedsegError


def blob_batch(n: int = 6, size: int = 64):
    """Images white inside random ellipses and black outside; the masks are the ellipses."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.15, 0.3, 2) * size
        masks.append(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1)
    masks = torch.as_tensor(np.stack(masks), dtype=torch.float32).unsqueeze(1)
    return masks.repeat(1, 3, 1, 1), masks


def unnormalise(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


@pytest.mark.parametrize("augment", ["default", "seed"])
def test_image_and_mask_move_together_and_the_mask_stays_binary(augment):
    images, masks = blob_batch()
    out = augment_batch(images, masks, seeds=list(range(100, 106)), augment=augment)
    assert out["image"].shape == images.shape and out["mask"].shape == masks.shape
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out["mask"], masks)  # something moved
    bright = unnormalise(out["image"]).mean(1, keepdim=True) > 0.5
    # Only the lesion's edge may differ (bilinear image, nearest-neighbour mask).
    agreement = (bright == out["mask"].bool()).float().mean().item()
    assert agreement > 0.97, agreement


def test_same_seeds_same_batch_other_seeds_other_batch():
    images, masks = blob_batch()
    first = augment_batch(images, masks, seeds=[1, 2, 3, 4, 5, 6], augment="default")
    again = augment_batch(images, masks, seeds=[1, 2, 3, 4, 5, 6], augment="default")
    other = augment_batch(images, masks, seeds=[7, 8, 9, 10, 11, 12], augment="default")
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["mask"], other["mask"])


def test_none_only_normalises():
    images, masks = blob_batch(2)
    out = augment_batch(images, masks, seeds=[0, 1], augment="none")
    assert torch.allclose(unnormalise(out["image"]), images, atol=1e-6)
    assert torch.equal(out["mask"], masks)


def test_device_batches_follow_the_batch_sampler():
    images, masks = blob_batch(5)
    cache = PreparedCache(
        samples=list("abcde"),
        images=(images.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy(),
        masks=masks[:, 0].to(torch.uint8).numpy(),
        bad=[],
    )
    batches = [[(4, 0), (1, 0)], [(2, 0)]]
    loader = DeviceBatches(cache, batches, augment="none", device=torch.device("cpu"))
    out = list(loader)
    assert len(loader) == 2 and [len(batch["mask"]) for batch in out] == [2, 1]
    assert torch.equal(out[0]["mask"], masks[[4, 1]])
    with pytest.raises(MedsegError, match="cannot run on the device"):
        DeviceBatches(cache, batches, augment="strong", device=torch.device("cpu"))


def test_training_with_device_augmentation(synthetic_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    flags = [*tiny_flags, "--epochs", "1", "--set", "data.augment_on=device"]
    assert main(["train", "--data", str(synthetic_root), "--out", str(run), *flags]) == 0
    assert (run / "checkpoints" / "best.pt").is_file()
