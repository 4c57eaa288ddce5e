"""Reading images and masks from disk into the arrays the rest of medseg expects.

Images become uint8 RGB (H, W, 3) whatever their mode: grayscale, palette, RGBA (composited
on white, as a viewer shows it), 16-bit (windowed per image to 8 bits); or uint8 gray
(H, W, 1) for a grayscale data set. Masks become bool (H, W). Images and masks alike are
turned as their EXIF orientation says, so they are read the way up and at the size a viewer
shows them.

How a mask is read: a pixel is foreground when its value is above half the largest value its
bit depth allows (above 127 for 8-bit masks), so the soft edges that resizing leaves are cut in
the middle rather than grown. Masks stored as 0/1 (largest value 1) are read as they are. A mask
with other values that never rise above half the range (class labels 0/1/2, a red outline read
as gray 76, a 16-bit file holding 0/255) is refused: read by that rule it would be empty.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medseg.core.errors import MedsegError
from medseg.data.dicom import is_dicom, read_dicom
from medseg.data.reading import check_regular_file, note, read_error, window_16_bit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".npy")

# A dermoscopy original is at most ~30 megapixels, so anything past this is refused before it
# is decoded. Checked here rather than through PIL's global MAX_IMAGE_PIXELS, which belongs to
# whatever program imports medseg.
MAX_PIXELS = 120_000_000
ORIENTATION_TAG = 0x0112  # EXIF "Orientation": 1 as stored, 2..8 flipped and/or turned


def read_image(path: str | Path, *, channels: int = 3) -> np.ndarray:
    """Read an image as uint8 (H, W, channels): RGB for 3, gray for 1; a bad file is named.

    A ``.npy`` file holds uint8 (H, W) or (H, W, C) as it is: the storage of slices whose
    channel count (2 MRI sequences, say) no image format holds.
    """
    if Path(path).suffix.lower() == ".npy":
        return to_channels(_read_npy(Path(path)), channels)
    # A DICOM file (.dcm, or "DICM" at byte 128) goes to pydicom.
    if is_dicom(path):
        return to_channels(read_dicom(path), channels)
    with _open(path) as image:
        return to_channels(_to_rgb(image), channels)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """A uint8 image (H, W), (H, W, 1) or (H, W, 3) as (H, W, ``channels``), 1 or 3; an
    (H, W, C) image of any other C passes through when ``channels`` is C.

    Colour becomes gray by ITU-R 601 luma, as PIL's "L" mode (a gray file read as RGB comes
    back unchanged), so an image passed as an array gives the same mask as the same file read
    from disk; gray is repeated into three channels.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == channels:
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise MedsegError(
            f"cannot segment an image of {image.dtype} {image.shape}; pass uint8 (H, W, 3) "
            f"colour or (H, W) gray, as medseg.data.io.read_image returns"
        )
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    if channels == 1:
        gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
    raise MedsegError(
        f"the checkpoint's network takes {channels} channels; only 1 (gray) or 3 (colour) "
        f"can be made from an image, so pass (H, W, {channels}) arrays"
    )


def read_target(path: str | Path, labels: list[str] | tuple[str, ...] = ()) -> np.ndarray:
    """A mask as uint8 (H, W) class values: a label map read exactly when the data declares
    ``labels`` (dataset.json), else a binary mask by the half-range rule (0/1)."""
    if labels:
        return read_label_map(path, labels)
    return read_mask(path).astype(np.uint8)


def read_label_map(path: str | Path, labels: list[str] | tuple[str, ...]) -> np.ndarray:
    """Read a label map as uint8 (H, W): each value a class index 0..K-1, read exactly.

    Two classes saved as a binary mask usually is (0 and 255, or 0 and 65535 in 16 bits) are
    read as 0/1, said once per folder; any other value outside 0..K-1 is refused.
    """
    with _open(path) as image:
        mode = image.mode
        values = np.asarray(image)
    if mode in ("RGB", "RGBA") or values.ndim != 2:
        colours = (
            len(np.unique(values.reshape(-1, values.shape[-1]), axis=0)) if values.ndim == 3 else 0
        )
        raise MedsegError(
            f"mask {path} is a colour image ({colours} colours); a label map is expected: one "
            f"channel whose values are the class indices 0..{len(labels) - 1} of dataset.json"
        )
    largest = int(values.max()) if values.size else 0
    if largest >= len(labels) and len(labels) == 2 and _saved_as_binary(values):
        _note_binary(Path(path), largest, labels[1])
        return (values > 0).astype(np.uint8)
    if largest >= len(labels):
        found = sorted(int(value) for value in np.unique(values) if value >= len(labels))
        shown = ", ".join(map(str, found[:5])) + (" ..." if len(found) > 5 else "")
        allowed = ", ".join(f"{value} {name}" for value, name in enumerate(labels))
        raise MedsegError(
            f"mask {path} holds the value {shown}, which dataset.json does not declare "
            f"(allowed: {allowed}); fix the mask or add the class to dataset.json"
        )
    return values.astype(np.uint8)


