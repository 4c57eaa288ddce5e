"""A time limit for training (``train.time_limit``, ``--time-limit 60m``): the number of epochs
and the learning-rate schedule fitted to it.

The limit counts the run's wall time from the start of its setup (data cache, model) to the end
of its last checkpoint. The plan:

- measures the first steps of the session (`MEASURED_STEPS` after `SKIPPED_STEPS`, which
  allocate and warm caches), estimates an epoch (its steps, and validation as
  `VALIDATION_SHARE` of a step per batch until measured) and fits the number of epochs to the
  limit: the planned epochs when they fit, else as many as do;
- sets the schedule's total steps to the fitted epochs, so the learning rate still decays to
  its end on the last of them;
- re-plans at every epoch's end, before its checkpoints (which ``last.pt`` then records), from
  the slower of the last two epochs: a machine that slows down is re-planned at once, one that
  speeds up after two faster epochs (a plan that rose on one fast epoch and fell back on the
  next would end the run before its schedule does);
- stops an epoch early if even its validation and checkpoints would pass the limit;
- ends the run when no further epoch fits: ``best.pt`` is then the best epoch inside the limit.

``last.pt`` keeps the time used and the fitted epochs, so a resumed run
(`TimeBudget.load_state_dict`) spends only what is left, and one the limit ended stays ended.

The default (``train.time_limit`` None) is an hour on a CPU whose first plan passes it, and no
limit otherwise (a GPU, or a CPU that trains the planned epochs inside the hour): the plan line
says which. The decision is kept in ``last.pt``, so a resumed run keeps it. ``0``: no limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from medseg.engine.runtime import Ranks, gather_objects

clock: Callable[[], float] = time.monotonic  # seconds; tests put a fake clock here

SKIPPED_STEPS = 1
MEASURED_STEPS = 5
VALIDATION_SHARE = 0.5  # a validation batch's time in training steps, until an epoch measures it
# Kept free for what no measurement foresees (a slow save, a busy machine): a share of the
# limit, or half an epoch if more, so that a last epoch slower than planned still ends inside.
RESERVE = 0.02
HOUR = 3600.0  # the default limit of a CPU run whose estimate passes it


def format_duration(seconds: float) -> str:
    """``95 s``, ``42.5 min`` or ``1.8 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * HOUR:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / HOUR:.1f} h"


