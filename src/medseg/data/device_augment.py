"""Training batches augmented on the accelerator itself, from the uint8 cache.

On a GPU the network trains thousands of images per second; a CPU DataLoader running
Albumentations per image cannot keep up (measured on an H200: 28% of the step waiting with 12
workers). Here the prepared cache is uploaded once as uint8 tensors, and each batch is gathered,
warped and recoloured on the device in a few batched operations:

- geometry: one affine matrix per image composing the random resized crop, flips, 90° turns and
  the small rotation and zoom of the ``default`` pipeline (or the flips and ±20° rotation of
  ``seed``), applied to image and mask together by ``grid_sample`` (bilinear for the image,
  nearest for the mask, so it stays binary);
- colour (``default`` only): brightness, contrast, saturation, a small hue turn (a rotation in
  YIQ space), gamma and sensor noise;
- ImageNet normalisation, as the CPU pipeline ends.

The random draws mirror the Albumentations pipelines of `medseg.data.transforms` in kind and
range (not bit for bit). They come from each item's own seed (`EpochSampler`), so an epoch is
the same whatever the device, and a resumed run sees the same augmentations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from medseg.core.errors import MedsegError
from medseg.data.cache import PreparedCache
from medseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEVICE_PIPELINES = ("default", "seed", "none")

# RGB -> YIQ; a hue turn is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class DeviceBatches:
    """Iterates augmented training batches, ``{"image", "mask"}``, made on ``device``.

    A drop-in for the training DataLoader: same ``batch_sampler`` (so ``set_epoch`` and DDP
    sharding work unchanged), same batch layout (image float (N, 3, S, S) normalised, mask
    float (N, 1, S, S) in {0, 1}).
    """

    def __init__(
        self,
        cache: PreparedCache,
        batch_sampler: BatchSampler,
        *,
        augment: str,
        device: torch.device,
    ):
        if augment not in DEVICE_PIPELINES:
            raise MedsegError(
                f"augmentation {augment!r} cannot run on the device; choose one of "
                f"{', '.join(DEVICE_PIPELINES)}, or data.augment_on=loader"
            )
        self.augment = augment
        self.device = device
        self.batch_sampler = batch_sampler
        self.dataset = cache.samples  # for len(): the announcement counts training images
        # Uploaded once: (N, S, S, 3) and (N, S, S) uint8, a quarter of float32's size.
        self.images = torch.from_numpy(np.array(cache.images)).to(device)  # a writable copy
        self.masks = torch.from_numpy(np.array(cache.masks)).to(device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for items in self.batch_sampler:
            indices = upload(torch.tensor([index for index, _ in items]), self.device)
            seeds = [seed for _, seed in items]
            images = self.images[indices].permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S)
            masks = self.masks[indices].unsqueeze(1).float()  # (N, 1, S, S) class values
            yield augment_batch(images, masks, seeds, self.augment)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, seeds: list[int], augment: str
) -> dict[str, torch.Tensor]:
    """Augment a batch (images in [0, 1], masks in {0, 1}) and normalise the images."""
    rngs = [np.random.default_rng(seed) for seed in seeds]
    if augment != "none":
        theta = upload(torch.stack([_geometry(rng, augment) for rng in rngs]), images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Reflected borders, as the CPU pipeline's BORDER_REFLECT_101; the seed pipeline's
        # rotation fills with black, as its Albumentations Rotate does.
        padding = "reflection" if augment == "default" else "zeros"
        images = F.grid_sample(images, grid, "bilinear", padding, align_corners=False)
        masks = F.grid_sample(masks, grid, "nearest", padding, align_corners=False)
    if augment == "default":
        images = _colour(images, rngs)
    elif augment == "seed":
        images = _noise(images, rngs, probability=0.2, std_range=(0.02, 0.1))
    mean, std, _ = _constants(images.device)
    return {"image": (images - mean) / std, "mask": masks}


def upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without stalling the host.

    A copy from ordinary (pageable) memory to a GPU first waits for all the work queued on the
    stream, here the previous training step: the host could not prepare the next batch while
    the GPU computes. From pinned memory the copy is queued like a kernel instead.
    """
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ImageNet mean and std and the luma weights, (1, 3, 1, 1) each, uploaded once per device."""
    rows = (torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD), _RGB_TO_YIQ[0])
    return tuple(row.to(device).view(1, 3, 1, 1) for row in rows)


# --- geometry ---------------------------------------------------------------------------------


def _geometry(rng: np.random.Generator, augment: str) -> torch.Tensor:
    """The (2, 3) matrix from output to input coordinates (``affine_grid``'s convention)."""
    if augment == "seed":  # flips, then a rotation of up to ±20° half the time
        angle = rng.uniform(-20, 20) if rng.random() < 0.5 else 0.0
        flips = _flips(rng)
        return (flips @ _rotation(angle, 1.0).inverse())[:2].float()
    # default: random resized crop (60-100% of the area, aspect 0.8-1.25), flips, a 90° turn
    # half the time, and half the time a rotation of up to ±30° with a zoom of 0.9-1.1.
    crop = _random_resized_crop(rng)
    flips = _flips(rng)
    quarter_turns = int(rng.integers(1, 4)) if rng.random() < 0.5 else 0
    turn = _rotation(90.0 * quarter_turns, 1.0)
    if rng.random() < 0.5:
        affine = _rotation(rng.uniform(-30, 30), rng.uniform(0.9, 1.1))
    else:
        affine = torch.eye(3, dtype=torch.float64)
    return (crop @ flips @ turn.inverse() @ affine.inverse())[:2].float()


def _random_resized_crop(rng: np.random.Generator) -> torch.Tensor:
    """Map the output square onto a random crop of the input (normalised coordinates)."""
    area = rng.uniform(0.6, 1.0)
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    width = min(1.0, math.sqrt(area * aspect))  # fractions of the image side
    height = min(1.0, math.sqrt(area / aspect))
    centre_x = rng.uniform(-(1 - width), 1 - width)  # normalised: the image spans [-1, 1]
    centre_y = rng.uniform(-(1 - height), 1 - height)
    return torch.tensor(
        [[width, 0, centre_x], [0, height, centre_y], [0, 0, 1]], dtype=torch.float64
    )


def _flips(rng: np.random.Generator) -> torch.Tensor:
    horizontal = -1.0 if rng.random() < 0.5 else 1.0
    vertical = -1.0 if rng.random() < 0.5 else 1.0
    return torch.diag(torch.tensor([horizontal, vertical, 1.0], dtype=torch.float64))


def _rotation(degrees: float, scale: float) -> torch.Tensor:
    """Rotate by ``degrees`` and zoom by ``scale`` about the image centre (input to output)."""
    radians = math.radians(degrees)
    cos, sin = scale * math.cos(radians), scale * math.sin(radians)
    return torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=torch.float64)


