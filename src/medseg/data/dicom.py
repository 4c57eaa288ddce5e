"""Single-frame DICOM images (the optional extra ``medseg[dicom]``: pydicom) as uint8 arrays.

A DICOM file is a ``.dcm`` file, or a file without an extension whose bytes 128..131 are the
preamble's "DICM" (what PACS exports often write). Pixels go through the modality LUT (rescale
slope and intercept: Hounsfield units for CT) and the VOI LUT (the window stored in the file),
then are windowed to 8 bits per image as a 16-bit PNG is (`medseg.data.io`); MONOCHROME1, where
0 is white, is inverted so that every gray image shows air dark. Colour images stay RGB.
An image is named by its SOP Instance UID (`dicom_id`), which stays unique where exports name
every file IM0001.dcm.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from medseg.core.errors import MedsegError
from medseg.core.optional import require
from medseg.data.reading import check_regular_file, read_error, window_16_bit

DICOM_EXTENSION = ".dcm"
_PREAMBLE_END = 128  # "DICM" follows the 128-byte preamble
_UID = re.compile(r"[0-9.]{1,64}")  # what the standard allows in a UID: safe as a file name


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is read as DICOM: a ``.dcm`` file, or an extensionless file with the
    "DICM" marker at byte 128 (an unreadable one is not; reading it elsewhere says why)."""
    path = Path(path)
    if path.suffix.lower() == DICOM_EXTENSION:
        return True
    if path.suffix or not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(_PREAMBLE_END + 4)[_PREAMBLE_END:] == b"DICM"
    except OSError:
        return False


def list_dicom(folder: Path) -> list[Path]:
    """DICOM files directly in ``folder`` (`is_dicom`), sorted by name, hidden files skipped."""
    return sorted(
        path
        for path in folder.iterdir()
        if not path.name.startswith(".") and not path.is_dir() and is_dicom(path)
    )


def require_pydicom():
    """The pydicom module, or a one-line error that says how to install it."""
    return require("pydicom", extra="medseg[dicom]", purpose="reading DICOM")


@lru_cache(maxsize=4096)
def dicom_id(path: Path) -> str:
    """The SOP Instance UID of a DICOM file (read from its header only), the id its outputs
    are named by; the file's stem where it has none or cannot be read (reading its pixels
    will then name the problem)."""
    pydicom = require_pydicom()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = str(header.get("SOPInstanceUID", "")).strip()
    except Exception:  # any malformed file: pydicom raises many kinds; read_dicom reports it
        return Path(path.name).stem
    return uid if _UID.fullmatch(uid) else Path(path.name).stem


def read_dicom(path: str | Path) -> np.ndarray:
    """A single-frame DICOM image as uint8 (H, W) gray or (H, W, 3) RGB (module docstring)."""
    path = Path(path)
    dataset = _read_dataset(path)
    pixels = _pixel_array(dataset, path)
    if dataset.get("SamplesPerPixel", 1) == 3:
        return _to_uint8(pixels.astype(np.float64))
    values = _apply_luts(pixels, dataset)
    gray = _to_uint8(np.asarray(values, dtype=np.float64))
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _read_dataset(path: Path):
    pydicom = require_pydicom()
    check_regular_file(path)
    try:
        dataset = pydicom.dcmread(path)
    except OSError as error:
        if error.errno is not None:
            raise MedsegError(read_error(path, error)) from error
        raise MedsegError(
            f"{path} is not a readable DICOM file ({error}); replace it or remove it"
        ) from error
    except Exception as error:  # InvalidDicomError and the parser's many others
        message = " ".join(str(error).split())[:200]
        raise MedsegError(
            f"{path} is not a readable DICOM file ({message}); replace it or remove it"
        ) from error
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise MedsegError(
            f"{path} holds no pixel data (a DICOM report or structure set?); remove it from "
            f"the input folder"
        )
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MedsegError(
            f"{path} is a multi-frame DICOM ({frames} frames); only single-frame images are "
            f"read: split it into one file per frame"
        )
    return dataset


def _pixel_array(dataset, path: Path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # a compressed syntax without its decoder, a truncated file
        message = " ".join(str(error).split())[:200]
        raise MedsegError(
            f"{path}: cannot decode its pixel data ({message}); replace a truncated file, or "
            f"for a compressed one install the decoder pydicom names"
        ) from error
    expected = 3 if dataset.get("SamplesPerPixel", 1) == 3 else 2
    if pixels.ndim != expected:
        raise MedsegError(
            f"{path} holds pixels of shape {pixels.shape}; expected one 2-D image"
            f"{' in RGB' if expected == 3 else ''}"
        )
    return pixels


def _apply_luts(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored values -> modality values (slope, intercept or LUT) -> the file's VOI window."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Windowed per image as a 16-bit PNG (`_window_16_bit`): values that fit 0..255 stay,
    others run from the image's lowest to its highest. Rescaled CT starts below 0 (air is
    -1000 HU), so negative values are shifted to start at 0 first."""
    low = float(values.min())
    if low < 0:
        values = values - low
    if float(values.max()) == float(values.min()) and values.max() > 255:
        return np.zeros(values.shape, np.uint8)  # a flat image: nothing to window
    return window_16_bit(values)
