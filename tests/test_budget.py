"""--time-limit: the epochs and the schedule fitted to the limit on a throttled machine, re-planned
when it slows, kept inside the limit across a resume; the duration flag."""

import argparse
import csv
import time

import pytest
import torch
from torch import nn

from medseg.cli import duration_seconds
from medseg.config import build_config
from medseg.engine import budget, train
from medseg.engine.budget import TimeBudget
from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.runtime import Ranks
from medseg.engine.train import fit

TINY = {
    "model.backbone": "resnet18",
    "model.pretrained": False,
    "data.image_size": 64,
    "train.batch_size": 4,
}


class FakeClock:
    """Seconds that pass only when the (throttled) loss runs: every training step, and every
    validation image, costs ``cost`` seconds of this clock and nothing else does."""

    def __init__(self, cost: float):
        self.now = 1000.0
        self.cost = cost

    def __call__(self) -> float:
        return self.now


def throttle(monkeypatch, clock: FakeClock) -> None:
    """A machine where every call of the loss takes ``clock.cost`` seconds."""
    monkeypatch.setattr(budget, "clock", clock)
    build_loss = train.build_loss

    class Throttled(nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, logits, masks):
            clock.now += clock.cost
            return self.loss(logits, masks)

    monkeypatch.setattr(train, "build_loss", lambda *a, **k: Throttled(build_loss(*a, **k)))


def history(run) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_the_epochs_and_the_schedule_fit_the_limit(synthetic_root, tmp_path, monkeypatch, capsys):
    # 11 training images in batches of 4 (2 steps) and 1 validation image: 3 losses, 30 s an epoch.
    clock = FakeClock(cost=10.0)
    throttle(monkeypatch, clock)
    config = build_config(overrides={**TINY, "train.epochs": 10, "train.time_limit": 110.0})
    summary = fit(config, synthetic_root, tmp_path / "run", progress=False)

    out = capsys.readouterr().out
    assert "time limit 110 s: 3 of the 10 planned epochs fit" in out
    # 95 s (the limit less half an epoch in reserve) hold 3 epochs of 30 s.
    assert summary["epochs"] == 3
    rows = history(tmp_path / "run")
    assert rows[-1]["lr"] == 0.0  # the cosine ended with the last epoch that fits
    assert rows[0]["lr"] == pytest.approx(1e-3)  # warm-up over after one epoch
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["budget"] == {"limit": 110.0, "used": 90.0, "epochs": 3}
    assert last["scheduler"]["lr_lambdas"][0]["total_steps"] == 6

    # Resuming a run its limit ended has nothing left to do.
    assert fit(None, synthetic_root, tmp_path / "run", resume=True)["epochs"] == 3
    assert "ended at its time limit after epoch 3" in capsys.readouterr().out


