"""Albumentations pipelines: what the network sees in training and at evaluation.

Every pipeline ends in ImageNet normalisation and a CHW tensor. Masks go through the same
geometric changes (nearest-neighbour, so they stay binary) and none of the colour changes.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from medseg.errors import MedsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("default", "seed", "none")  # the training pipelines train_transform builds


def eval_transform(size: int) -> A.Compose:
    """Resize to size × size, normalise, to tensor."""
    return A.Compose([A.Resize(size, size), *_to_network()])


def train_transform(size: int, augment: str = "default") -> A.Compose:
    """The training pipeline: ``"default"``, ``"seed"`` (the specification's) or ``"none"``."""
    if augment == "none":
        return eval_transform(size)
    if augment == "seed":
        return A.Compose(
            [
                A.Resize(size, size),
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.Rotate(limit=20, border_mode=cv2.BORDER_CONSTANT, p=0.5),
                A.GaussNoise(std_range=(0.02, 0.1), p=0.2),
                *_to_network(),
            ]
        )
    if augment == "default":
        return A.Compose([*_dermoscopy_geometry(size), *_dermoscopy_colour(), *_to_network()])
    raise MedsegError(
        f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}"
    )


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