# --- colour -----------------------------------------------------------------------------------


def _colour(images: torch.Tensor, rngs: list[np.random.Generator]):
    """Colour jitter (80% of images), gamma (30%), noise (20%): the ``default`` pipeline's."""
    n = images.shape[0]
    jitter = np.array([rng.random() < 0.8 for rng in rngs])
    brightness, contrast, saturation = (
        np.where(jitter, [rng.uniform(0.8, 1.2) for rng in rngs], 1.0) for _ in range(3)
    )
    hue = np.where(jitter, [rng.uniform(-0.03, 0.03) for rng in rngs], 0.0)
    gamma = np.array([rng.uniform(0.8, 1.2) if rng.random() < 0.3 else 1.0 for rng in rngs])

    def per_image(values) -> torch.Tensor:
        return upload(torch.as_tensor(values, dtype=images.dtype), images.device).view(n, 1, 1, 1)

    images = images * per_image(brightness)
    mean_grey = _grey(images).mean((2, 3), keepdim=True)
    images = (images - mean_grey) * per_image(contrast) + mean_grey
    grey = _grey(images)
    images = (images - grey) * per_image(saturation) + grey
    images = _turn_hue(images, hue)
    images = images.clamp(0, 1) ** per_image(gamma)
    return _noise(images, rngs, probability=0.2, std_range=(0.02, 0.06))


def _grey(images: torch.Tensor) -> torch.Tensor:
    _, _, weights = _constants(images.device)
    return (images * weights).sum(1, keepdim=True)


def _turn_hue(images: torch.Tensor, hue: np.ndarray) -> torch.Tensor:
    """Turn each image's hue by ``hue`` of a full circle (a rotation of YIQ's I-Q plane)."""
    angles = torch.as_tensor(2 * math.pi * hue, dtype=torch.float32)
    cos, sin = torch.cos(angles), torch.sin(angles)
    turns = torch.zeros(len(hue), 3, 3)
    turns[:, 0, 0] = 1
    turns[:, 1, 1], turns[:, 1, 2], turns[:, 2, 1], turns[:, 2, 2] = cos, -sin, sin, cos
    matrices = upload((_YIQ_TO_RGB @ turns @ _RGB_TO_YIQ).to(images.dtype), images.device)
    return torch.einsum("nij,njhw->nihw", matrices, images)


def _noise(images, rngs, *, probability: float, std_range: tuple[float, float]):
    """Gaussian noise on a ``probability`` share of the images (values in [0, 1]).

    Each noisy image draws its noise from a generator seeded by its own rng, so an image's noise
    depends on its item's seed alone, never on which other items share its batch.
    """
    stds = [rng.uniform(*std_range) if rng.random() < probability else 0.0 for rng in rngs]
    if not any(stds):
        return images
    images = images.clone()
    for index, std in enumerate(stds):
        if std:
            seed = int(rngs[index].integers(2**63))
            generator = torch.Generator(images.device).manual_seed(seed)
            noise = torch.randn(
                images.shape[1:], generator=generator, device=images.device, dtype=images.dtype
            )
            images[index] = (images[index] + std * noise).clamp(0, 1)
    return images
