"""Single-frame DICOM images (the optional extra ``medseg[dicom]``: pydicom and the pylibjpeg
decoders) as uint8 arrays.

A DICOM file is a ``.dcm`` file, or a file without an extension whose bytes 128..131 are the
preamble's "DICM" (what PACS exports often write). A file without the preamble or the file meta
header (older ACR-NEMA style files) is read anyway, and one whose header lacks the transfer
syntax is read as its elements are encoded. Pixels go through the modality LUT (rescale slope
and intercept: Hounsfield units for CT) and the VOI LUT (the window stored in the file), then
are windowed to 8 bits per image as a 16-bit PNG is (`medseg.data.io`); MONOCHROME1, where 0 is
white, is inverted so that every gray image shows air dark. Colour images (RGB, YBR, which
pydicom turns into RGB, and PALETTE COLOR through its lookup table) are RGB.

pydicom's warnings never reach the terminal raw: those about the header (a VR other than the
one expected, a malformed value) are silenced, as the pixels either read or fail with a reason;
a warning of the pixel decoder that says the pixels may be read otherwise than meant (Bits
Stored against the JPEG 2000 data, say) becomes one `medseg.data.reading.note`.

An image is named by its SOP Instance UID (`dicom_uid`), which stays unique where exports name
every file IM0001.dcm.
"""

from __future__ import annotations

import importlib
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from medseg.core.errors import MedsegError
from medseg.core.optional import require
from medseg.data.reading import check_regular_file, finite, note, read_error, window_16_bit

