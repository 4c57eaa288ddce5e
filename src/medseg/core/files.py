"""Safe file writing: every result medseg writes appears whole or not at all.

A crash (power loss, SIGKILL, full disk) in the middle of a write must never leave half a
checkpoint or half a mask where a good one stood. So every writer goes through `atomic_path`:
write a temporary file in the same folder, fsync it, then `os.replace` it over the target,
which POSIX and Windows both perform atomically within one file system.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from medseg.core.errors import MedsegError


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
        temporary = _create_temporary(target)
    except OSError as error:
        raise MedsegError(f"cannot write to {folder}: {_reason(error)}") from error
    try:
        yield temporary
        with contextlib.suppress(FileNotFoundError):
            os.chmod(
                temporary, stat.S_IMODE(target.stat().st_mode)
            )  # a replaced file keeps its mode
        _fsync_file(temporary)
        os.replace(temporary, target)
        _fsync_folder(folder)
    except OSError as error:
        raise MedsegError(
            f"cannot write {target}: {_reason(error)} (its earlier content, if any, is kept)"
        ) from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def make_folder(path: str | os.PathLike) -> Path:
    """Create `path` (and its parents) if needed; a one-line MedsegError names it if that fails."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MedsegError(f"cannot create the folder {folder}: {_reason(error)}") from error
    return folder


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, creating nothing, when the folder `path` (existing or not) cannot be written.

    Meant for the start of a long job, so that it does not fail only when it saves its result.
    """
    folder = Path(path)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise MedsegError(
            f"cannot write to {folder}: {probe} is a file, not a folder; choose another output folder"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MedsegError(
            f"cannot write to {folder}: {probe} is not writable; choose a folder you can write to"
        )


def refuse_existing(earlier: list[Path], *, what: str, overwrite: bool, advice: str = "") -> None:
    """Refuse to replace earlier results unless ``overwrite`` (--overwrite) says so.

    Every command that writes results calls this before it writes anything, so an earlier
    result is either kept whole or replaced on purpose, never mixed with new files.
    """
    if not earlier or overwrite:
        return
    advice = advice or "choose another output folder, or pass --overwrite to replace it"
    raise MedsegError(f"{earlier[0].parent} already holds {what} ({earlier[0].name}); {advice}")


# What atomic_path's temporary files look like: ".<name>.<8 random characters>.tmp<suffix>".
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`; return what was removed.

    Only names of atomic_path's own pattern whose suffix matches the name they stood in for
    are touched, so a user's files are never taken for leftovers.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _PARTIAL.match(path.name)
        if match and path.is_file() and Path(match["name"]).suffix == (match["suffix"] or ""):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_csv(path: str | os.PathLike, rows: list[dict], columns: tuple[str, ...]) -> None:
    """Write `rows` as CSV atomically; floats with 6 significant digits."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                key: f"{value:.6g}" if isinstance(value, float) else value
                for key, value in row.items()
            }
        )
    write_text(path, buffer.getvalue())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def _create_temporary(target: Path) -> Path:
    """A new, empty file beside `target`, named as `_PARTIAL` expects.

    Created with mode 0o666 like a plain open(), so the process's umask decides what others
    may read (mkstemp's 0600 would hide results from them).
    """
    for _ in range(100):
        temporary = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp{target.suffix}"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _reason(error: OSError) -> str:
    """The cause of a failed write in words, with what to do about it."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f"{reason}; free some space or choose another output folder"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}; choose a folder you can write to"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{reason} (a file stands where a folder is needed); choose another output folder"
    return reason


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