def test_a_machine_that_slows_down_is_re_planned_and_ends_inside(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    clock = FakeClock(cost=10.0)
    throttle(monkeypatch, clock)
    report = train._report_epoch

    def slow_down_after_second(row, epochs, improved):
        report(row, epochs, improved)
        if row["epoch"] == 2:
            clock.cost = 20.0  # 60 s an epoch from epoch 3 on

    monkeypatch.setattr(train, "_report_epoch", slow_down_after_second)
    config = build_config(overrides={**TINY, "train.epochs": 20, "train.time_limit": 230.0})
    summary = fit(config, synthetic_root, tmp_path / "run", progress=False)

    out = capsys.readouterr().out
    assert "7 of the 20 planned epochs fit" in out  # at 30 s an epoch
    assert "4 epochs fit now (20.00 s a step), not 7" in out  # after the first slow epoch
    assert summary["epochs"] == 4
    assert history(tmp_path / "run")[-1]["lr"] == 0.0  # the schedule refitted to 4 epochs
    used = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["budget"]["used"]
    assert used == 2 * 30 + 2 * 60 <= 230


def test_an_epoch_that_would_pass_the_limit_stops_early(synthetic_root, tmp_path, monkeypatch):
    clock = FakeClock(cost=10.0)
    throttle(monkeypatch, clock)
    report = train._report_epoch

    def much_slower_after_first(row, epochs, improved):
        report(row, epochs, improved)
        clock.cost = 40.0  # a step and the validation now take 80 s, with 40 s left

    monkeypatch.setattr(train, "_report_epoch", much_slower_after_first)
    config = build_config(overrides={**TINY, "train.epochs": 5, "train.time_limit": 110.0})
    fit(config, synthetic_root, tmp_path / "run", progress=False)
    # Epoch 2 was planned at 30 s; after its first step (40 s) another step and the
    # validation (40 s + 40 s) would pass 110 s, so the epoch validates after one step.
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and last["budget"]["used"] == 30 + 40 + 40 <= 110
    assert last["scheduler"]["last_epoch"] == 3  # 2 steps, then 1


def test_a_resumed_run_spends_only_what_is_left(synthetic_root, tmp_path, monkeypatch):
    config = build_config(overrides={**TINY, "train.epochs": 10, "train.time_limit": 110.0})
    clock = FakeClock(cost=10.0)
    throttle(monkeypatch, clock)
    fit(config, synthetic_root, tmp_path / "whole", progress=False)

    report = train._report_epoch

    def interrupt_after_first(row, epochs, improved):
        report(row, epochs, improved)
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_report_epoch", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        fit(config, synthetic_root, tmp_path / "resumed", progress=False)
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["budget"]
    assert saved == {"limit": 110.0, "used": 30.0, "epochs": 3}
    clock.now += 500.0  # the time between the kill and the resume is not the run's
    monkeypatch.setattr(train, "_report_epoch", report)
    summary = fit(None, synthetic_root, tmp_path / "resumed", resume=True, progress=False)

    assert summary["epochs"] == 3
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["budget"]["used"] == 90.0  # 30 s before the interruption, 60 s after
    lr = [row["lr"] for row in history(tmp_path / "resumed")]
    assert lr == [row["lr"] for row in history(tmp_path / "whole")]  # the same fitted schedule


def test_a_real_clock_with_sleeping_steps_ends_inside_the_limit(
    synthetic_root, tmp_path, monkeypatch
):
    build_loss = train.build_loss

    class Sleepy(nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, logits, masks):
            time.sleep(0.3)  # a slow machine
            return self.loss(logits, masks)

    monkeypatch.setattr(train, "build_loss", lambda *a, **k: Sleepy(build_loss(*a, **k)))
    config = build_config(overrides={**TINY, "train.epochs": 50, "train.time_limit": 10.0})
    started = time.monotonic()
    summary = fit(config, synthetic_root, tmp_path / "run", progress=False)
    elapsed = time.monotonic() - started
    assert elapsed <= 10.0
    assert 1 <= summary["epochs"] < 50
    # Unfitted, the cosine over 50 epochs would still be at 0.99 of its peak (1e-3) here;
    # fitted, it ends at 0, or near it where the shared machine's noise ended the run an epoch
    # or two early (0.25 of the peak measured once on CI).
    assert history(tmp_path / "run")[-1]["lr"] < 5e-4


class Schedule:
    total_steps = 0


def planned(monkeypatch, *, limit, on_cpu: bool, step: float) -> TimeBudget:
    """ISIC's plan (50 epochs of 95 steps, 13 validation batches) after its first steps."""
    clock = FakeClock(cost=0.0)
    monkeypatch.setattr(budget, "clock", clock)
    plan = TimeBudget(
        limit=limit, epochs=50, steps_per_epoch=95, validation_batches=13, schedule=Schedule(),
        started=clock(), ranks=Ranks(), on_cpu=on_cpu,
    )  # fmt: skip
    plan.begin_epoch(1)
    for _ in range(budget.SKIPPED_STEPS + budget.MEASURED_STEPS):
        clock.now += step
        assert plan.after_step() is False
    return plan


def test_by_default_a_cpu_run_whose_plan_passes_an_hour_is_fitted_into_one(monkeypatch, capsys):
    plan = planned(monkeypatch, limit=None, on_cpu=True, step=1.37)  # the 2-core EPYC
    out = capsys.readouterr().out
    # 50 × (95 + 13 × 0.5) steps of 1.37 s: about 116 min; the hour less half an epoch holds 25.
    assert (
        "time limit 60.0 min (the default on a CPU whose plan passes an hour; --time-limit 0: "
        "none): 25 of the 50 planned epochs fit (1.37 s a step; all would take about 115.9 min)"
    ) in out
    assert plan.limit == 3600.0 and plan.epochs == 25 and plan.schedule.total_steps == 25 * 95
    assert plan.state_dict()["limit"] == 3600.0  # last.pt keeps the decision for a resume


@pytest.mark.parametrize(
    ("limit", "on_cpu", "step"),
    [(None, True, 0.5), (None, False, 1.37), (0.0, True, 1.37)],
    ids=["cpu-inside-the-hour", "gpu", "cpu-limit-0"],
)
def test_no_limit_by_default_inside_the_hour_on_gpus_or_with_0(
    monkeypatch, capsys, limit, on_cpu, step
):
    plan = planned(monkeypatch, limit=limit, on_cpu=on_cpu, step=step)
    assert plan.limit == 0.0 and plan.epochs == 50 and plan.schedule.total_steps == 0
    assert "time limit" not in capsys.readouterr().out


def test_a_resumed_run_keeps_the_default_its_first_session_decided():
    saved = {"limit": 3600.0, "used": 1200.0, "epochs": 25}
    plan = TimeBudget(
        limit=None, epochs=50, steps_per_epoch=95, validation_batches=13, schedule=Schedule(),
        started=budget.clock(), ranks=Ranks(), on_cpu=True,
    )  # fmt: skip
    plan.load_state_dict(saved)
    assert plan.limit == 3600.0 and plan.epochs == 25 and plan.used_before == 1200.0
    assert budget.budget_spent({**saved, "used": 3500.0}, None, finished=25, planned=50)
    assert not budget.budget_spent({**saved, "limit": 0.0}, None, finished=25, planned=50)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("60m", 3600.0), ("1.5h", 5400.0), ("45min", 2700.0), ("3600", 3600.0)],
)
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["an hour", "-5m", "nan", "1.5d"])
def test_impossible_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration_seconds(text)


def test_the_schedule_object_gives_the_factor_of_its_total_steps():
    config = build_config(overrides={"train.epochs": 4, "train.warmup_epochs": 1.0})
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train.build_scheduler(optimizer, config, steps_per_epoch=5)
    factor = scheduler.lr_lambdas[0]
    assert factor.total_steps == 20 and factor(20) == 0.0
    factor.total_steps = 10  # refitted by a time limit: the cosine ends at step 10
    assert factor(10) == 0.0 and factor(5) == 1.0
    assert scheduler.state_dict()["lr_lambdas"][0]["total_steps"] == 10