class TimeBudget:
    """A run's time against its limit, and the number of epochs that keeps it inside.

    ``schedule``: the learning-rate schedule, an object whose ``total_steps`` the plan sets.
    ``epochs`` is the loop's end: the planned epochs, or fewer when the limit holds fewer.
    """

    def __init__(
        self,
        *,
        limit: float | None,
        epochs: int,
        steps_per_epoch: int,
        validation_batches: int,
        schedule: Any,
        started: float,
        ranks: Ranks,
        on_cpu: bool,
    ):
        self.limit = limit  # seconds; 0: none; None: the default, decided by the first plan
        self.by_default = False  # the limit is the CPU default, not the user's
        self.planned_epochs = epochs
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.validation_batches = validation_batches
        self.schedule = schedule
        self.started = started
        self.ranks = ranks
        self.on_cpu = on_cpu
        self.used_before = 0.0  # by earlier sessions of a resumed run
        self.ended = False  # the plan holds no further epoch before the planned ones
        self.step_seconds: float | None = None  # measured in this session
        self.tail_seconds: float | None = None  # an epoch's validation and checkpoints
        self.save_seconds = 0.0  # checkpoints and reports, from a plan to the next epoch
        self._last_cost = 0.0  # the previous epoch's seconds
        self._planned_at: float | None = None  # when the last epoch's plan was made
        self.planned = False  # this session's first plan is made
        self._epoch = 0  # the epoch being trained
        self._epoch_start = self._timed_from = self._last_step = 0.0
        self._steps = 0

    def used(self) -> float:
        """Seconds the run has used so far, earlier sessions included."""
        return self.used_before + clock() - self.started

    def begin_epoch(self, epoch: int) -> None:
        self._epoch, self._steps = epoch, 0
        self._epoch_start = self._last_step = clock()
        if self._planned_at is not None:
            self.save_seconds = self._epoch_start - self._planned_at

    def after_step(self) -> bool:
        """Count an optimizer step; True when the epoch must stop here to end inside the limit."""
        now = clock()
        self._steps += 1
        if self._steps == SKIPPED_STEPS:
            self._timed_from = now
        elif self._steps == SKIPPED_STEPS + MEASURED_STEPS and not self.planned:
            self.step_seconds = (now - self._timed_from) / MEASURED_STEPS
            if not self.ranks.distributed:  # ranks plan together, at epoch ends
                self._plan(self._epoch - 1 + self._steps / self.steps_per_epoch)
        step = now - self._last_step
        self._last_step = now
        if not self.limit or self.ranks.distributed or self._steps >= self.steps_per_epoch:
            return False
        # Cut the epoch when one more step and its validation would pass the limit.
        return self.used() + step + self._tail() > self.limit

    def end_epoch(self) -> None:
        """After an epoch's validation, before its checkpoints: re-plan from what it took, the
        checkpoints counted as the last epoch's took (every rank alike)."""
        now = self._planned_at = clock()
        train = self._last_step - self._epoch_start
        step = train / max(self._steps, 1)
        measured = (step, now - self._last_step + self.save_seconds, self.used())
        if self.ranks.distributed:  # the slowest rank decides, so all stop together
            measured = tuple(map(max, zip(*gather_objects(measured, self.ranks), strict=True)))
        self.step_seconds, self.tail_seconds, used = measured
        cost = self.steps_per_epoch * self.step_seconds + self.tail_seconds
        self._plan(self._epoch, used=used, epoch_cost=max(cost, self._last_cost))
        self._last_cost = cost

    def _tail(self) -> float:
        if self.tail_seconds is not None:
            return self.tail_seconds
        return self.validation_batches * (self.step_seconds or 0.0) * VALIDATION_SHARE

    def _plan(
        self, done: float, *, used: float | None = None, epoch_cost: float | None = None
    ) -> None:
        """Fit the epochs to what is left after ``done`` epochs (fractions: mid-epoch)."""
        used = self.used() if used is None else used
        if epoch_cost is None:
            epoch_cost = self.steps_per_epoch * self.step_seconds + self._tail()
        epoch_cost = max(epoch_cost, 1e-6)
        # The rest of the current epoch, when planning mid-epoch.
        current = math.ceil(done)
        finish = (current - done) * self.steps_per_epoch * self.step_seconds
        finish += self._tail() if current > done else 0.0
        estimate = used + finish + (self.planned_epochs - current) * epoch_cost
        first = not self.planned
        self.planned = True
        if self.limit is None:  # the default: an hour on a CPU whose plan passes it
            self.by_default = self.on_cpu and estimate > HOUR
            self.limit = HOUR if self.by_default else 0.0
        if not self.limit:
            return
        left = self.limit - max(RESERVE * self.limit, epoch_cost / 2) - used - finish
        fitting = min(self.planned_epochs, current + max(0, math.floor(left / epoch_cost)))
        before, self.epochs = self.epochs, max(fitting, math.floor(done))
        self.ended = self.epochs < self.planned_epochs and self.epochs <= done
        self.fit_schedule()
        if self.ranks.is_main and (first or self.epochs != before):
            self._announce(first, before, estimate)

    def _announce(self, first: bool, before: int, estimate: float) -> None:
        limit = format_duration(self.limit)
        if first and self.by_default:
            limit += " (the default on a CPU whose plan passes an hour; --time-limit 0: none)"
        rate = f"{self.step_seconds:.2f} s a step"
        if self.ended:
            say(f"time limit {limit}: no further epoch fits ({rate}); the run ends here")
        elif not first:
            say(f"time limit {limit}: {self.epochs} epochs fit now ({rate}), not {before}")
        elif self.epochs == self.planned_epochs:
            total = format_duration(estimate)
            say(f"time limit {limit}: all {self.epochs} epochs fit ({rate}; about {total})")
        else:
            say(
                f"time limit {limit}: {self.epochs} of the {self.planned_epochs} planned epochs "
                f"fit ({rate}; all would take about {format_duration(estimate)}), the "
                f"learning-rate schedule fitted to them"
            )

    def fit_schedule(self) -> None:
        """Let the learning-rate schedule end with the fitted epochs."""
        self.schedule.total_steps = self.epochs * self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "used": self.used(), "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a run's accounting (``state`` None: a run from before time limits)."""
        if state is None:
            return
        self.used_before = float(state["used"])
        if self.limit is None:  # the default, as the run's first session decided it
            self.limit = state["limit"]
        # The saved plan holds only under the same limit: a new limit (--resume --time-limit)
        # plans afresh, and without one the planned epochs (--resume --epochs N) stand.
        if self.limit and state["limit"] == self.limit:
            self.epochs = min(int(state["epochs"]), self.planned_epochs)
        self.fit_schedule()


def budget_spent(
    state: dict[str, Any] | None, limit: float | None, *, finished: int, planned: int
) -> bool:
    """Whether a run saved after ``finished`` of its ``planned`` epochs was ended by this same
    time limit (its plan held no further epoch; None: the default it decided): nothing is left
    to train."""
    if state is not None and limit is None:
        limit = state["limit"]
    if state is None or not limit or state["limit"] != limit:
        return False
    return finished >= state["epochs"] and state["epochs"] < planned


def say(line: str) -> None:
    """A line for the console that leaves a progress bar on a terminal intact."""
    tqdm.write(line)
