"""Albumentations pipelines: what the network sees in training and at evaluation.

Every pipeline ends in normalisation (ImageNet's statistics; for one channel their mean over
RGB) and a CHW tensor. Masks go through the same geometric changes (nearest-neighbour, so they
keep their values: 0/1, or class indices) and none of the colour changes.
`ImageCorrection` is what is done to the whole image at the network's scale (after the resize,
before any crop) wherever an image meets the network: its colour cast removed
(`colour_constancy`), then its local contrast equalised (`local_contrast`).
`resize_image` and `resize_mask` are the one way medseg brings an image and its mask to the
network's size: the training cache, the evaluation pipeline and the predictor all call them, so
the network never sees at prediction time an image scaled differently from its training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from medseg.config.choices import AUGMENTATIONS, COLOUR_CONSTANCY, CONTRASTS
from medseg.core.errors import MedsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Shades of Gray's Minkowski norm: 6 is Finlayson and Trezzi's best over their image sets, and
# the value dermoscopy work after Barata et al. (2015) uses; 1 would be Gray World, infinity
# White Patch.
SHADES_OF_GRAY_POWER = 6
# CLAHE's clip limit and its grid of tiles over the whole image: OpenCV's example values, the
# ones retinal vessel work since Zuiderveld's CLAHE (1994) reached fundus images commonly uses.
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = 8
# The most channels OpenCV's area interpolation takes in one call at a scale that is not a
# whole fraction; `resize_image` resizes more (a 5-sequence MRI .npy) in groups of this many.
OPENCV_CHANNELS = 4


def normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: ImageNet's for RGB; for one channel, their mean over RGB, which
    suits the stem filters summed over RGB (`medseg.model.backbone`)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = float(np.mean(IMAGENET_MEAN)), float(np.mean(IMAGENET_STD))
    return (mean,) * channels, (std,) * channels


def colour_constancy(image: np.ndarray, method: str) -> np.ndarray:
    """``image`` (uint8 (H, W, C)) with its colour cast removed by ``method`` (one of
    `COLOUR_CONSTANCY`); "none", or an image with one channel, returns it unchanged.

    Shades of Gray takes each channel's light as its Minkowski p-norm mean and scales the
    channels so that light becomes gray, keeping the image's overall brightness: an image whose
    channels have equal norms is left as it is, so correcting twice changes nothing more.
    Black borders (a dermatoscope's vignette, a fundus image's mask) scale every channel's norm
    alike and so change nothing.
    """
    if method not in COLOUR_CONSTANCY:
        raise MedsegError(
            f"unknown colour constancy {method!r}; choose one of {', '.join(COLOUR_CONSTANCY)}"
        )
    if method == "none" or image.ndim < 3 or image.shape[2] == 1:
        return image
    pixels = image.reshape(-1, image.shape[2]).astype(np.float64)
    light = np.mean(pixels**SHADES_OF_GRAY_POWER, axis=0) ** (1 / SHADES_OF_GRAY_POWER)
    if not light.all():  # a channel that is black everywhere has no light to even out
        return image
    gain = np.sqrt(np.mean(light**2)) / light
    return np.clip(image * gain.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


def local_contrast(image: np.ndarray, method: str) -> np.ndarray:
    """``image`` (uint8 (H, W, C)) with its local contrast equalised by ``method`` (one of
    `CONTRASTS`); "none" returns it unchanged.

    "clahe": contrast-limited adaptive histogram equalisation over `CLAHE_TILES` × `CLAHE_TILES`
    tiles. An RGB image is equalised in the lightness of CIELAB only, so its hues stay as they
    were; any other image channel by channel. Faint structure in a dim region (thin vessels at
    a fundus image's edge) gains contrast while a region already spanning the range keeps it.
    """
    if method not in CONTRASTS:
        raise MedsegError(f"unknown contrast {method!r}; choose one of {', '.join(CONTRASTS)}")
    if method == "none":
        return image
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
    if image.ndim == 3 and image.shape[2] == 3:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    planes = image[..., None] if image.ndim == 2 else image
    equalised = [clahe.apply(np.ascontiguousarray(planes[..., c])) for c in range(planes.shape[2])]
    return np.stack(equalised, axis=2).reshape(image.shape)


@dataclass(frozen=True)
class ImageCorrection:
    """What is done to a whole uint8 image at the network's scale before the augmentation (and
    any patch), in training and every prediction path alike: ``colour`` (``data.colour_constancy``)
    then ``contrast`` (``data.contrast``). False when it changes nothing."""

    colour: str = "none"
    contrast: str = "none"

    @classmethod
    def of(cls, data) -> ImageCorrection:
        """The correction a `DataConfig` asks for."""
        return cls(data.colour_constancy, data.contrast)

    def __bool__(self) -> bool:
        return (self.colour, self.contrast) != ("none", "none")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return local_contrast(colour_constancy(image, self.colour), self.contrast)


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
    if image.ndim == 3 and image.shape[2] > OPENCV_CHANNELS:
        # Every channel is resized on its own, so resizing them in groups changes nothing.
        groups = [
            cv2.resize(
                np.ascontiguousarray(image[..., first : first + OPENCV_CHANNELS]),
                (width, height),
                interpolation=interpolation,
            ).reshape(height, width, -1)
            for first in range(0, image.shape[2], OPENCV_CHANNELS)
        ]
        return np.concatenate(groups, axis=2)
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


def resize_label_map(labels: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H, W) label map to ``size`` × ``size`` by nearest neighbour: a class
    index is never interpolated into another class's value."""
    if labels.shape[:2] == (size, size):
        return labels
    return cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST)


