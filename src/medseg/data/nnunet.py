"""nnU-Net v2's raw data format, read as a medseg data root of 2D slices.

```
ROOT/dataset.json   {"channel_names": {"0": "FLAIR", "1": "T1c"}, "labels": {"background": 0, ...},
                     "file_ending": ".nii.gz", "numTraining": 2}
ROOT/imagesTr/<case>_0000.nii.gz, <case>_0001.nii.gz, ...   one file per channel
ROOT/labelsTr/<case>.nii.gz
ROOT/imagesTs/, ROOT/labelsTs/                              optional: the test split
```

`slice_root` turns such a root, once, into a root in medseg's own layout under the cache folder
(``train/images/<case>_z<k>.png|.npy``, ``train/masks/<case>_z<k>_segmentation.png``, ``test/``
and a medseg dataset.json) and returns it, so training, evaluation and ``medseg prepare`` read
it as any other root. Volumes are cut along `SLICE_AXIS`; each channel is windowed per volume
to uint8 (`window`), the function prediction uses too (`medseg.commands.volumes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.core.errors import MedsegError
from medseg.core.optional import require
from medseg.data.cache import cache_root, file_identity
from medseg.data.dataset import read_dataset_info
from medseg.data.io import read_image, read_label_map
from medseg.data.reading import finite

FORMAT_VERSION = 1  # part of the cache key: a new layout makes new roots
SLICE_AXIS = 2  # axial for RAS-ordered NIfTI volumes: the last array axis
EMPTY_SLICE_SHARE = 4  # keep 1 in this many slices without foreground
SEED = 0
NIFTI_ENDINGS = (".nii.gz", ".nii")
MASK_SUFFIX = "_segmentation"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Spec:
    """What an nnU-Net dataset.json declares: channel names, class names, the files' ending."""

    root: Path
    channels: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str

    @property
    def nifti(self) -> bool:
        return self.file_ending in NIFTI_ENDINGS


def is_nnunet_root(root: str | Path) -> bool:
    """Whether ``root`` is in nnU-Net's raw format: imagesTr/ or imagesTs/ beside dataset.json."""
    root = Path(root)
    return (root / "dataset.json").is_file() and any(
        (root / name).is_dir() for name in ("imagesTr", "imagesTs")
    )


def slice_root(root: str | Path) -> Path | None:
    """The medseg data root of 2D slices made from the nnU-Net raw root ``root``.

    None when ``root`` has no imagesTr/ (not that format). Built once under
    ``cache_root()/nnunet/<hash of the source files>`` and reused while the files are unchanged.
    """
    root = Path(root)
    if not (root / "imagesTr").is_dir():
        return None
    spec = read_spec(root)
    target = cache_root() / "nnunet" / _source_key(root)
    if (target / "dataset.json").is_file():
        return target
    _build(spec, target)
    return target


def read_spec(root: Path) -> Spec:
    """The checked dataset.json of an nnU-Net raw root."""
    path = root / "dataset.json"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedsegError(f"{path} is not readable JSON ({error}); fix it") from error
    missing = [
        key
        for key in ("channel_names", "labels", "file_ending")
        if not isinstance(values, dict) or key not in values
    ]
    if missing:
        raise MedsegError(
            f"{path} lacks {', '.join(map(repr, missing))}; an nnU-Net v2 dataset.json needs "
            f'"channel_names", "labels" and "file_ending" (e.g. ".nii.gz")'
        )
    info = read_dataset_info(root)  # checks the labels (0..K-1) and the channel names
    names = values["channel_names"]
    ending = values["file_ending"]
    if not isinstance(ending, str) or ending not in (*NIFTI_ENDINGS, ".png"):
        raise MedsegError(f"{path}: file_ending {ending!r} is not supported; use .nii.gz or .png")
    channels = tuple(str(names[key]) for key in sorted(names, key=int))
    labels = {name: index for index, name in enumerate(info.labels)}
    return Spec(root=root, channels=channels, labels=labels, file_ending=ending)


def find_cases(folder: Path, spec: Spec) -> dict[str, list[Path]]:
    """``{case: [channel 0 file, channel 1 file, ...]}`` of an imagesTr/ or imagesTs/ folder."""
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.name.endswith(spec.file_ending):
            raise MedsegError(
                f"{path} does not end in {spec.file_ending} (dataset.json's file_ending); "
                f"convert it or move it out of {folder.name}/"
            )
        match = _CHANNEL.match(path.name[: -len(spec.file_ending)])
        if match is None:
            raise MedsegError(
                f"{path} is not named <case>_<channel>{spec.file_ending} (e.g. "
                f"case1_0000{spec.file_ending}); rename it"
            )
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    for case, files in by_case.items():
        extra = sorted(set(files) - set(range(len(spec.channels))))
        if extra:
            raise MedsegError(
                f"case {case} has {files[extra[0]]}, but dataset.json's channel_names declare "
                f"{len(spec.channels)} channels (0..{len(spec.channels) - 1}); declare it or move it out"
            )
        for channel, name in enumerate(spec.channels):
            if channel not in files:
                raise MedsegError(
                    f"case {case} lacks {folder / f'{case}_{channel:04d}{spec.file_ending}'} "
                    f"(channel {channel}, {name}); add it or remove the case's other files"
                )
    return {case: [files[c] for c in range(len(spec.channels))] for case, files in by_case.items()}


