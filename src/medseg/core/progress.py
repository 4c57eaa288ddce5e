"""Progress bars on a terminal, a plain line now and then in a log.

A tqdm bar redraws itself with carriage returns several times a second: on a terminal that is
one line that moves, but written to a file or a pipe (a job's log, ``| tee``) every frame stays,
and a long run's log fills with thousands of them. `progress_bar` gives tqdm where stderr is a
terminal, and elsewhere `LineProgress`, which prints a line at most every ``interval`` seconds
and one at the end. While the console is recorded (a run's ``train.log``, `medseg.core.console`),
a terminal's bar also writes those lines into the log, which keeps none of tqdm's redraws.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

from medseg.core import console

LOG_INTERVAL_S = 30.0  # a line per half minute keeps an hour's run to about 120 lines


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    leave: bool = True,
) -> tqdm | LineProgress:
    """A progress bar over ``iterable`` (or counted by ``update(n)`` up to ``total``).

    A tqdm bar where stderr is a terminal; elsewhere a `LineProgress` with the same small
    interface (iterate, ``update(n)``, ``set_postfix(...)``, ``close()``, ``len()``); silent when
    not ``enabled``. ``leave=False``: nothing stays once it is done (tqdm erases its bar; the
    line printer skips its final line).
    """
    if enabled and _stderr_is_terminal():
        if console.is_recording():
            return _LoggedTqdm(iterable, desc=desc, total=total, leave=leave)
        return tqdm(iterable, desc=desc, total=total, leave=leave)
    return LineProgress(iterable, desc=desc, total=total, enabled=enabled, leave=leave)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _LoggedTqdm(tqdm):
    """A terminal's tqdm bar that also writes `LineProgress` lines into the console's log."""

    def __init__(self, iterable=None, *, desc: str, total: int | None, leave: bool):
        super().__init__(iterable, desc=desc, total=total, leave=leave)
        self.log = LineProgress(desc=desc, total=self.total, leave=leave, write=console.log_line)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self.log.update(self.n - self.log.n)
        return shown

    def set_postfix(self, ordered_dict=None, refresh=True, **values) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **values)
        self.log.set_postfix(ordered_dict, **values)

    def close(self) -> None:
        super().close()
        if hasattr(self, "log"):  # tqdm closes a bar whose __init__ failed, too
            self.log.update(self.n - self.log.n)
            self.log.close()


class LineProgress:
    """Counts progress and writes ``desc: 40/160 (25%)`` lines to stderr, sparingly.

    A line is written when ``interval`` seconds have passed since the last one (the first after
    ``interval`` seconds), and a last one at the end (when the iteration finishes or on
    ``close()``) unless ``leave`` is False or it would repeat the line before. Nothing is written
    when not ``enabled``. ``write`` takes each line (default: print it to stderr).
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        desc: str,
        total: int | None = None,
        enabled: bool = True,
        leave: bool = True,
        interval: float = LOG_INTERVAL_S,
        write: Callable[[str], None] | None = None,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        self.desc = desc
        self.total = total
        self.enabled = enabled
        self.leave = leave
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self.closed = False
        self.last_line_at = time.monotonic()
        self.last_line = ""
        self.write = write or _print_to_stderr

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError(f"progress of {self.desc!r} has no total")
        return self.total

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError(f"progress of {self.desc!r} was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line_at >= self.interval:
            self._write()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, **values: Any) -> None:
        """Shown after the count in the next line, as tqdm does: ``loss=0.3120``."""
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and self.line() != self.last_line:
            self._write()

    def line(self) -> str:
        """``desc: n/total (p%)``, or ``desc: n`` without a total; then the postfix, if any."""
        if self.total:
            count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        else:
            count = str(self.n)
        return f"{self.desc}: {count}" + (f", {self.postfix}" if self.postfix else "")

    def _write(self) -> None:
        self.last_line_at = time.monotonic()
        self.last_line = self.line()
        if self.enabled:
            self.write(self.last_line)


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
