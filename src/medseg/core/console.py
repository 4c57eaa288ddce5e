"""What the console showed, kept as plain lines in a file (a run's ``train.log``).

`recording()` (or the decorator `records_console`) copies everything written to stdout and
stderr from then on, still writing it to the console. The lines are kept in memory until
`Recording.attach` names the file, which then receives them and every later line as it ends:
a run folder is claimed only after the data is read, and the log still begins with the
command's first line. Recordings nest: a k-fold run's log holds what each fold's own log holds.

Terminal redraws are not copied: a write holding a carriage return (tqdm's frames) is left out,
and `medseg.core.progress` writes a bar's progress into the log as `LineProgress` lines instead
(`log_line`). Colour escapes are removed.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

_RECORDINGS: list[Recording] = []  # innermost last


class Recording:
    """The console's lines since it began, then into ``attach``'s file as they end."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # until attached
        self.file: IO[str] | None = None
        self.path: Path | None = None
        self.pending = ""  # the line being written
        self.framed = False  # a redraw was left out since the last line ended

    def attach(self, path: str | Path, *, append: bool = False) -> None:
        """Write the lines so far to ``path`` (after its earlier lines with ``append``), and
        every later line as it ends. A second call moves on to another file."""
        self.close()
        self.path = Path(path)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        for line in self.lines:
            self.file.write(line + "\n")
        self.file.flush()
        self.lines = []

    def write(self, text: str) -> None:
        """Take what the console was given (any piece of a line, or several lines)."""
        if "\r" in text:  # a redraw: what follows the last carriage return is a frame too
            self.pending, self.framed = "", True
            return
        *ended, self.pending = (self.pending + text).split("\n")
        for line in ended:
            if line or not self.framed:  # the newline closing a frame leaves no empty line
                self.line(line)
            self.framed = False

    def line(self, text: str) -> None:
        """Keep one whole line."""
        text = _ESCAPES.sub("", text).rstrip()
        if self.file is None:
            self.lines.append(text)
            return
        self.file.write(text + "\n")
        self.file.flush()  # a killed run's log ends with its last line

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _Tee:
    """A stream that writes to the console stream it replaced and to every recording."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        for recording in _RECORDINGS:
            recording.write(text)
        return written

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the console
        return getattr(self.stream, name)


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record the console for the block (see the module docstring). A failure that ends the
    block is the log's last line."""
    current = Recording()
    if not _RECORDINGS:
        sys.stdout, sys.stderr = _Tee(sys.stdout), _Tee(sys.stderr)
    _RECORDINGS.append(current)
    try:
        yield current
    except BaseException as error:
        current.write(current.pending and "\n")
        current.line(f"stopped: {_described(error)}")
        raise
    finally:
        current.write(current.pending and "\n")
        _RECORDINGS.remove(current)
        current.close()
        if not _RECORDINGS:
            sys.stdout, sys.stderr = _untee(sys.stdout), _untee(sys.stderr)


def _untee(stream: IO[str]) -> IO[str]:
    return stream.stream if isinstance(stream, _Tee) else stream


def _described(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def records_console(function: Callable) -> Callable:
    """Run ``function`` inside `recording()`; it reaches its recording by `current()`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with recording():
            return function(*args, **kwargs)

    return wrapper


def current() -> Recording | None:
    """The innermost recording, or None when the console is not being recorded."""
    return _RECORDINGS[-1] if _RECORDINGS else None


def log_line(text: str) -> None:
    """Write a line to every recording but not to the console (a progress bar's log line)."""
    for recording in _RECORDINGS:
        recording.line(text)


def is_recording() -> bool:
    return bool(_RECORDINGS)
