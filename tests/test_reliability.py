"""The reliability rules, command by command: nothing medseg accepts ends in a traceback, a run
folder belongs to one process, a finished result changes only with --overwrite, and the advice
printed after a failure works as printed.
"""

import subprocess
import sys

import pytest
import torch
from conftest import one_line_failure

from medseg.cli import main
from medseg.core.errors import EXIT_BUG, EXIT_OUT_OF_MEMORY, EXIT_SYSTEM
from medseg.engine import train as train_module
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint


def metrics_epochs(run):
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    return [row.split(",")[0] for row in rows]


# --- settings and flags: one table for every command -----------------------------------------

BAD_TRAIN_SETTINGS = [
    (["--set", "train.threshold=.nan"], "train.threshold=nan"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--set", "train.warmup_epochs=.inf"], "train.warmup_epochs=inf"),
    (["--set", "data.val_fraction=.nan"], "data.val_fraction=nan"),
    (["--set", "model.aspp_dropout=2"], "model.aspp_dropout=2"),
    (["--set", "train.threshold=1.5"], "train.threshold=1.5"),
    (["--device", "foo"], "foo"),
    (["--device", "cuda:x"], "cuda:x"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "two"], "--batch-size"),
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "16"], "data.image_size=16"),
    (["--num-workers", "-2"], "--num-workers"),
    (["--seed", "-3"], "--seed"),
    (["--patience", "-1"], "--patience"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_TRAIN_SETTINGS)
def test_bad_training_settings_are_refused_in_one_line(
    capsys, synthetic_root, tmp_path, tiny_flags, flags, named
):
    out = tmp_path / "run"
    argv = ["train", "--data", synthetic_root, "--out", out, *tiny_flags, *flags]
    one_line_failure(capsys, argv, expect=[named])
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "flags", "named"),
    [
        ("predict", ["--batch-size", "0"], "--batch-size"),
        ("predict", ["--device", "foo"], "foo"),
        ("predict", ["--threshold", "nan"], "threshold"),
        ("evaluate", ["--batch-size", "-4"], "--batch-size"),
        ("visualize", ["--num-samples", "0"], "--num-samples"),
    ],
)
def test_bad_inference_flags_are_refused_in_one_line(
    capsys, synthetic_root, tmp_path, tiny_checkpoint, command, flags, named
):
    out = tmp_path / "out"
    data = synthetic_root / "test"
    where = (
        ["--input", data / "images", "--output", out]
        if command == "predict"
        else ["--data", data, "--out", out]
    )
    argv = [command, "--checkpoint", tiny_checkpoint, *where, "--quiet", *flags]
    one_line_failure(capsys, argv, expect=[named])
    assert not out.exists()


@pytest.mark.parametrize(
    "argv", [["prepare", "DATA", "--size", "0"], ["demo", "--epochs", "0"], ["train", "--bogus"]]
)
def test_other_commands_refuse_bad_flags_in_one_line(capsys, synthetic_root, argv):
    argv = [str(synthetic_root) if arg == "DATA" else arg for arg in argv]
    one_line_failure(capsys, argv)


def test_a_checkpoint_with_an_impossible_setting_is_refused_when_loaded(
    capsys, tmp_path, tiny_checkpoint, synthetic_root
):
    state = load_checkpoint(tiny_checkpoint)
    state["config"]["train"]["threshold"] = float("nan")
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, {k: v for k, v in state.items() if k not in ("format", "version")})
    out = tmp_path / "masks"
    argv = ["predict", "--checkpoint", broken, "--input", synthetic_root / "test" / "images"]
    one_line_failure(capsys, [*argv, "--output", out], expect=[broken, "train.threshold=nan"])
    assert not out.exists()


# --- a batch of one image ---------------------------------------------------------------------


