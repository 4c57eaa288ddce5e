"""The settings a data set decides, derived from its files as nnU-Net's plans are.

A config leaves some settings to the data (``data.image_size=0``, ``data.augment="auto"``,
and the classes and channels of a dataset.json). `plan` fills them in when training starts;
the run's config.yaml and checkpoints record the result, so prediction never plans again.

- Classes and channels: from the data root's dataset.json (`medseg.data.dataset`), else binary
  RGB. A few training images are looked at: a note says when they hold colour that a declared
  single channel drops (read as gray), or are all gray where three channels are declared.
- Resolution: the smallest `SIZES` entry, from the default recipe's 160 for binary masks
  (measured on ISIC, README Recipes) and from 128 for label maps, at which every class of the
  training masks survives the round trip there and back (nearest down, as the cache resizes
  label maps; one-hot bilinear up and arg-max, as predictions come back) with mean Dice at
  least `ROUND_TRIP_DICE`: thin structures (clavicles) decide it. When no size below the
  images' own keeps them (retinal vessels are 1-3 pixels wide), the network trains on
  patches at the images' own resolution (``data.mode=patch``) of `PATCH_SIZE`, or the largest
  multiple of 32 the smallest image holds, and predicts by sliding window.
- Decoder stride: the paper's 4 for resized images; 2 for patches, whose structures are the
  ones no resize keeps: DRIVE's vessel masks keep Dice 0.78 through a round trip to a quarter
  of their size, 0.92 to half (README Results).
- Augmentation: "default" (flips and turns) for binary masks; "anatomy" (no flips) for label
  maps, whose classes often have a side (a right and a left lung). Binary masks trained on
  patches get "thin" (flips, small turns, colour, noise): the default's zoom and blur change
  what a structure one pixel wide is (measured on DRIVE: README Results).
- Epochs (`planned_epochs`, once the batches are known): `MIN_EPOCHS`, the default recipe's
  (ISIC: 95 steps an epoch), or as many as make `MIN_STEPS` optimizer steps on a small data
  set (JSRT's 112 training images are 7 steps an epoch), as nnU-Net fixes the number of
  iterations rather than of epochs; `MIN_PATCH_STEPS` for patch training, what a 2-core CPU
  trains within the hour at `PATCH_SIZE` (DRIVE: README Results).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg.config import Config, validate
from medseg.config.settings import MAX_IMAGE_SIZE
from medseg.core.errors import MedsegError
from medseg.data import reading
from medseg.data.dataset import DatasetInfo, find_dataset_json, read_dataset_info
from medseg.data.folder import train_pairs
from medseg.data.io import read_image, read_target
from medseg.data.transforms import resize_label_map, resize_probabilities

BINARY_IMAGE_SIZE = 160
SIZES = (128, 160, 192, 224, 256, 320, 384, 448, 512)
ROUND_TRIP_DICE = 0.96
FINGERPRINT_MASKS = 40  # masks read for the size plan: enough for a stable mean, read in seconds
CHANNEL_IMAGES = 8  # images looked at for their colour: enough to tell a colour set from a gray one
SHOWN_CLASSES = 8  # class names printed before "..."
PATCH_SIZE = 256  # enough context for a vessel or a nucleus; what a 2-core CPU trains in an hour
MIN_EPOCHS = 50
MIN_STEPS = 600
MIN_PATCH_STEPS = 800


def plan(config: Config, data_root: str | Path) -> Config:
    """``config`` with the settings it leaves to the data filled in; prints what was chosen.

    A config that leaves nothing to the data (a resumed run's) comes back unchanged.
    """
    info = read_dataset_info(data_root) or DatasetInfo(
        labels=tuple(config.data.labels), channels=config.data.channels
    )
    labels = list(info.labels)
    data = replace(config.data, labels=labels, channels=info.channels)
    model = replace(
        config.model,
        num_classes=len(labels) if len(labels) > 2 else 1,
        in_channels=info.channels,
    )
    notes = []
    if data.image_size == 0 or data.mode == "auto":
        data.mode, data.image_size, note = _resolution(data, labels, data_root)
        notes.append(note)
    if data.augment == "auto":
        data.augment = augmentation_for(labels, data.mode)
        notes.append(f"augmentation {data.augment!r}")
    if model.decoder_stride == 0:
        model.decoder_stride = 2 if data.mode == "patch" else 4
        notes.append(f"decoder at stride {model.decoder_stride}")
    if model.pooling_window == 0 and data.mode == "patch":
        model.pooling_window = data.image_size
        notes.append(f"image pooling over {data.image_size}-pixel windows")
    planned = replace(config, data=data, model=model)
    validate(planned)
    if notes:
        print(f"plan from the data: {describe_classes(planned)}; " + "; ".join(notes))
        if info.channels_declared:
            _check_channels(data_root, data.mask_suffix, info.channels)
    return planned


def planned_epochs(config: Config, steps_per_epoch: int) -> Config:
    """``config`` with ``train.epochs`` planned when it is 0 (see the module docstring)."""
    if config.train.epochs:
        return config
    steps = MIN_PATCH_STEPS if config.data.mode == "patch" else MIN_STEPS
    epochs = max(MIN_EPOCHS, math.ceil(steps / max(steps_per_epoch, 1)))
    print(
        f"plan from the data: {epochs} epochs of {steps_per_epoch} steps "
        f"(at least {MIN_EPOCHS} epochs and {steps} steps)"
    )
    return replace(config, train=replace(config.train, epochs=epochs))


def augmentation_for(labels: list[str] | tuple[str, ...], mode: str = "resize") -> str:
    """The training augmentation "auto" stands for: see the module docstring."""
    if len(labels) > 2:
        return "anatomy"
    return "thin" if mode == "patch" else "default"


def describe_classes(config: Config) -> str:
    labels, channels = config.data.labels, config.data.channels
    kind = "grayscale" if channels == 1 else f"{channels}-channel"
    if len(labels) > 2:
        names = list(labels)
        if len(names) > SHOWN_CLASSES:
            names = [*names[: SHOWN_CLASSES - 1], "...", names[-1]]
        return f"{len(labels)} classes ({', '.join(names)}), {kind} images"
    return f"binary masks, {kind} images"


def _check_channels(data_root, mask_suffix: str, channels: int) -> None:
    """A note when a few training images contradict the channels dataset.json declares:
    colour read as gray (1 declared; the colour is lost), or gray read as three equal channels
    (3 declared; the network then takes three copies of one channel). Either trains, so it is
    said rather than refused: the declaration may be meant (colour that carries nothing)."""
    if channels not in (1, 3):
        return
    images = [sample.image for sample in train_pairs(data_root, mask_suffix=mask_suffix)]
    coloured = []
    for path in images[:: max(1, len(images) // CHANNEL_IMAGES)][:CHANNEL_IMAGES]:
        with contextlib.suppress(MedsegError):  # a bad image is left to the cache, which names it
            image = read_image(path, channels=3)
            coloured.append((path, bool(np.ptp(image, axis=2).any())))
    colour = [path for path, is_colour in coloured if is_colour]
    declared = find_dataset_json(data_root)
    if channels == 1 and colour:
        reading.note(
            f"{declared} declares 1 channel but {len(colour)} of {len(coloured)} training images "
            f"looked at are in colour (first {colour[0].name}); they are read as gray (luma), so "
            f'their colour is lost: declare "channels": 3 if it matters'
        )
    elif channels == 3 and coloured and not colour:
        reading.note(
            f"{declared} declares 3 channels but the {len(coloured)} training images looked at "
            f"are gray (first {coloured[0][0].name}); each is read as three equal channels: "
            f'declare "channels": 1 for a grayscale network'
        )


def _resolution(data, labels: list[str], data_root) -> tuple[str, int, str]:
    """(mode, image size, what to print): see the module docstring. A mode or size the config
    sets is kept; the other is planned."""
    masks = _fingerprint_masks(data_root, data.mask_suffix, labels)
    if not masks:  # nothing readable: the cache says why
        return "resize", data.image_size or BINARY_IMAGE_SIZE, "no readable mask to plan from"
    shortest = min(min(mask.shape) for mask in masks)
    patch_size = data.image_size or min(PATCH_SIZE, max(32, shortest // 32 * 32))
    if data.mode == "patch":
        return "patch", patch_size, _patch_note(patch_size, "data.mode=patch")
    size, note = _resize_size(masks, labels)
    if data.mode == "resize" or size is not None:
        if data.image_size:
            return "resize", data.image_size, f"{data.image_size}×{data.image_size} (set)"
        if size is None:
            return "resize", SIZES[-1], f"{SIZES[-1]}×{SIZES[-1]} (data.mode=resize; {note})"
        return "resize", size, note
    return "patch", patch_size, _patch_note(patch_size, note)


def _patch_note(size: int, why: str) -> str:
    return f"patches of {size}×{size} at the images' own resolution ({why})"


def _fingerprint_masks(data_root, mask_suffix: str, labels: list[str]) -> list[np.ndarray]:
    train_masks = [sample.mask for sample in train_pairs(data_root, mask_suffix=mask_suffix)]
    step = max(1, len(train_masks) // FINGERPRINT_MASKS)
    masks = []
    for path in train_masks[::step][:FINGERPRINT_MASKS]:
        # A bad mask is left to the cache, which names it (or skips it with --skip-bad).
        with contextlib.suppress(MedsegError):
            masks.append(read_target(path, labels))
    return masks


def _resize_size(masks: list[np.ndarray], labels: list[str]) -> tuple[int | None, str]:
    """The smallest size every class survives, or None (and why) when none up to the images'
    own does (a square at their own size still distorts images that are not square)."""
    names = labels if len(labels) > 2 else ["background", "foreground"]
    native = max(max(mask.shape) for mask in masks)
    first = SIZES[0] if len(labels) > 2 else BINARY_IMAGE_SIZE
    if len(labels) <= 2 and native <= first:  # the recipe's size loses nothing of small images
        return first, f"{first}×{first} (binary masks)"
    # A native side past what the network may take is left to patches.
    candidates = [size for size in SIZES if first <= size < native]
    candidates += [native] if native <= MAX_IMAGE_SIZE else []
    for size in candidates:
        worst_name, worst = _worst_class(masks, size, names)
        if worst >= ROUND_TRIP_DICE:
            if size == native:
                return native, f"{native}×{native} (the images' own size)"
            return size, (
                f"{size}×{size} (every class keeps Dice ≥ {ROUND_TRIP_DICE} through the resize; "
                f"lowest {worst_name} {worst:.3f})"
            )
    return None, f"resized to {size}×{size} and back, {worst_name} keeps Dice {worst:.3f}"


def _worst_class(masks: list[np.ndarray], size: int, labels: list[str]) -> tuple[str, float]:
    """The class with the lowest mean round-trip Dice at ``size``, and that Dice."""
    classes = len(labels)
    totals = np.zeros(classes)
    counts = np.zeros(classes)
    for mask in masks:
        back = round_trip(mask, size, classes)
        for value in range(1, classes):
            truth, kept = mask == value, back == value
            denominator = truth.sum() + kept.sum()
            if denominator:
                totals[value] += 2 * (truth & kept).sum() / denominator
                counts[value] += 1
    means = np.where(counts > 0, totals / np.maximum(counts, 1), 1.0)
    worst = int(np.argmin(means[1:])) + 1
    return labels[worst], float(means[worst])


def round_trip(mask: np.ndarray, size: int, classes: int) -> np.ndarray:
    """A label map sent to size × size as training reads it, and back as a prediction comes back."""
    small = resize_label_map(mask, size)
    one_hot = np.stack([(small == value).astype(np.float32) for value in range(classes)])
    return resize_probabilities(one_hot, mask.shape[:2]).argmax(0).astype(np.uint8)
