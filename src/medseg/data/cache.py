"""Decode and resize a data set once; train from memory-mapped uint8 arrays afterwards.

Decoding a large dermoscopy JPEG and resizing it costs more than the network's step on it, and
it would otherwise be paid every epoch. ``prepare`` reads every pair once, checks it, resizes it
to ``size × size`` and stores two arrays (images ``(N, S, S, 3)``, masks ``(N, S, S)``) under
the cache folder (``$MEDSEG_CACHE_DIR``, else ``~/.cache/medseg``). The folder's name is a hash
of the size and of every source file's path, byte size and modification time, so changing any
source file, or the size, makes a new cache rather than reusing a stale one.

Preparing is also where bad files surface: each is named; with ``skip_bad`` it is left out
and listed, otherwise the first one stops the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.data.folder import Sample, check_pair
from medseg.data.io import read_image, read_mask
from medseg.data.transforms import resize_image, resize_mask
from medseg.errors import MedsegError
from medseg.files import atomic_path, write_text

CACHE_VERSION = 1


@dataclass
class PreparedCache:
    """Resized uint8 arrays of a list of samples; ``get(i)`` returns (image, bool mask)."""

    samples: list[Sample]
    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) uint8 in {0, 1}
    bad: list[str]  # "file: reason" for each sample left out

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.images[index]), np.asarray(self.masks[index]).astype(bool)


def cache_root() -> Path:
    return Path(os.environ.get("MEDSEG_CACHE_DIR") or Path.home() / ".cache" / "medseg")


def prepare(
    samples: list[Sample], *, size: int, skip_bad: bool = False, progress: bool = True
) -> PreparedCache:
    """Return the cache of `samples` at `size`, building it on first use."""
    folder = cache_root() / _cache_key(samples, size)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        cached = json.loads(manifest.read_text())
        if cached["bad"] and not skip_bad:  # built by a --skip-bad run: the files are still bad
            raise MedsegError(f"{cached['bad'][0]} (or pass --skip-bad to train without it)")
        return _open(folder, samples, cached)
    images, masks, kept, bad = _decode_all(samples, size, skip_bad=skip_bad, progress=progress)
    try:
        _store(folder, images, masks, kept, bad)
    except (MedsegError, OSError):
        # A read-only home or a full disk must not stop training: keep the arrays in memory.
        return PreparedCache([samples[i] for i in kept], images, masks, bad)
    return _open(folder, samples, json.loads(manifest.read_text()))


def _cache_key(samples: list[Sample], size: int) -> str:
    digest = hashlib.sha256(f"medseg-cache-v{CACHE_VERSION}:{size}".encode())
    for sample in samples:
        for path in (sample.image, sample.mask):
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:24]


def _decode_all(samples: list[Sample], size: int, *, skip_bad: bool, progress: bool):
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    masks = np.empty((len(samples), size, size), dtype=np.uint8)
    kept, bad = [], []
    for index, sample in enumerate(
        tqdm(samples, desc="preparing", disable=not progress, leave=False)
    ):
        try:
            image, mask = read_image(sample.image), read_mask(sample.mask)
            if image.shape[:2] != mask.shape:
                check_pair(sample)
        except MedsegError as error:
            if not skip_bad:
                raise MedsegError(f"{error} (or pass --skip-bad to train without it)") from error
            bad.append(str(error))
            continue
        images[len(kept)] = resize_image(image, size)
        masks[len(kept)] = resize_mask(mask, size)
        kept.append(index)
    if not kept:
        raise MedsegError(
            f"none of the {len(samples)} pairs could be read; first problem: {bad[0]}"
        )
    return images[: len(kept)], masks[: len(kept)], kept, bad


def _store(
    folder: Path, images: np.ndarray, masks: np.ndarray, kept: list[int], bad: list[str]
) -> None:
    for name, array in (("images.npy", images), ("masks.npy", masks)):
        with atomic_path(folder / name) as temporary, open(temporary, "wb") as handle:
            np.save(handle, array)
    # The manifest is written last: its presence means the arrays beside it are complete.
    write_text(folder / "manifest.json", json.dumps({"kept": kept, "bad": bad}))


def _open(folder: Path, samples: list[Sample], manifest: dict) -> PreparedCache:
    return PreparedCache(
        samples=[samples[i] for i in manifest["kept"]],
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        bad=manifest["bad"],
    )