DICOM_EXTENSION = ".dcm"
_PREAMBLE_END = 128  # "DICM" follows the 128-byte preamble
# A UID as the standard writes it: numbers joined by single dots, at most 64 characters. Only
# such a UID names outputs (`../../x`, `a/b` or 400 characters do not).
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_LENGTH = 64
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Transfer syntaxes pydicom decodes only with a plugin, and the package that brings it (all
# in the dicom extra); the others (uncompressed, deflated, RLE) need nothing more.
_JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57")
_JPEG_2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201")
DECODER_PACKAGES = {
    **dict.fromkeys((*_JPEG_LS, *_JPEG, "1.2.840.10008.1.2.4.70"), "pylibjpeg-libjpeg"),
    **dict.fromkeys((*_JPEG_2000, "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
                    "pylibjpeg-openjpeg"),
}  # fmt: skip
# Decoder warnings that change nothing in the pixels read: not worth a note.
_HARMLESS = ("excess padding",)


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
def dicom_uid(path: Path) -> str | None:
    """The SOP Instance UID of a DICOM file (read from its header only), the id its outputs
    are named by; None where it has none, it is not a UID as the standard writes it (digits
    and single dots, at most 64 characters: never a path), or the header cannot be read
    (reading its pixels will then name the problem)."""
    try:
        with warnings.catch_warnings():  # the value is checked as it is read: a VR warning
            warnings.simplefilter("ignore")
            header = _dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(header.get("SOPInstanceUID", "")).strip().rstrip("\0")
    except Exception:  # any malformed file: pydicom raises many kinds; read_dicom reports it
        return None
    return uid if len(uid) <= _UID_LENGTH and _UID.fullmatch(uid) else None


def read_dicom(path: str | Path) -> np.ndarray:
    """A single-frame DICOM image as uint8 (H, W) gray or (H, W, 3) RGB (module docstring).

    Whatever pydicom raises on a damaged or unusual file becomes a one-line `MedsegError`
    naming the file.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = _read_dataset(path)
        try:
            image = _to_image(dataset, path)
        except (MedsegError, MemoryError):
            raise
        except Exception as error:  # a header value pydicom cannot use, a LUT out of range
            raise MedsegError(
                f"{path}: cannot read its pixels ({_reason(error)}); replace it or remove it"
            ) from error
    _note_decoder_warnings(path, caught)
    return image


def _dcmread(path: Path, **options):
    """pydicom's dataset, read without the preamble and file meta header where it has none
    (then ``dataset.medseg_forced`` is True)."""
    pydicom = require_pydicom()
    try:
        return pydicom.dcmread(path, **options)
    except pydicom.errors.InvalidDicomError:
        dataset = pydicom.dcmread(path, force=True, **options)
        dataset.medseg_forced = True
        return dataset


def _read_dataset(path: Path):
    check_regular_file(path)
    try:
        dataset = _dcmread(path)
    except OSError as error:
        if error.errno is not None:
            raise MedsegError(read_error(path, error)) from error
        raise MedsegError(
            f"{path} is not a readable DICOM file ({_reason(error)}); replace it or remove it"
        ) from error
    except Exception as error:  # InvalidDicomError and the parser's many others
        raise MedsegError(
            f"{path} is not a readable DICOM file ({_reason(error)}); replace it or remove it"
        ) from error
    if not any(tag in dataset for tag in _PIXEL_TAGS):
        if getattr(dataset, "medseg_forced", False):
            raise MedsegError(
                f"{path} is not a readable DICOM file (no DICM preamble or file meta header, "
                f"and read without them no pixel data); replace it or remove it"
            )
        raise MedsegError(
            f"{path} holds no pixel data (a DICOM report, structure set or directory?); remove "
            f"it from the input folder"
        )
    return dataset


def _fill_transfer_syntax(dataset) -> None:
    """Give a header without a transfer syntax the one its elements were read in (uncompressed
    data only: compressed pixels cannot be guessed, and decoding will name the problem)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(dataset, "original_encoding", (None, None))
    if "PixelData" not in dataset or dataset["PixelData"].is_undefined_length or little is None:
        return
    if meta is None:
        dataset.file_meta = meta = FileMetaDataset()
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.TransferSyntaxUID = syntax if little else ExplicitVRBigEndian


def _to_image(dataset, path: Path) -> np.ndarray:
    """uint8 (H, W) gray or (H, W, 3) RGB of a dataset with pixel data."""
    _fill_transfer_syntax(dataset)
    _check_single_frame(dataset, path)
    pixels = _pixel_array(dataset, path)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        pixels = _apply_color_lut(pixels, dataset)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return _to_uint8(finite(pixels.astype(np.float64), str(path)))
    if pixels.ndim != 2:
        raise MedsegError(
            f"{path} holds pixels of shape {pixels.shape} ({photometric or 'no photometric'}); "
            f"only one gray or RGB image per file is read: convert it"
        )
    values = finite(np.asarray(_apply_luts(pixels, dataset), dtype=np.float64), str(path))
    gray = _to_uint8(values)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _check_single_frame(dataset, path: Path) -> None:
    value = dataset.get("NumberOfFrames", 1)
    try:
        frames = int(value or 1)
    except (TypeError, ValueError) as error:
        raise MedsegError(
            f"{path}: its Number of Frames {str(value)!r} is not a whole number (a malformed "
            f"header); fix it or remove the file"
        ) from error
    if frames > 1:
        raise MedsegError(
            f"{path} is a multi-frame DICOM ({frames} frames); only single-frame images are "
            f"read: split it into one file per frame"
        )


def _pixel_array(dataset, path: Path) -> np.ndarray:
    try:
        return dataset.pixel_array
    except MemoryError:
        raise
    except Exception as error:  # a compressed syntax without its decoder, a truncated file
        raise MedsegError(_decode_failure(dataset, path, error)) from error


def _decode_failure(dataset, path: Path, error: Exception) -> str:
    """Why the pixels of ``path`` did not decode, in one line: a decoder to install, a syntax
    nothing decodes, or the file itself (the decoder's reason)."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return (
            f"{path}: cannot decode its pixel data: its header names no transfer syntax and the "
            f"pixels are compressed; rewrite it with a complete header (e.g. dcmconv)"
        )
    name = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
    package = DECODER_PACKAGES.get(str(syntax))
    # Pillow may take the syntax and still fail (12-bit JPEG): the missing package is the cause.
    if package and not _installed(package):
        return (
            f"{path}: its pixels are compressed as {name}, which needs {package}: pip install "
            f"'medseg[dicom]' (or pip install pylibjpeg {package})"
        )
    if syntax.is_compressed and not _decodable(syntax):
        return (
            f"{path}: its pixels are compressed as {name}, which medseg cannot decode; convert "
            f"it to an uncompressed DICOM or an image file"
        )
    return (
        f"{path}: cannot decode its {name} pixel data ({_reason(error)}); replace it or remove "
        f"it (a truncated or damaged file?)"
    )


def _installed(package: str) -> bool:
    """Whether pylibjpeg and its plugin ``package`` (pylibjpeg-libjpeg, ...) import."""
    try:
        importlib.import_module("pylibjpeg")
        importlib.import_module(package.removeprefix("pylibjpeg-"))
    except ImportError:
        return False
    return True


def _decodable(syntax) -> bool:
    """Whether pydicom has a working decoder for ``syntax`` (unknown with pydicom < 3: True,
    and its own message says what is missing)."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except Exception:  # NotImplementedError: no decoder exists for it (MPEG video, say)
        return False


def _reason(error: Exception) -> str:
    """A library's error message as one short line."""
    return " ".join(str(error).split())[:200] or type(error).__name__


def _note_decoder_warnings(path: Path, caught: list[warnings.WarningMessage]) -> None:
    """The first warning of pydicom's pixel decoder that may change the pixels, as one note;
    header and numpy warnings are dropped (see the module docstring)."""
    for item in caught:
        parts = Path(item.filename).parts
        message = " ".join(str(item.message).split())
        from_decoder = "pydicom" in parts and "pixels" in parts
        if from_decoder and not any(harmless in message for harmless in _HARMLESS):
            note(f"{path}: pydicom says: {message[:300]}")
            return


def _apply_luts(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored values -> modality values (slope, intercept or LUT) -> the file's VOI window."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)


def _apply_color_lut(pixels: np.ndarray, dataset) -> np.ndarray:
    """PALETTE COLOR indices -> (H, W, 3) RGB through the file's palette."""
    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut
    return apply_color_lut(pixels, dataset)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Windowed per image as a 16-bit PNG (`window_16_bit`): values that fit 0..255 stay,
    others run from the image's lowest to its highest. Rescaled CT starts below 0 (air is
    -1000 HU), so negative values are shifted to start at 0 first."""
    low = float(values.min())
    if low < 0:
        values = values - low
    if float(values.max()) == float(values.min()) and values.max() > 255:
        return np.zeros(values.shape, np.uint8)  # a flat image: nothing to window
    return window_16_bit(values)