def test_training_with_batches_of_one_image_works(synthetic_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    argv = ["train", "--data", synthetic_root, "--out", run, *tiny_flags, "--epochs", "1"]
    assert main([str(arg) for arg in [*argv, "--batch-size", "1"]]) == 0
    assert metrics_epochs(run) == ["1"]


# --- one process per run folder -----------------------------------------------------------------

HOLD_THE_RUN = """
import sys, time
from medseg.engine.run_folder import RunFolder
with RunFolder(sys.argv[1]).claim():
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_a_second_training_into_the_same_folder_is_refused(
    capsys, synthetic_root, tmp_path, tiny_flags
):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_RUN, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        argv = ["train", "--data", synthetic_root, "--out", run, *tiny_flags, "--epochs", "1"]
        one_line_failure(
            capsys, argv, expect=[run, "in use by another medseg run", f"pid {holder.pid}"]
        )
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died with its lock file in place: the next run takes the folder over.
    assert (run / ".medseg.lock").exists()
    assert main([str(arg) for arg in argv]) == 0
    assert metrics_epochs(run) == ["1"]


# --- resume says what it does, and refuses what it cannot do -------------------------------------


@pytest.fixture
def finished_run(synthetic_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    argv = ["train", "--data", synthetic_root, "--out", run, *tiny_flags, "--epochs", "1"]
    assert main([str(arg) for arg in argv]) == 0
    return run


def test_resuming_a_finished_run_says_so_and_changes_nothing(capsys, finished_run):
    before = (finished_run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "has finished all 1 epochs" in out and "--epochs" in out
    assert (finished_run / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_with_more_epochs_trains_on(capsys, finished_run):
    assert main(["train", "--resume", str(finished_run), "--epochs", "2", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert metrics_epochs(finished_run) == ["1", "2"]
    assert (
        load_checkpoint(finished_run / "checkpoints" / "last.pt")["config"]["train"]["epochs"] == 2
    )


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "0.1"], "train.lr cannot change"),
        (["--batch-size", "2"], "train.batch_size cannot change"),
        (["--out", "elsewhere"], "drop --out"),
        (["--preset", "seed"], "a preset"),
        (["--overwrite"], "--overwrite"),
    ],
)
def test_resume_refuses_settings_it_cannot_apply(capsys, finished_run, flags, named):
    before = (finished_run / "checkpoints" / "last.pt").read_bytes()
    one_line_failure(capsys, ["train", "--resume", finished_run, *flags], expect=[named])
    assert (finished_run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_resume_where_there_is_no_run_says_so(capsys, tmp_path, kind):
    folder = tmp_path / "nothing"
    if kind == "empty":
        folder.mkdir()
    one_line_failure(
        capsys,
        ["train", "--resume", folder, "--data", tmp_path],
        expect=["no run to resume", folder],
    )


# --- after a divergence, the advice works as printed ----------------------------------------------


def test_divergence_in_the_first_epoch_says_nothing_was_saved_and_a_retry_works(
    capsys, synthetic_root, tmp_path, tiny_flags, monkeypatch
):
    run = tmp_path / "run"
    real_build_loss = train_module.build_loss

    def loss_that_is_nan(name, **settings):
        loss = real_build_loss(name, **settings)
        return lambda logits, masks: loss(logits, masks) * float("nan")

    monkeypatch.setattr(train_module, "build_loss", loss_that_is_nan)
    argv = ["train", "--data", synthetic_root, "--out", run, *tiny_flags, "--epochs", "1"]
    message = one_line_failure(capsys, argv, expect=["nothing was saved", "lower --lr"])
    assert "kept" not in message
    monkeypatch.undo()
    assert main([str(arg) for arg in argv]) == 0  # the same command, as the advice says


# --- failures that are not the input's: a line each, and --debug for the traceback ----------------


@pytest.mark.parametrize(
    ("error", "status", "named"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
            EXIT_OUT_OF_MEMORY,
            "out of memory",
        ),
        (MemoryError(), EXIT_OUT_OF_MEMORY, "out of memory"),
        (OSError(5, "Input/output error", "/data/x.png"), EXIT_SYSTEM, "/data/x.png"),
        (ValueError("something\nunexpected"), EXIT_BUG, "--debug"),
    ],
)
def test_unexpected_failures_end_in_one_line_with_their_own_status(
    capsys, synthetic_root, tmp_path, tiny_flags, monkeypatch, error, status, named
):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_module.TrainingSetup, "build", fail)
    argv = ["train", "--data", synthetic_root, "--out", tmp_path / "run", *tiny_flags]
    one_line_failure(capsys, argv, status=status, expect=[named])

    with pytest.raises(type(error)):
        main([str(arg) for arg in [*argv, "--debug"]])
    monkeypatch.setenv("MEDSEG_DEBUG", "1")
    with pytest.raises(type(error)):
        main([str(arg) for arg in argv])
