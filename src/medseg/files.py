"""Safe file writing: every result medseg writes appears whole or not at all.

A crash (power loss, SIGKILL, full disk) in the middle of a write must never leave half a
checkpoint or half a mask where a good one stood. So every writer goes through `atomic_path`:
write a temporary file in the same folder, fsync it, then `os.replace` it over the target,
which POSIX and Windows both perform atomically within one file system.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import MedsegError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it over `path` atomically.

    The caller writes the complete file to the yielded path (with any library: torch.save,
    PIL, matplotlib, ...). If the block raises, the temporary file is removed and `path`
    keeps its earlier content.
    """
    target = Path(path)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=folder
        )
    except OSError as error:
        raise MedsegError(f"cannot write to {folder}: {error.strerror or error}") from error
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, target)
        _fsync_folder(folder)
    except OSError as error:
        raise MedsegError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not supported on every platform (Windows), hence optional.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
