"""Decode and resize a data set once; train from memory-mapped uint8 arrays afterwards.

Decoding a large dermoscopy JPEG and resizing it costs more than the network's step on it, and
it would otherwise be paid every epoch. ``prepare`` reads every pair once, checks it, resizes it
to ``size × size`` and stores two arrays (images ``(N, S, S, C)``, masks ``(N, S, S)`` of class
values: 0/1 for binary masks, 0..K-1 for label maps) under
the cache folder (``$MEDSEG_CACHE_DIR``, else ``~/.cache/medseg``). The folder's name is a hash
of the size, the channels, the classes and every source file's path, byte size and modification
time, so changing any of them makes a new cache rather than reusing a stale one.

At ``size`` 0 (patch training) the images keep their own sizes: they are written end to end,
as they are decoded, into two flat files (``images.bin``, ``masks.bin``; each row's shape in the
manifest) and memory-mapped from there, so a folder of large images is never held in memory.

One cache holds a whole split folder (``train/``, ...), and ``prepare`` returns the rows of the
samples asked for: the training and validation shares of ``train/`` and ``medseg prepare``
all use the same cache.

Preparing is also where bad files surface: each is named; with ``skip_bad`` it is left out
and listed, otherwise the first one stops the run. A cache that cannot be read back (a damaged
manifest, a truncated array) is rebuilt, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from medseg.core.errors import MedsegError
from medseg.core.files import atomic_path, remove_partial_files, write_text
from medseg.core.progress import progress_bar
from medseg.data.folder import Sample, check_pair, find_pairs
from medseg.data.io import read_image, read_target
from medseg.data.transforms import resize_image, resize_target

CACHE_VERSION = 5  # 3: channels and label maps; 4: images at their own size; 5: EXIF turned


class Rows:
    """The rows ``rows`` of ``array``, read only when indexed (like ``array[rows]``, uncopied).

    A share of a memory-mapped cache so stays on disk; ``np.asarray`` makes the copy.
    """

    def __init__(self, array: np.ndarray, rows: list[int]):
        self.array = array
        self.rows = np.asarray(rows, dtype=np.intp)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        return self.array[(self.rows[first], *rest)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.array[self.rows], dtype=dtype)


class Ragged:
    """Arrays of different heights and widths stored end to end in one flat uint8 array;
    ``ragged[row]`` is a view of one of them."""

    def __init__(self, flat: np.ndarray, shapes: list[tuple[int, ...]], offsets=None):
        self.flat = flat
        self.shapes = [tuple(shape) for shape in shapes]
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.offsets = list(offsets) if offsets is not None else np.cumsum([0, *sizes]).tolist()

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, row: int) -> np.ndarray:
        start = self.offsets[row]
        size = int(np.prod(self.shapes[row]))
        return self.flat[start : start + size].reshape(self.shapes[row])

    def select(self, rows: list[int]) -> Ragged:
        return Ragged(self.flat, [self.shapes[r] for r in rows], [self.offsets[r] for r in rows])


@dataclass
class PreparedCache:
    """Resized uint8 arrays of a list of samples; ``get(i)`` returns (image, target)."""

    samples: list[Sample]
    images: np.ndarray | Rows | Ragged  # (N, S, S, C) uint8, or N (H, W, C) at size 0
    masks: np.ndarray | Rows | Ragged  # (N, S, S) uint8 class values (binary: 0/1)
    bad: list[str]  # "file: reason" for each sample left out

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.images[index]), np.asarray(self.masks[index])


@dataclass
class _Entry:
    """One folder's cache: a row of each array per readable pair, and what its manifest says."""

    images: np.ndarray | Ragged  # (R, S, S, C) uint8, or R (H, W, C) at size 0
    masks: np.ndarray | Ragged  # (R, S, S) uint8 class values
    kept: list[int]  # the pair (index into the folder's pairs) behind each row
    bad: dict[int, str]  # pair index -> "file: reason"
    foreground: list[bool]  # per row: whether the full-size mask has a foreground pixel