def _saved_as_binary(values: np.ndarray) -> bool:
    """Whether a mask holds only 0 and the top of its bit depth: a binary mask as most tools
    save one, which for two classes can mean one thing only."""
    return bool(np.isin(values, (0, 255)).all()) or (
        values.dtype == np.uint16 and bool(np.isin(values, (0, 65535)).all())
    )


_noted_folders: set[Path] = set()  # the 0/255 note is said once per folder of masks


def _note_binary(path: Path, top: int, foreground: str) -> None:
    if path.parent in _noted_folders:
        return
    _noted_folders.add(path.parent)
    note(
        f"masks in {path.parent} hold 0 and {top} (first {path.name}); dataset.json declares "
        f"two classes, so {top} is read as {foreground!r} (1)"
    )


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as bool (H, W): foreground above half the bit depth's range (see module doc)."""
    with _open(path) as image:
        if image.mode in ("RGB", "RGBA", "P", "LA"):
            image = image.convert("L")
        values = np.asarray(image)
    if values.ndim != 2:
        raise MedsegError(f"mask {path} has shape {values.shape}; expected a single-channel image")
    largest = int(values.max()) if values.size else 0
    if largest <= 1:
        return values > 0
    half_range = 32767 if values.dtype == np.uint16 or largest > 255 else 127
    if largest <= half_range:
        raise MedsegError(
            f"mask {path} has values up to {largest}, none above {half_range} (half its range), "
            f"so no pixel would count as foreground; save it with 0 for background and 255 "
            f"(or 1) for the lesion, or, if its values are class labels, declare them in a "
            f"dataset.json beside train/ (see README, Multi-class)"
        )
    return values > half_range


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image, read from its header only."""
    if Path(path).suffix.lower() == ".npy":
        return _read_npy(Path(path), mmap=True).shape[:2]
    with _open(path) as image:
        return image.height, image.width


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    check_regular_file(path)
    try:
        with warnings.catch_warnings():
            # PIL warns from its own limit upwards (89 megapixels); ours, checked below, rules.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        if image.width * image.height > MAX_PIXELS:
            image.close()
            raise Image.DecompressionBombError(f"{image.width}×{image.height} pixels")
        image.load()  # decode now, so a truncated file fails here, with its name
        _orient(image)
    except Image.DecompressionBombError as error:
        raise MedsegError(
            f"{path} is too large to decode safely ({error}); downscale it first (limit "
            f"{MAX_PIXELS:,} pixels)".replace("\n", " ")
        ) from error
    except UnidentifiedImageError as error:
        raise MedsegError(
            f"{path} is not an image PIL can read; replace it or remove it"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            # The system could not read it (permission, disk); PIL's own errors carry no errno.
            raise MedsegError(read_error(path, error)) from error
        raise MedsegError(
            f"{path} is corrupt or truncated ({error}); replace it or remove it"
        ) from error
    return image


def _orient(image: Image.Image) -> None:
    """Turn ``image`` in place as its EXIF orientation says a viewer shows it (a phone's JPEG
    is often stored sideways with orientation 6), so images and masks are read at the size and
    the way up that the user sees. An EXIF block that cannot be parsed counts as none."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # PIL's EXIF parser raises many types for a bad block
        return
    if orientation in range(2, 9):
        ImageOps.exif_transpose(image, in_place=True)


def _read_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """A uint8 (H, W) or (H, W, C) array from an .npy file; anything else is named and refused."""
    check_regular_file(path)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise MedsegError(
            f"{path} is not a readable .npy array ({error}); replace it or remove it"
        ) from error
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise MedsegError(
            f"{path} holds {array.dtype} {array.shape}; an .npy image must be uint8 (H, W) or "
            f"(H, W, C): window it to 0..255 first"
        )
    return array


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.repeat(window_16_bit(np.asarray(image, dtype=np.float64))[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    # An RGB image is read as it is: convert() would copy it first (a 9000² photograph: 243 MB).
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