def resize_probabilities(probabilities: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A prediction brought to ``size = (height, width)`` as `resize_image` brings an image:
    one map (H, W), or class probabilities (K, H, W), every class by the same interpolation so
    that each pixel's probabilities still sum to 1."""
    if probabilities.ndim == 2:
        return resize_image(probabilities, size)
    classes_last = resize_image(probabilities.transpose(1, 2, 0), size).reshape(*size, -1)
    return np.ascontiguousarray(classes_last.transpose(2, 0, 1), dtype=np.float32)


def resize_target(target: np.ndarray, size: int, *, label_map: bool) -> np.ndarray:
    """A training target at the network's size: `resize_label_map` for label maps, else
    `resize_mask` (as uint8 0/1)."""
    if label_map:
        return resize_label_map(target, size)
    return resize_mask(target, size).astype(np.uint8)


class ResizeSquare(A.DualTransform):
    """`resize_image` and `resize_target` as a pipeline step (the mask keeps its dtype)."""

    def __init__(self, size: int, *, label_map: bool = False):
        super().__init__(p=1.0)
        self.size = size
        self.label_map = label_map

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return resize_image(img, self.size)

    def apply_to_mask(self, mask: np.ndarray, **params) -> np.ndarray:
        return resize_target(mask, self.size, label_map=self.label_map).astype(mask.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "label_map")


def eval_transform(size: int | None, *, channels: int = 3, label_map: bool = False) -> A.Compose:
    """Resize to size × size (`resize_image`), normalise, to tensor; ``size`` None keeps the
    image's own size (patch-trained models, run by sliding window)."""
    if size is None:
        return A.Compose(_to_network(channels))
    return A.Compose([ResizeSquare(size, label_map=label_map), *_to_network(channels)])


def train_transform(
    size: int, augment: str = "default", *, channels: int = 3, label_map: bool = False
) -> A.Compose:
    """The training pipeline ``augment`` (one of `AUGMENTATIONS`) at size × size."""
    if augment == "none":
        return eval_transform(size, channels=channels, label_map=label_map)
    if augment == "anatomy":
        return A.Compose([*_anatomy_geometry(size), *_anatomy_intensity(), *_to_network(channels)])
    if augment == "seed":
        return A.Compose([*_seed_geometry(size, label_map), _seed_noise(), *_to_network(channels)])
    if augment == "thin":
        return A.Compose(
            [
                *_seed_geometry(size, label_map),
                *_camera_colour(),
                _seed_noise(),
                *_to_network(channels),
            ]
        )
    if augment == "default":
        return A.Compose(
            [*_dermoscopy_geometry(size), *_dermoscopy_colour(), *_to_network(channels)]
        )
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


def _seed_geometry(size: int, label_map: bool) -> list:
    # The specification's: no zoom, so a structure one pixel wide stays one pixel wide.
    return [
        ResizeSquare(size, label_map=label_map),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Rotate(limit=20, border_mode=cv2.BORDER_CONSTANT, p=0.5),
    ]


def _seed_noise() -> A.BasicTransform:
    return A.GaussNoise(std_range=(0.02, 0.1), p=0.2)


def _camera_colour() -> list:
    # Cameras, lighting and skin or fundus pigmentation differ between clinics: vary brightness,
    # contrast, saturation and hue a little. Hue stays small: colour carries meaning.
    return [
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
    ]


def _dermoscopy_colour() -> list:
    # The camera's colour, plus sensor noise or the blur of a lens slightly out of focus.
    return [
        *_camera_colour(),
        A.OneOf([A.GaussNoise(std_range=(0.02, 0.06)), A.GaussianBlur(blur_limit=(3, 5))], p=0.2),
    ]


def _anatomy_geometry(size: int) -> list:
    # Anatomy has a side: a flipped chest puts the heart on the right and swaps the lungs'
    # labels, so no flips or quarter turns. Patients are framed a little differently, lean a
    # little and differ in size: small shifts, rotations and zooms. Constant borders: the edge
    # of a radiograph is dark, not a mirror of the body.
    return [
        A.RandomResizedCrop((size, size), scale=(0.7, 1.0), ratio=(0.85, 1.15), p=1.0),
        A.Affine(
            rotate=(-10, 10),
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            border_mode=cv2.BORDER_CONSTANT,
            p=0.7,
        ),
    ]


def _anatomy_intensity() -> list:
    # Exposure, detector and processing differ between machines and hospitals: contrast,
    # brightness and gamma vary more than for photographs, plus some noise and blur.
    return [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.3, p=0.8),
        A.RandomGamma(gamma_limit=(70, 150), p=0.5),
        A.OneOf([A.GaussNoise(std_range=(0.02, 0.06)), A.GaussianBlur(blur_limit=(3, 5))], p=0.3),
    ]


def _to_network(channels: int = 3) -> list:
    mean, std = normalisation(channels)
    return [A.Normalize(mean=mean, std=std), ToTensorV2()]