def cache_root() -> Path:
    return Path(os.environ.get("MEDSEG_CACHE_DIR") or Path.home() / ".cache" / "medseg")


@dataclass(frozen=True)
class Layout:
    """How a data set's files become arrays: network size, image channels, class names."""

    size: int  # 0: each image's own size
    channels: int = 3
    labels: tuple[str, ...] = ()  # empty: binary masks by the half-range rule

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    @property
    def native(self) -> bool:
        return self.size == 0


def cache_layout(data) -> dict:
    """`prepare`'s size, channels and labels for a planned `medseg.config.DataConfig`: patch
    training caches the images at their own size (0)."""
    size = 0 if data.mode == "patch" else data.image_size
    return {"size": size, "channels": data.channels, "labels": data.labels}


def prepare(
    samples: list[Sample],
    *,
    size: int,
    channels: int = 3,
    labels: list[str] | tuple[str, ...] = (),
    skip_bad: bool = False,
    progress: bool = True,
) -> PreparedCache:
    """Return the cache of `samples` at `size`, building their folder's cache on first use."""
    if not samples:
        raise MedsegError("there are no image + mask pairs to prepare; check the data folder")
    layout = Layout(size=size, channels=channels, labels=tuple(labels))
    pairs = _folder_pairs(samples)
    position = {sample: index for index, sample in enumerate(pairs)}
    wanted = [position[sample] for sample in samples]
    folder = cache_root() / _cache_key(pairs, layout)
    with _only_builder(folder):
        with contextlib.suppress(OSError):  # a cache that cannot be cleaned can still be used
            remove_partial_files(folder)  # what a killed build left: up to the size of the arrays
        entry = _open(folder, len(pairs), layout)
        if entry is None:
            stop_at = set() if skip_bad else set(wanted)
            entry = _build(folder, pairs, layout, stop_at=stop_at, progress=progress)
    return _select(entry, pairs, wanted, skip_bad=skip_bad, labels=layout.labels)


@contextlib.contextmanager
def _only_builder(folder: Path) -> Iterator[None]:
    """Hold the cache folder's lock while it is cleaned, opened or built.

    Runs started together on the same data (folds, seeds, a second terminal) would otherwise
    take each other's files being written for a killed build's leftovers and remove them; with
    the lock, the later ones wait and then open the cache the first one built. Where no lock
    file can be made (a read-only cache), the build keeps its arrays in memory anyway.
    """
    lock = FileLock(folder / "build.lock") if _writable(folder) else None
    try:
        if lock is not None:
            _acquire(lock, folder)
    except OSError:  # a file system that refuses locks: go on unlocked
        lock = None
    built = False
    try:
        yield
        built = True
    finally:
        if lock is not None:
            lock.release()
        if not built:
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    """Remove what a failed first build leaves: the folder with its lock file alone."""
    with contextlib.suppress(OSError):
        if [path.name for path in folder.iterdir()] == ["build.lock"]:
            (folder / "build.lock").unlink()
            folder.rmdir()


def _acquire(lock: FileLock, folder: Path) -> None:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting for another medseg process to finish preparing {folder}")
        lock.acquire()


def _folder_pairs(samples: list[Sample]) -> list[Sample]:
    """Every pair of the split folder that holds `samples`, or `samples` when they are not that.

    Samples listed some other way (from several folders, or by hand) get a cache of their own.
    """
    first = samples[0]
    if first.mask is None or not first.mask.stem.startswith(first.id):
        return samples
    suffix = first.mask.stem[len(first.id) :]
    try:
        pairs = find_pairs(first.image.parent.parent, mask_suffix=suffix)
    except MedsegError:
        return samples
    known = set(pairs)
    return pairs if all(sample in known for sample in samples) else samples


