"""Progress: a tqdm bar on a terminal, a line now and then in a log, nothing when disabled."""

import sys

import pytest
from tqdm import tqdm

from medseg.core import progress
from medseg.core.progress import LineProgress, progress_bar


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves: ``clock[0]`` seconds."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)


def one_second_per_item(clock, count: int):
    for index in range(count):
        clock[0] += 1.0
        yield index


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress_bar(range(3), desc="predicting", leave=False)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]


def test_a_log_gets_a_line_every_30_seconds_and_one_at_the_end(clock, not_a_terminal, capsys):
    bar = progress_bar(one_second_per_item(clock, 160), desc="predicting", total=160)
    assert isinstance(bar, LineProgress) and len(bar) == 160
    assert list(bar) == list(range(160))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        "predicting: 30/160 (19%)",
        "predicting: 60/160 (38%)",
        "predicting: 90/160 (56%)",
        "predicting: 120/160 (75%)",
        "predicting: 150/160 (94%)",
        "predicting: 160/160 (100%)",
    ]


def test_a_fast_loop_logs_its_end_only_and_takes_the_length_of_its_iterable(
    clock, not_a_terminal, capsys
):
    bar = progress_bar(range(40), desc="evaluating")
    assert len(bar) == 40
    for _ in bar:
        pass
    assert capsys.readouterr().err == "evaluating: 40/40 (100%)\n"


def test_update_postfix_and_close(clock, not_a_terminal, capsys):
    bar = progress_bar(desc="epoch 3", total=10)
    bar.update(4)
    bar.set_postfix(loss="0.3120")
    clock[0] = 31.0
    bar.update(2)
    bar.update(4)
    bar.close()
    bar.close()  # a second close writes nothing more
    assert capsys.readouterr().err.splitlines() == [
        "epoch 3: 6/10 (60%), loss=0.3120",
        "epoch 3: 10/10 (100%), loss=0.3120",
    ]


def test_the_end_is_not_repeated(clock, not_a_terminal, capsys):
    bar = progress_bar(desc="evaluating", total=2)
    clock[0] = 31.0
    bar.update(2)
    bar.close()
    assert capsys.readouterr().err == "evaluating: 2/2 (100%)\n"


def test_without_a_total_the_count_alone(clock, not_a_terminal, capsys):
    bar = progress_bar(iter("abc"), desc="preparing")
    assert list(bar) == ["a", "b", "c"]
    assert capsys.readouterr().err == "preparing: 3\n"
    with pytest.raises(TypeError, match="no total"):
        len(bar)


def test_leave_false_writes_no_final_line(clock, not_a_terminal, capsys):
    assert list(progress_bar(one_second_per_item(clock, 45), desc="validating", leave=False))
    assert capsys.readouterr().err == "validating: 30\n"


@pytest.mark.parametrize("terminal", [True, False])
def test_disabled_writes_nothing_but_still_counts(clock, monkeypatch, capsys, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    bar = progress_bar(one_second_per_item(clock, 100), desc="epoch 1", total=100, enabled=False)
    assert len(bar) == 100 and sum(1 for _ in bar) == 100
    bar.set_postfix(loss="0.1")
    bar.close()
    assert capsys.readouterr().err == ""


def test_stderr_without_isatty_counts_as_a_log(monkeypatch):
    class Sink:
        def write(self, text):
            pass

    monkeypatch.setattr(sys, "stderr", Sink())
    assert isinstance(progress_bar(range(2), desc="x"), LineProgress)
