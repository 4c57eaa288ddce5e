"""What every reader of a user's file shares: the one-line reason a file cannot be read, the
check that it is a regular file, 16-bit gray windowed to 8 bits, non-finite values made finite,
and the one-line note about an odd file that was read anyway."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import numpy as np

from medseg.core.errors import MedsegError


def read_error(path: str | Path, error: OSError, *, kind: str = "file") -> str:
    """Why the `kind` ("file" or "folder") `path` could not be stat'ed, opened or listed.

    One line that says what to do, for every OSError of reading a user's file.
    """
    number = error.errno
    if number == errno.ENOENT and os.path.islink(path):
        return (
            f"{path} is a broken symbolic link (to {os.readlink(path)}); fix the link or remove it"
        )
    if number == errno.ELOOP:
        return f"{path} is a symbolic link loop; fix the link or remove it"
    if number == errno.ENOENT:
        return f"{kind} not found: {path}"
    if number in (errno.EACCES, errno.EPERM):
        return f"cannot read the {kind} {path}: permission denied; check its permissions"
    reason = error.strerror or str(error)
    return f"cannot read the {kind} {path}: {reason}; check the disk, or replace it or remove it"


def check_regular_file(path: Path) -> None:
    """Refuse what is not an existing, non-empty regular file before PIL opens it.

    A folder named like an image is said to be one; a FIFO would block the read forever.
    """
    try:
        status = path.stat()
    except OSError as error:
        raise MedsegError(read_error(path, error)) from error
    if stat.S_ISDIR(status.st_mode):
        raise MedsegError(f"{path} is a folder, not an image file; move it out or pass a file")
    if not stat.S_ISREG(status.st_mode):
        raise MedsegError(f"{path} is not a regular file; replace it with an image file")
    if status.st_size == 0:
        raise MedsegError(f"{path} is empty (0 bytes); replace it or remove it")


def window_16_bit(values: np.ndarray) -> np.ndarray:
    """16-bit gray as 8 bits, windowed per image: its lowest value to 0, its highest to 255.

    X-ray and CT exports use 10 to 16 of the 16 bits; scaling by the whole 16-bit range would
    turn a 12-bit radiograph (0..4095) into 0..15, nearly black. Values that fit 8 bits
    already are kept as they are.
    """
    low, high = float(values.min()), float(values.max())
    if high <= 255:
        return values.astype(np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def note(message: str) -> None:
    """One line on stderr about what medseg did with an odd file and went on (a note, not an
    error: the file is read)."""
    print(f"medseg: note: {' '.join(message.split())}", file=sys.stderr)


def finite(values: np.ndarray, where: str) -> np.ndarray:
    """``values`` with every NaN or -Inf set to their lowest finite value and every +Inf to
    their highest, said in one `note` naming ``where``; all non-finite: zeros.

    A NaN would otherwise reach the 8-bit cast as an undefined value, and numpy would warn.
    """
    if values.dtype.kind != "f":
        return values
    good = np.isfinite(values)
    if good.all():
        return values
    bad = values.size - int(good.sum())
    low, high = (float(values[good].min()), float(values[good].max())) if good.any() else (0, 0)
    fixed = np.where(np.isposinf(values), high, values)
    fixed = np.where(np.isfinite(fixed), fixed, low)
    note(
        f"{where} holds {bad:,} NaN or infinite values of {values.size:,}; NaN and -Inf are read "
        f"as its lowest finite value ({low:g}), +Inf as its highest ({high:g})"
    )
    return fixed
