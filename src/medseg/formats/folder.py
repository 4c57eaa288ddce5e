"""An export folder's files, written all at once, and the JSON descriptors read back from one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg.core.errors import MedsegError
from medseg.core.files import check_writable, make_folder, refuse_existing

# Every file an export writes: a folder holding any of them holds a model, which a new export
# replaces whole (with --overwrite), so one folder never mixes two exports.
EXPORT_FILES = (
    "model.safetensors",
    "config.json",
    "model.onnx",
    "model-fp32.onnx",
    "medseg.json",
    "ensemble.json",
    "README.md",
)
# Descriptors are moved in last: a folder is only read as a model once its descriptor is there.
DESCRIPTORS = ("config.json", "medseg.json", "ensemble.json")
# The folders an exported ensemble keeps its members in: the fold's, or the member's place.
MEMBER_FOLDER = re.compile(r"^(fold|member)_\d+$")
_STAGING = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.partial-export$")


def existing_export(out: str | os.PathLike) -> list[Path]:
    """The export files already in ``out`` (see `EXPORT_FILES`), and the member folders of an
    exported ensemble (`MEMBER_FOLDER`, each holding export files)."""
    out = Path(out)
    files = [out / name for name in EXPORT_FILES if (out / name).exists()]
    with contextlib.suppress(OSError):
        files += sorted(
            child
            for child in out.iterdir()
            if MEMBER_FOLDER.match(child.name) and child.is_dir() and existing_export(child)
        )
    return files


def check_export_folder(out: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse a folder that holds a model unless ``overwrite``, or one that cannot be written."""
    refuse_existing(
        existing_export(out),
        what="an exported model",
        overwrite=overwrite,
        advice="choose another --out, or pass --overwrite to replace it",
    )
    check_writable(out)


@contextlib.contextmanager
def staged_export(out: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``out`` to write an export into, with plain writes.

    When the block succeeds, the folder becomes ``out`` (one rename), or, where ``out`` already
    exists, each of its files replaces its namesake there by an atomic rename and earlier
    export files it does not replace are removed (other files in ``out`` are left alone). When
    the block fails, the staging folder is removed and ``out`` is as it was.
    """
    out = Path(out)
    check_export_folder(out, overwrite=overwrite)
    make_folder(out.parent)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial-export"
    try:
        staging.mkdir(mode=0o777)  # the umask decides, as for any folder medseg creates
    except OSError as error:
        raise MedsegError(f"cannot write to {out.parent}: {error.strerror}") from error
    try:
        yield staging
        if not out.exists():
            os.replace(staging, out)
            return
        written = sorted(staging.iterdir(), key=lambda path: path.name in DESCRIPTORS)
        for path in written:
            if path.is_dir() and (out / path.name).is_dir():  # an ensemble member's folder
                shutil.rmtree(out / path.name)
            os.replace(path, out / path.name)
        for stale in existing_export(out):
            if stale.name not in {path.name for path in written}:
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
    except OSError as error:
        raise MedsegError(f"cannot write the export to {out}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """Staging folders a killed export of ``out`` left beside it (hidden, never a user's)."""
    with contextlib.suppress(OSError):
        for path in out.parent.iterdir():
            match = _STAGING.match(path.name)
            if match and match["name"] == out.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def read_json(path: Path, *, advice: str) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is refused in one line ending in ``advice``."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:120]
        raise MedsegError(f"{path} is not readable JSON ({reason}); {advice}") from error
    if not isinstance(values, dict):
        raise MedsegError(f"{path} does not hold a JSON object; {advice}")
    return values