# --- NIfTI -------------------------------------------------------------------------------------


def nibabel():
    """The nibabel module, imported on first use: reading NIfTI is an optional extra."""
    return require("nibabel", extra="medseg[nifti]", purpose="reading NIfTI")


def read_nifti(path: Path, case: str):
    """(data as float32 array, the image with its affine and header) of one NIfTI file.

    A 4D file with one volume along its 4th axis is that volume; any other shape than 3D is
    refused in one line before its voxels are read.
    """
    try:
        image = nibabel().load(path)
        shape = tuple(int(size) for size in image.shape)
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise MedsegError(_not_a_volume(path, case, shape))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except MedsegError:
        raise
    except Exception as error:  # nibabel raises many kinds (EOFError, zlib, ImageFileError)
        raise MedsegError(
            f"case {case}: {path} is not a readable NIfTI volume, perhaps truncated "
            f"({type(error).__name__}: {error}); replace it"
        ) from error
    return data.reshape(shape[:3]), image


def _not_a_volume(path: Path, case: str, shape: tuple[int, ...]) -> str:
    """Why a NIfTI file of ``shape`` is not one 3D volume, and what to do, in one line."""
    if len(shape) == 4:
        advice = (
            f"split its {shape[3]} volumes along the 4th axis into one file per channel "
            f"({case}_0000, {case}_0001, ...) or per time point"
        )
    elif len(shape) < 3:
        advice = "one slice is an image: save it as a PNG, or pass 3D volumes"
    else:
        advice = "pass 3D volumes"
    return f"case {case}: {path} holds a {len(shape)}D array {shape}, not one 3D volume; {advice}"


def read_volume(paths: list[Path], case: str):
    """A case's channels windowed to uint8 (X, Y, Z, C), and its first channel's image.

    NaN and infinite voxels are made finite (`medseg.data.reading.finite`, with a note saying
    how many) before windowing."""
    channels, first = [], None
    for path in paths:
        data, image = read_nifti(path, case)
        if first is None:
            first = image
        else:
            check_same_grid(image, first, case, path, paths[0])
        channels.append(window(finite(data, f"case {case}: {path}")))
    return np.stack(channels, axis=-1), first


def check_same_grid(image, reference, case: str, path: Path, reference_path: Path) -> None:
    """Refuse ``image`` unless its shape and affine are ``reference``'s: voxels must align."""
    if image.shape[:3] != reference.shape[:3]:
        raise MedsegError(
            f"case {case}: {path} has shape {image.shape[:3]}, its image {reference_path.name} "
            f"{reference.shape[:3]}; resample it onto the image's grid"
        )
    if not np.allclose(image.affine, reference.affine, atol=1e-4):
        raise MedsegError(
            f"case {case}: {path} has another affine than its image {reference_path.name} (a "
            f"different position, orientation or spacing); resample it onto the image's grid"
        )


def window(volume: np.ndarray) -> np.ndarray:
    """One channel of a volume as uint8: clipped to the 0.5 and 99.5 percentiles of its nonzero
    voxels (nnU-Net's intensity clipping, which ignores the zero background of MRI), then
    scaled to 0..255. Used for training slices and prediction alike, so both see the same."""
    values = volume[volume != 0]
    if values.size == 0:
        return np.zeros(volume.shape, np.uint8)
    low, high = np.percentile(values, [0.5, 99.5])
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((np.clip(volume, low, high) - low) * scale).astype(np.uint8)


