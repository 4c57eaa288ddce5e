"""A training run's folder: where each file lives, which process owns it, what it already holds.

```
RUN/
  config.yaml            the resolved settings (written at the start)
  run.json               where the data is, so --resume needs no --data
  metrics.csv            one row per finished epoch
  curves.png
  checkpoints/last.pt    every epoch (for --resume)
  checkpoints/best.pt    best validation Dice
  .medseg.lock           while a process trains into RUN
```

A folder belongs to one process at a time: `claim` takes an exclusive ``flock`` on the lock
file for the run's whole life and removes the file when the run ends, so a finished run folder
holds only results. The kernel drops the lock when its process dies, however it dies, so a lock
file left by a killed run is simply taken over.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from medseg.core.errors import MedsegError
from medseg.core.files import make_folder, refuse_existing, remove_partial_files, write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected from a second process
    fcntl = None


class RunFolder:
    """The files of one training run (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.record = self.path / "run.json"
        self.metrics = self.path / "metrics.csv"
        self.curves = self.path / "curves.png"
        self.checkpoints = self.path / "checkpoints"
        self.best = self.checkpoints / "best.pt"
        self.last = self.checkpoints / "last.pt"
        self.lock_file = self.path / ".medseg.lock"

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunFolder:
        """The run a checkpoint file belongs to (a run folder given as such is its own run)."""
        path = Path(checkpoint)
        if path.is_dir():
            return cls(path)
        return cls(path.parent.parent if path.parent.name == "checkpoints" else path.parent)

    def results(self) -> list[Path]:
        """The files of finished epochs; a run that finished none has no results to protect."""
        return [path for path in (self.last, self.best, self.metrics) if path.exists()]

    def refuse_to_overwrite(self, overwrite: bool) -> None:
        refuse_existing(
            self.results(),
            what="a run",
            overwrite=overwrite,
            advice="continue it with --resume, choose another --out, or pass --overwrite to replace it",
        )

    def best_checkpoint(self, expected: str = "the .pt file itself") -> Path:
        """``checkpoints/best.pt`` (or a bare ``best.pt`` beside it), for predicting; without
        one, a one-line refusal that says what to pass instead (``expected``)."""
        for candidate in (self.best, self.path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise MedsegError(
            f"{self.path} is a folder without checkpoints/best.pt and not an export; pass {expected}"
        )

    def metric_rows(self) -> list[dict[str, str]]:
        """metrics.csv, one dict per finished epoch (values are the strings in the file)."""
        try:
            with open(self.metrics, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise MedsegError(f"cannot read metrics file {self.metrics}: {reason}") from error

    def data_root(self) -> str:
        """The data root the run was started on (from run.json)."""
        try:
            return str(json.loads(self.record.read_text(encoding="utf-8"))["data"])
        except FileNotFoundError:
            raise MedsegError(
                f"{self.path} does not say where its data is (no run.json); pass --data as well"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MedsegError(
                f"{self.record} is damaged ({type(error).__name__}); pass --data as well"
            ) from error

    @contextlib.contextmanager
    def claim(self, *, clear: bool = False) -> Iterator[None]:
        """Own the folder for the block: create it, lock it, and tidy what a killed run left.

        ``clear`` (--overwrite) removes the earlier run's results, only now that this run has
        started, so a run that fails to start keeps the old one. A second process is refused.
        """
        make_folder(self.checkpoints)
        with self._lock():
            if clear:
                for stale in self.results():
                    stale.unlink(missing_ok=True)
            for folder in (self.path, self.checkpoints):
                remove_partial_files(folder)  # left by a kill in the middle of a write
            yield

    def write_record(self, data_root: str | os.PathLike) -> None:
        write_text(self.record, json.dumps({"data": str(Path(data_root).resolve())}))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        for _ in range(3):
            handle = self._locked_handle()
            if self._holds(handle):
                break
            handle.close()  # it locked a file that a run ending just then removed: again
        else:
            raise MedsegError(f"{self.path} keeps changing hands; run the command again")
        with handle:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            try:
                yield
            finally:
                # Removed while still locked, so a finished run folder holds only results; a
                # process that opened the file just before finds, by `_holds`, that it is gone.
                self.lock_file.unlink(missing_ok=True)
        # closing the handle released the lock

    def _locked_handle(self):
        """The lock file, open and exclusively locked; a run that holds it is named."""
        try:
            handle = open(self.lock_file, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        except OSError as error:
            raise MedsegError(f"cannot write to {self.path}: {error.strerror}") from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise MedsegError(
                f"{self.path} is in use by another medseg run ({owner}); wait for it to "
                f"finish, or choose another --out"
            ) from None
        return handle

    def _holds(self, handle) -> bool:
        """Whether the locked ``handle`` is still the file at ``lock_file``."""
        try:
            return os.stat(self.lock_file).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            return False