def _cache_key(pairs: list[Sample], layout: Layout) -> str:
    digest = hashlib.sha256(f"medseg-cache-v{CACHE_VERSION}:{layout}".encode())
    for sample in pairs:
        for path in (sample.image, sample.mask):
            digest.update(f"{file_identity(path)};".encode())
    return digest.hexdigest()[:24]


def file_identity(path: Path) -> str:
    """Path, byte size and modification time of a source file, for the cache key.

    A file that cannot be stat'ed (a broken link, a link loop) keys on that instead: reading it
    then says what is wrong, and fixing it changes the key.
    """
    try:
        status = path.stat()
    except OSError as error:
        return f"{path.absolute()}:unreadable:{error.errno}"
    return f"{path.resolve()}:{status.st_size}:{status.st_mtime_ns}"


def _open(folder: Path, count: int, layout: Layout) -> _Entry | None:
    """The cache in `folder`, or None when there is none or it is damaged (then it is said)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():  # never built, or its build was killed before the end
        return None
    try:
        return _load(folder, count, layout)
    except (OSError, ValueError, KeyError, TypeError) as error:
        _warn(f"the cache {folder} was damaged ({_damage(error)}); rebuilding it")
        with contextlib.suppress(OSError):
            manifest.unlink()  # until the rebuild completes, the folder holds no valid cache
        return None


def _load(folder: Path, count: int, layout: Layout) -> _Entry:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except ValueError as error:
        raise ValueError(f"manifest.json is not JSON: {error}") from error
    kept = [int(index) for index in manifest["kept"]]
    bad = {int(index): str(message) for index, message in manifest["bad"]}
    foreground = [bool(flag) for flag in manifest["foreground"]]
    if manifest["pairs"] != count or len(foreground) != len(kept):
        raise ValueError("its manifest does not match its data")
    if sorted([*kept, *bad]) != list(range(count)):
        raise ValueError("its manifest does not account for every pair")
    if layout.native:
        shapes = [tuple(shape) for shape in manifest["shapes"]]
        if len(shapes) != len(kept):
            raise ValueError("its manifest does not match its data")
        return _Entry(
            images=_load_ragged(folder / "images.bin", [(*s, layout.channels) for s in shapes]),
            masks=_load_ragged(folder / "masks.bin", shapes),
            kept=kept,
            bad=bad,
            foreground=foreground,
        )
    return _Entry(
        images=_load_array(folder / "images.npy", (len(kept), *layout.image_shape)),
        masks=_load_array(folder / "masks.npy", (len(kept), layout.size, layout.size)),
        kept=kept,
        bad=bad,
        foreground=foreground,
    )


def _load_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Map a uint8 array of `shape` from `path`; a ValueError names what is wrong with it."""
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as error:  # truncated, or not an .npy file
        raise ValueError(f"{path.name} is not a whole array: {error}") from error
    if array.shape != shape or array.dtype != np.uint8:
        raise ValueError(f"{path.name} holds {array.dtype} {array.shape}, not uint8 {shape}")
    return array


def _load_ragged(path: Path, shapes: list[tuple[int, ...]]) -> Ragged:
    """Map the flat uint8 file of arrays of `shapes`; a ValueError when its size differs."""
    expected = sum(int(np.prod(shape)) for shape in shapes)
    if path.stat().st_size != expected:
        raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, not {expected}")
    return Ragged(np.memmap(path, dtype=np.uint8, mode="r", shape=(expected,)), shapes)


