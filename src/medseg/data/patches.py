"""Training on patches cut from images at their own resolution (``data.mode=patch``).

Each item is a ``size × size`` patch of one image, placed at random; a share of them
(``foreground_fraction``) is centred near a foreground pixel of a class drawn at random, as
nnU-Net oversamples foreground so that thin or rare structures are not drowned in background.
An epoch draws `patches_per_image` patches from every image, enough to cover its area once.
The patch is augmented like a resized image (the same pipelines, at the patch's size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from medseg.data.folder import SegmentationFolder


def patches_per_image(shapes: list[tuple[int, ...]], size: int) -> int:
    """Patches an epoch draws from each image: as many as cover the mean image area once."""
    mean_area = float(np.mean([shape[0] * shape[1] for shape in shapes]))
    return max(1, math.ceil(mean_area / (size * size)))


def patch_corner(
    target: np.ndarray, size: int, rng: np.random.Generator, *, foreground: bool
) -> tuple[int, int]:
    """Top-left corner of a ``size × size`` patch in a (H, W) target: anywhere, or (with
    ``foreground``) placed so that a random pixel of a random foreground class lies inside it.
    An image smaller than the patch gives 0 on that side (the patch is padded)."""
    height, width = target.shape
    if foreground:
        present = np.flatnonzero(np.bincount(target.ravel(), minlength=2)[1:]) + 1
        if len(present):
            pixels = np.flatnonzero(target == rng.choice(present))
            row, column = divmod(int(rng.choice(pixels)), width)
            top = row - int(rng.integers(0, size))
            left = column - int(rng.integers(0, size))
            return _clip(top, height, size), _clip(left, width, size)
    return int(rng.integers(0, max(height - size, 0) + 1)), int(
        rng.integers(0, max(width - size, 0) + 1)
    )


def _clip(start: int, length: int, size: int) -> int:
    return min(max(start, 0), max(length - size, 0))


def cut_patch(array: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """``array[top:top+size, left:left+size]``, padded with zeros where the image ends."""
    patch = array[top : top + size, left : left + size]
    missing = (size - patch.shape[0], size - patch.shape[1])
    if missing == (0, 0):
        return patch
    padding = [(0, missing[0]), (0, missing[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(patch, padding)


class PatchFolder(Dataset):
    """Random patches of the images of a `SegmentationFolder` (its cache at their own size).

    Indexed by ``(index, seed)`` as `medseg.data.sampler.EpochSampler` yields: item ``index``
    is a patch of image ``index % len(images)``; the seed fixes its place and augmentation.
    """

    def __init__(
        self,
        images: SegmentationFolder,
        *,
        size: int,
        per_image: int,
        foreground_fraction: float,
    ):
        self.images = images
        self.size = size
        self.per_image = per_image
        self.foreground_fraction = foreground_fraction

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, seed = index if isinstance(index, tuple) else (index, index)
        image_index = index % len(self.images)
        image, target = self.images.load(image_index)
        rng = np.random.default_rng(seed)
        foreground = rng.random() < self.foreground_fraction
        top, left = patch_corner(target, self.size, rng, foreground=foreground)
        self.images.transform.set_random_seed(seed)
        out = self.images.transform(
            image=cut_patch(image, top, left, self.size),
            mask=cut_patch(target, top, left, self.size),
        )
        return {
            "image": out["image"],
            "mask": torch.as_tensor(out["mask"], dtype=torch.float32).unsqueeze(0),
            "id": self.images.samples[image_index].id,
        }
