"""Folders of image + mask pairs in the ISIC layout, and the train/validation/test split.

```
DATA_ROOT/
  train/images/<id>.jpg   train/masks/<id>_segmentation.png
  val/...                 (optional; otherwise a seeded share of train/ is held out)
  test/...
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medseg.core.errors import MedsegError
from medseg.data.io import IMAGE_EXTENSIONS, image_size, read_error, read_image, read_target
from medseg.data.transforms import ImageCorrection

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image and its mask (None when predicting on images alone)."""

    id: str
    image: Path
    mask: Path | None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder` (sorted by name), hidden files and subfolders skipped.

    A link that leads nowhere is kept, so that reading it names the problem instead of the
    image silently vanishing from the data set.
    """
    folder = Path(folder)
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries if not _is_folder(entry)]
    except OSError as error:
        raise MedsegError(read_error(folder, error, kind="folder")) from error
    return sorted(
        folder / name
        for name in names
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")
    )


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop, an unreadable target: not a folder; reading it will say why
        return False


def find_pairs(folder: str | Path, *, mask_suffix: str = "_segmentation") -> list[Sample]:
    """Match ``folder/images/<id>.*`` with ``folder/masks/<id><mask_suffix>.png`` by id.

    Images without a mask and masks without an image are errors that name them (the first
    five, and how many more), because a silently shrunken data set gives silently wrong results.
    """
    folder = Path(folder)
    image_dir, mask_dir = folder / "images", folder / "masks"
    for required in (folder, image_dir, mask_dir):
        if not required.is_dir():
            raise MedsegError(
                f"{required} is not a folder; expected {folder}/images/<id>.jpg and "
                f"{folder}/masks/<id>{mask_suffix}.png"
            )
    images: dict[str, Path] = {}
    for path in list_images(image_dir):
        if path.stem in images:  # a.jpg and a.png: which one the mask belongs to is unknowable
            raise MedsegError(
                f"{images[path.stem].name} and {path.name} in {image_dir} share the id {path.stem!r}; keep one"
            )
        images[path.stem] = path
    masks = {}
    for path in list_images(mask_dir):
        if path.stem.endswith(mask_suffix):
            masks[path.stem[: len(path.stem) - len(mask_suffix)]] = path
        else:
            masks[f"\0{path.name}"] = path  # a mask file not named <id><suffix>: reported below
    if not images:
        raise MedsegError(
            f"no images in {image_dir} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            f"put <id>.jpg files there with their masks in {mask_dir}"
        )
    _report_unmatched(
        "images without a mask",
        [images[i].name for i in images.keys() - masks.keys()],
        mask_dir,
        f"<id>{mask_suffix}.png",
    )
    _report_unmatched(
        "masks without an image",
        [masks[i].name for i in masks.keys() - images.keys()],
        image_dir,
        "<id>.jpg",
    )
    return [Sample(id=key, image=images[key], mask=masks[key]) for key in sorted(images)]


def _report_unmatched(what: str, names: list[str], where: Path, expected: str) -> None:
    if not names:
        return
    names = sorted(names)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise MedsegError(f"{len(names)} {what}: {shown}; expected a matching {where}/{expected}")


def find_split(root: str | Path, split: str) -> Path | None:
    """``root/split`` if it holds images/ and masks/, else None."""
    folder = Path(root) / split
    return folder if (folder / "images").is_dir() else None


def resolve_split_folder(path: str | Path, *, preferred: str = "test") -> Path:
    """Accept either a split folder (with images/) or a data root (then use its `preferred` split)."""
    path = Path(path)
    if not path.is_dir():
        raise MedsegError(f"data folder not found: {path}")
    if (path / "images").is_dir():
        return path
    for split in (preferred, *SPLIT_NAMES):
        if find_split(path, split):
            return path / split
    raise MedsegError(
        f"{path} holds neither images/ and masks/ nor {'/'.join(SPLIT_NAMES)} subfolders with them"
    )


def train_pairs(root: str | Path, *, mask_suffix: str) -> list[Sample]:
    """The pairs of a data root's ``train/`` folder (the one every run needs)."""
    root = Path(root)
    if not root.is_dir():
        raise MedsegError(
            f"data root not found: {root}; pass the folder that holds train/images and train/masks"
        )
    train_folder = find_split(root, "train")
    if train_folder is None:
        raise MedsegError(
            f"{root} has no train/images folder; expected {root}/train/images and {root}/train/masks"
        )
    return find_pairs(train_folder, mask_suffix=mask_suffix)


def train_val_samples(
    root: str | Path, *, mask_suffix: str, val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples: ``val/`` when present, else a seeded share of ``train/``.

    ``test/`` is never touched here: it is for the final report, not for choosing checkpoints.
    """
    root = Path(root)
    train = train_pairs(root, mask_suffix=mask_suffix)
    val_folder = find_split(root, "val")
    if val_folder is not None:
        return train, find_pairs(val_folder, mask_suffix=mask_suffix)
    if len(train) < 2:
        raise MedsegError(
            f"{root / 'train'} has {len(train)} pair; need at least 2 to hold one out for validation"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    val_count = min(len(train) - 1, max(1, round(val_fraction * len(train))))
    val_indices = set(order[:val_count].tolist())
    return (
        [s for i, s in enumerate(train) if i not in val_indices],
        [s for i, s in enumerate(train) if i in val_indices],
    )


def check_pair(sample: Sample) -> None:
    """Refuse a mask whose size differs from its image's (it would be silently stretched)."""
    if sample.mask is None:
        return
    image_shape, mask_shape = image_size(sample.image), image_size(sample.mask)
    if image_shape != mask_shape:
        raise MedsegError(
            f"mask {sample.mask.name} is {mask_shape[1]}×{mask_shape[0]} but image "
            f"{sample.image.name} is {image_shape[1]}×{image_shape[0]}; masks must match their "
            f"images, so resize or replace the mask"
        )


class SegmentationFolder(Dataset):
    """Pairs of (image, mask) from disk, transformed by an Albumentations pipeline.

    An item is a dict: ``image`` float (C, S, S) normalised, ``mask`` float (1, S, S) of class
    values (binary: 0/1), ``id`` str. The index may be an int or ``(int, seed)``: with a seed, the random augmentation
    of that item is fixed by it, so a run is reproducible whatever the worker count, and a resumed
    run sees exactly the augmentations the uninterrupted one would have.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform,
        *,
        cache=None,
        channels: int = 3,
        labels: list[str] | tuple[str, ...] = (),
        correction: ImageCorrection | None = None,
    ):
        self.samples = samples
        self.transform = transform
        self.cache = cache  # optional PreparedCache: arrays decoded and resized once
        self.channels = channels  # for reading without a cache
        self.labels = labels
        self.correction = correction or ImageCorrection()  # applied by `load`

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image (H, W, C), whole and corrected (`ImageCorrection`), and uint8 target
        (H, W) of one sample, before any augmentation (and any patch cut from them)."""
        image, mask = self._read(index)
        return self.correction(image), mask

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None:
            return self.cache.get(index)
        sample = self.samples[index]
        image = read_image(sample.image, channels=self.channels)
        mask = read_target(sample.mask, self.labels)
        if image.shape[:2] != mask.shape:
            check_pair(sample)  # raises with both names and sizes
        return image, mask

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, seed = index if isinstance(index, tuple) else (index, None)
        image, mask = self.load(index)
        if seed is not None:
            self.transform.set_random_seed(seed)
        out = self.transform(image=image, mask=mask.astype(np.uint8))
        return {
            "image": out["image"],
            "mask": torch.as_tensor(out["mask"], dtype=torch.float32).unsqueeze(0),
            "id": self.samples[index].id,
        }