def volume_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The 2D slices of an (X, Y, Z[, C]) array along `SLICE_AXIS`, each (X, Y[, C])."""
    return [np.take(volume, k, axis=SLICE_AXIS) for k in range(volume.shape[SLICE_AXIS])]


def read_labels(path: Path, spec: Spec, case: str, image, image_path: Path) -> np.ndarray:
    """A case's label volume as uint8 (X, Y, Z), on its image's grid, with declared values."""
    data, labels = read_nifti(path, case)
    check_same_grid(labels, image, case, path, image_path)
    if not np.isfinite(data).all():
        raise MedsegError(
            f"case {case}: {path} holds {int((~np.isfinite(data)).sum()):,} NaN or infinite "
            f"voxels; a label volume holds the class values 0..{len(spec.labels) - 1} only: "
            f"fix the labels"
        )
    if np.any(data != np.round(data)) or data.min() < 0 or data.max() >= len(spec.labels):
        found = sorted(set(np.unique(data).tolist()) - set(range(len(spec.labels))))
        raise MedsegError(
            f"case {case}: {path} holds the value {found[0]:g}, which dataset.json's labels do "
            f"not declare (0..{len(spec.labels) - 1}); fix the labels or dataset.json"
        )
    return data.astype(np.uint8)


def kept_slices(labels: np.ndarray, case: str) -> list[int]:
    """Indices of the slices to train on: every one with foreground, 1 in `EMPTY_SLICE_SHARE`
    of the others, chosen by a generator seeded by the case's name.

    A brain volume is mostly slices above and below the tumour; all of them would drown the
    few that show it (and cost disk and epochs), none would leave the network never seeing a
    healthy slice and predicting tumour on them. Seeded by name, the choice is the same
    whatever the order the cases are listed in.
    """
    other_axes = tuple(axis for axis in range(labels.ndim) if axis != SLICE_AXIS)
    foreground = labels.any(axis=other_axes)
    empty = np.flatnonzero(~foreground)
    rng = np.random.default_rng([SEED, zlib.crc32(case.encode())])
    chosen = rng.choice(empty, size=math.ceil(len(empty) / EMPTY_SLICE_SHARE), replace=False)
    return sorted([*np.flatnonzero(foreground).tolist(), *chosen.tolist()])


# --- building the slice root --------------------------------------------------------------------


def _source_key(root: Path) -> str:
    settings = f"{FORMAT_VERSION}:{SLICE_AXIS}:{EMPTY_SLICE_SHARE}:{SEED}"
    digest = hashlib.sha256(f"medseg-nnunet-v{settings}".encode())
    digest.update(f"{file_identity(root / 'dataset.json')};".encode())
    for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        folder = root / name
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                digest.update(f"{file_identity(path)};".encode())
    return digest.hexdigest()[:24]


def _build(spec: Spec, target: Path) -> None:
    """Write the slice root in a temporary folder beside ``target``, then rename it: a killed
    build leaves no root that looks whole."""
    temporary = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        temporary.mkdir(parents=True)
        _write_split(spec, spec.root / "imagesTr", spec.root / "labelsTr", temporary / "train")
        if (spec.root / "imagesTs").is_dir() and (spec.root / "labelsTs").is_dir():
            _write_split(
                spec, spec.root / "imagesTs", spec.root / "labelsTs", temporary / "test", all_=True
            )
        info = {
            "name": f"{spec.root.name} (2D slices)",
            "labels": spec.labels,
            "channel_names": {str(index): name for index, name in enumerate(spec.channels)},
            "source": str(spec.root.resolve()),
        }
        (temporary / "dataset.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        os.replace(temporary, target)
    except OSError as error:
        if not (target / "dataset.json").is_file():  # another process built it meanwhile
            raise MedsegError(
                f"cannot write the slices of {spec.root} to {target}: {error}; free some space "
                f"or set MEDSEG_CACHE_DIR to a writable folder"
            ) from error
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary)


def _write_split(spec: Spec, images: Path, labels: Path, out: Path, *, all_=False) -> None:
    """Slices of every case of ``images`` (with ``labels``) into ``out/images``, ``out/masks``;
    ``all_`` keeps every slice (a test split is scored on all of them)."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    cases = find_cases(images, spec)
    if not cases:
        raise MedsegError(f"{images} holds no case; add <case>_0000{spec.file_ending} files")
    for case, paths in cases.items():
        label_path = labels / f"{case}{spec.file_ending}"
        if not label_path.is_file():
            raise MedsegError(f"case {case} has no label file {label_path}; add it")
        if spec.nifti:
            volume, image = read_volume(paths, case)
            label_volume = read_labels(label_path, spec, case, image, paths[0])
            keep = range(volume.shape[SLICE_AXIS]) if all_ else kept_slices(label_volume, case)
            slices = volume_slices(volume)
            masks = volume_slices(label_volume)
            pairs = [(k, slices[k], masks[k]) for k in keep]
        else:
            pairs = [(0, _read_png_case(paths), read_label_map(label_path, tuple(spec.labels)))]
        for k, image_slice, mask in pairs:
            _save_slice(out / "images" / f"{case}_z{k}", image_slice)
            Image.fromarray(mask).save(out / "masks" / f"{case}_z{k}{MASK_SUFFIX}.png")


def _read_png_case(paths: list[Path]) -> np.ndarray:
    """A 2D case's channels (one gray PNG each) as uint8 (H, W, C)."""
    channels = [read_image(path, channels=1)[..., 0] for path in paths]
    shapes = {channel.shape for channel in channels}
    if len(shapes) > 1:
        raise MedsegError(f"{paths[0]} and its other channels differ in size ({sorted(shapes)})")
    return np.stack(channels, axis=-1)


def _save_slice(stem: Path, image: np.ndarray) -> None:
    """PNG for 1 or 3 channels; .npy for other counts, which no common image format holds."""
    if image.shape[-1] in (1, 3):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f"{stem}.png")
    else:
        np.save(f"{stem}.npy", np.ascontiguousarray(image))
