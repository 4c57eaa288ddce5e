"""Albumentations pipelines: what the network sees in training and at evaluation.

Every pipeline ends in ImageNet normalisation and a CHW tensor. Masks go through the same
geometric changes (nearest-neighbour, so they stay binary) and none of the colour changes.
`resize_image` and `resize_mask` are the one way medseg brings an image and its mask to the
network's size: the training cache, the evaluation pipeline and the predictor all call them, so
the network never sees at prediction time an image scaled differently from its training images.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from medseg.errors import MedsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("default", "seed", "none")  # the training pipelines train_transform builds


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an (H, W[, C]) array to ``size`` × ``size``, or to ``size = (height, width)``.

    Shrinking averages each output pixel's whole footprint (INTER_AREA): a bilinear shrink
    samples only a few input pixels per output pixel, so the fine texture of a large original
    aliases into patterns the smaller image does not have. Where either side grows there is
    nothing to average there, and OpenCV documents INTER_AREA as nearest-neighbour-like when
    zooming: bilinear (INTER_LINEAR) then gives smooth edges instead of blocks.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (height, width):
        return image
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool or 0/1 (H, W) mask to a bool ``size`` × ``size`` mask.

    The mask is resized smoothly as 0/255 and cut at half, so its edge moves with the image's
    edge instead of snapping to the nearest source pixel.
    """
    if mask.shape[:2] == (size, size):
        return mask.astype(bool)
    soft = cv2.resize(mask.astype(np.uint8) * 255, (size, size), interpolation=cv2.INTER_LINEAR)
    return soft > 127


class ResizeSquare(A.DualTransform):
    """`resize_image` and `resize_mask` as a pipeline step (the mask keeps its dtype)."""

    def __init__(self, size: int):
        super().__init__(p=1.0)
        self.size = size

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return resize_image(img, self.size)

    def apply_to_mask(self, mask: np.ndarray, **params) -> np.ndarray:
        return resize_mask(mask, self.size).astype(mask.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


def eval_transform(size: int) -> A.Compose:
    """Resize to size × size (`resize_image`), normalise, to tensor."""
    return A.Compose([ResizeSquare(size), *_to_network()])


def train_transform(size: int, augment: str = "default") -> A.Compose:
    """The training pipeline: ``"default"``, ``"seed"`` (the specification's) or ``"none"``."""
    if augment == "none":
        return eval_transform(size)
    if augment == "seed":
        return A.Compose(
            [
                ResizeSquare(size),
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.Rotate(limit=20, border_mode=cv2.BORDER_CONSTANT, p=0.5),
                A.GaussNoise(std_range=(0.02, 0.1), p=0.2),
                *_to_network(),
            ]
        )
    if augment == "default":
        return A.Compose([*_dermoscopy_geometry(size), *_dermoscopy_colour(), *_to_network()])
    raise MedsegError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")


def _dermoscopy_geometry(size: int) -> list:
    # A lesion has no up, down or handedness: every flip and rotation is a valid new image.
    # Zooms stay moderate because ISIC framing (lesion roughly centred, mostly whole) is part of
    # what the network should learn; reflected borders avoid black wedges a dermatoscope never shows.
    return [
        A.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(rotate=(-30, 30), scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    ]


def _dermoscopy_colour() -> list:
    # Cameras, lighting and skin types differ between clinics: vary brightness, contrast,
    # saturation and hue a little, plus sensor noise and blur. Hue stays small: lesion colour
    # carries meaning.
    return [
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.OneOf([A.GaussNoise(std_range=(0.02, 0.06)), A.GaussianBlur(blur_limit=(3, 5))], p=0.2),
    ]


def _to_network() -> list:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