def _damage(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{Path(error.filename).name}: {error.strerror or error}"
    if isinstance(error, KeyError):
        return f"its manifest lacks {error}"
    return " ".join(str(error).split())[:200]


def _build(
    folder: Path, pairs: list[Sample], layout: Layout, *, stop_at: set[int], progress: bool
) -> _Entry:
    if layout.native:
        return _build_native(folder, pairs, layout, stop_at=stop_at, progress=progress)
    entry = _decode_all(pairs, layout, stop_at=stop_at, progress=progress)
    try:
        _store(folder, entry)
        return _load(folder, len(pairs), layout)
    except (MedsegError, OSError):
        # A read-only home or a full disk must not stop training: keep the arrays in memory.
        return entry


def _decode_all(
    pairs: list[Sample], layout: Layout, *, stop_at: set[int], progress: bool
) -> _Entry:
    """Read and resize every pair; a bad one stops it if its index is in `stop_at`."""
    images = np.empty((len(pairs), *layout.image_shape), dtype=np.uint8)
    masks = np.empty((len(pairs), layout.size, layout.size), dtype=np.uint8)
    kept, bad, foreground = [], {}, []
    for index, image, mask in _decoded(pairs, layout, bad, stop_at=stop_at, progress=progress):
        images[len(kept)] = resize_image(image, layout.size).reshape(layout.image_shape)
        masks[len(kept)] = resize_target(mask, layout.size, label_map=bool(layout.labels))
        foreground.append(bool(mask.any()))
        kept.append(index)
    return _Entry(images[: len(kept)], masks[: len(kept)], kept, bad, foreground)


def _decoded(pairs: list[Sample], layout: Layout, bad: dict[int, str], *, stop_at, progress):
    """(index, image, target) of each readable pair at its own size; the others go into `bad`,
    unless their index is in `stop_at` (then the first one stops it)."""
    for index, sample in enumerate(
        progress_bar(pairs, desc="preparing", enabled=progress, leave=False)
    ):
        try:
            image = read_image(sample.image, channels=layout.channels)
            mask = read_target(sample.mask, layout.labels)
            if image.shape[:2] != mask.shape:
                check_pair(sample)
        except MedsegError as error:
            if index in stop_at:
                raise MedsegError(f"{error} (or pass --skip-bad to train without it)") from error
            bad[index] = str(error)
            continue
        yield index, image, mask
    if len(bad) == len(pairs):
        first = next(iter(bad.values()))
        raise MedsegError(f"none of the {len(pairs)} pairs could be read; first problem: {first}")


def _build_native(
    folder: Path, pairs: list[Sample], layout: Layout, *, stop_at: set[int], progress: bool
) -> _Entry:
    """Write each pair at its own size into images.bin / masks.bin as it is decoded."""
    decoding = {"stop_at": stop_at, "progress": progress}
    if not _writable(folder):  # a read-only home must not stop training: keep them in memory
        images, masks = io.BytesIO(), io.BytesIO()
        entry = _write_native(pairs, layout, images, masks, **decoding)
        entry.images = Ragged(np.frombuffer(images.getvalue(), np.uint8), entry.images.shapes)
        entry.masks = Ragged(np.frombuffer(masks.getvalue(), np.uint8), entry.masks.shapes)
        return entry
    with (
        atomic_path(folder / "images.bin") as image_path,
        atomic_path(folder / "masks.bin") as mask_path,
        open(image_path, "wb") as images,
        open(mask_path, "wb") as masks,
    ):
        entry = _write_native(pairs, layout, images, masks, **decoding)
    _write_manifest(folder, entry, shapes=[list(shape) for shape in entry.masks.shapes])
    return _load(folder, len(pairs), layout)


def _writable(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    return os.access(folder, os.W_OK)


def _write_native(pairs: list[Sample], layout: Layout, images, masks, **decoding) -> _Entry:
    """Append each readable pair's bytes to the files `images` and `masks`; an entry whose
    arrays are still empty, with the rows' shapes."""
    kept, bad, foreground, shapes = [], {}, [], []
    for index, image, mask in _decoded(pairs, layout, bad, **decoding):
        images.write(np.ascontiguousarray(image).tobytes())
        masks.write(np.ascontiguousarray(mask).tobytes())
        shapes.append(mask.shape)
        foreground.append(bool(mask.any()))
        kept.append(index)
    empty = np.empty(0, np.uint8)  # the shapes alone, until the written bytes are mapped
    return _Entry(
        images=Ragged(empty, [(*shape, layout.channels) for shape in shapes]),
        masks=Ragged(empty, shapes),
        kept=kept,
        bad=bad,
        foreground=foreground,
    )


def _store(folder: Path, entry: _Entry) -> None:
    for name, array in (("images.npy", entry.images), ("masks.npy", entry.masks)):
        with atomic_path(folder / name) as temporary, open(temporary, "wb") as handle:
            np.save(handle, array)
    _write_manifest(folder, entry)


def _write_manifest(folder: Path, entry: _Entry, **extra) -> None:
    # The manifest is written last: its presence means the arrays beside it are complete.
    manifest = {
        "pairs": len(entry.kept) + len(entry.bad),
        "kept": entry.kept,
        "bad": sorted(entry.bad.items()),
        "foreground": entry.foreground,
        **extra,
    }
    write_text(folder / "manifest.json", json.dumps(manifest))


def _select(entry: _Entry, pairs: list[Sample], wanted: list[int], *, skip_bad: bool, labels=()):
    """The rows of the `wanted` pairs, in their order; refuse a bad one unless `skip_bad`."""
    bad = [entry.bad[index] for index in wanted if index in entry.bad]
    if bad and not skip_bad:  # built for another share, or by a --skip-bad run: still bad
        raise MedsegError(f"{bad[0]} (or pass --skip-bad to train without it)")
    row_of = {index: row for row, index in enumerate(entry.kept)}
    rows = [row_of[index] for index in wanted if index in row_of]
    if not rows:
        raise MedsegError(f"none of the {len(wanted)} pairs could be read; first problem: {bad[0]}")
    _check_foreground(entry, rows, pairs[entry.kept[rows[0]]].mask.parent, labels)
    return PreparedCache(
        samples=[pairs[entry.kept[row]] for row in rows],
        images=_take(entry.images, rows),
        masks=_take(entry.masks, rows),
        bad=bad,
    )


def _take(array: np.ndarray | Ragged, rows: list[int]) -> np.ndarray | Rows | Ragged:
    if rows == list(range(len(array))):
        return array
    if isinstance(array, Ragged):
        return array.select(rows)
    return Rows(array, rows) if isinstance(array, np.memmap) else array[rows]


# A training run opens one folder's cache twice (its training and validation shares): say once
# that the whole folder has no foreground.
_warned_folders: set[Path] = set()


def _empty_advice(labels: tuple[str, ...]) -> tuple[str, str]:
    """(what none of the masks has, what to check) for binary masks or label maps."""
    if len(labels) > 2:
        return "a pixel of any class but background", (
            f"the model would learn to find nothing; check that the masks hold the class values "
            f"1..{len(labels) - 1} that dataset.json declares ({', '.join(labels[1:4])}"
            f"{', ...' if len(labels) > 4 else ''}), not only 0"
        )
    return "a foreground pixel", (
        "the model would learn to find nothing; check that the lesion is white (255, or 1) in them"
    )


def _check_foreground(
    entry: _Entry, rows: list[int], mask_folder: Path, labels: tuple[str, ...] = ()
) -> None:
    """Warn when none of the masks of `rows` (from the manifest, not the masks) has foreground:
    for label maps, a pixel of any class but background."""
    missing, advice = _empty_advice(tuple(labels))
    if not any(entry.foreground):
        if mask_folder not in _warned_folders:
            _warned_folders.add(mask_folder)
            _warn(f"none of the {len(entry.kept)} masks in {mask_folder} has {missing}; {advice}")
    elif not any(entry.foreground[row] for row in rows):
        _warn(
            f"none of the {len(rows)} masks used here (of {len(entry.kept)}) in {mask_folder} "
            f"has {missing}; {advice}"
        )


def _warn(message: str) -> None:
    """One warning line on stderr, as the command line prints its errors."""
    _say(f"warning: {message}")


def _say(message: str) -> None:
    print(f"medseg: {message}", file=sys.stderr)
