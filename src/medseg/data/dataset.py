"""A data root's ``dataset.json``, in nnU-Net v2's convention: class names and image channels.

```json
{
  "name": "JSRT chest radiographs",
  "labels": {"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3},
  "channel_names": {"0": "X-ray"}
}
```

``labels`` maps each class name to its value in the masks, background 0 and the others
1..K-1 without gaps, at most `MAX_CLASSES`; masks are then label maps read exactly (two classes
saved as 0/255, as most tools save binary masks, are read as 0/1). ``channel_names`` (nnU-Net v2) or
``channels`` (a count) says how many channels an image has: 1 for grayscale modalities. Without
a dataset.json, masks are binary and read by the half-range rule (`medseg.data.io.read_mask`).
Other channel counts (MRI sequences stacked, e.g. FLAIR and T1c) are stored as uint8 ``.npy``
images (H, W, C).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medseg.config.settings import MAX_CHANNELS, MAX_CLASSES
from medseg.core.errors import MedsegError

FILE_NAME = "dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset.json declares: class names by label value, and image channels."""

    labels: tuple[str, ...]
    channels: int = 3
    name: str = ""
    channels_declared: bool = False  # False: no channel entry, so 3 (RGB) by default


def find_dataset_json(folder: str | Path) -> Path | None:
    """The dataset.json of a data root, or of the root above a split folder (ROOT/test).

    Something of that name that is not a file (a folder, a broken link) is refused rather than
    passed over: without its classes, label maps would be read as binary masks.
    """
    folder = Path(folder)
    for candidate in (folder / FILE_NAME, folder.parent / FILE_NAME):
        if candidate.is_file():
            return candidate
        if candidate.is_dir() or candidate.is_symlink():
            what = "a folder" if candidate.is_dir() else "a broken link"
            raise MedsegError(
                f"{candidate} is {what}, not a JSON file; put the dataset.json file there, or "
                f"move it away to read the masks as binary"
            )
    return None


def read_dataset_info(folder: str | Path) -> DatasetInfo | None:
    """The dataset.json beside ``folder`` (see `find_dataset_json`), checked; None without one."""
    path = find_dataset_json(folder)
    if path is None:
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedsegError(f"{path} is not readable JSON ({error}); fix or remove it") from error
    if not isinstance(values, dict):
        raise MedsegError(f"{path} must hold a JSON object with a 'labels' entry")
    return DatasetInfo(
        labels=_labels(values.get("labels"), path),
        channels=_channels(values, path),
        name=str(values.get("name", "")),
        channels_declared=any(key in values for key in CHANNEL_KEYS),
    )


def _labels(labels, path: Path) -> tuple[str, ...]:
    example = '"labels": {"background": 0, "lesion": 1}'
    if not isinstance(labels, dict) or len(labels) < 2:
        raise MedsegError(f"{path} needs 'labels' naming at least two classes, e.g. {example}")
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise MedsegError(
                f"{path}: label {name!r} has the value {value!r}; medseg reads one integer per "
                f"class (nnU-Net's region lists are not supported), e.g. {example}"
            )
    if len(labels) > MAX_CLASSES:
        raise MedsegError(
            f"{path} declares {len(labels)} classes; medseg reads label maps and writes masks as "
            f"8-bit images, so it takes at most {MAX_CLASSES} (values 0..{MAX_CLASSES - 1})"
        )
    by_value = sorted(labels.items(), key=lambda item: item[1])
    if [value for _, value in by_value] != list(range(len(labels))):
        values = ", ".join(str(value) for _, value in by_value)
        raise MedsegError(
            f"{path}: the label values are {values}; they must be 0 (background) to "
            f"{len(labels) - 1} without gaps"
        )
    return tuple(name for name, _ in by_value)


CHANNEL_KEYS = ("channel_names", "modality", "channels")


def _channels(values: dict, path: Path) -> int:
    names = values.get("channel_names", values.get("modality"))
    count = len(names) if isinstance(names, dict) else values.get("channels", 3)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_CHANNELS:
        raise MedsegError(
            f"{path}: images with {count!r} channels are not supported (1 to {MAX_CHANNELS}); "
            f"give 'channel_names' one name per channel, e.g. "
            f'"channel_names": {{"0": "FLAIR", "1": "T1c"}}'
        )
    return count
