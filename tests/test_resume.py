"""Nothing lost: training killed (SIGKILL, several times) or interrupted (Ctrl-C) resumes to the
result of an uninterrupted run, and an interrupted predict resumes without redoing finished files.

The training tests run ``python -m medseg train`` as a child process on tiny synthetic data and
interrupt it at chosen moments, found by watching the run folder's files.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from medseg.cli import main
from medseg.core.files import atomic_path
from medseg.engine.checkpoint import load_checkpoint
from medseg.prediction.outputs import RECORD_NAME

TRAIN = [
    "--backbone", "resnet18", "--image-size", "64", "--no-pretrained", "--batch-size", "4",
    "--deterministic", "--quiet",
]  # fmt: skip


def start(*args):
    """Start ``python -m medseg train ARGS`` (one thread: the machine's cores are shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # MEDSEG_CACHE_DIR comes from the fixture
    command = [sys.executable, "-m", "medseg", "train", *map(str, args)]
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job starts with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the child the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, process, *, timeout=300.0):
    """Poll until `condition()` holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"medseg train ended ({process.returncode}) too early:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("medseg train took too long")
        time.sleep(0.005)


def file_id(path):
    """Changes whenever `path` is replaced (atomic writes give it a new inode and mtime)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def metrics(run):
    """metrics.csv's rows without the wall-clock column."""
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def leftovers(run):
    return [p.name for folder in (run, run / "checkpoints") for p in folder.glob(".*.tmp*")]


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def test_training_killed_four_times_ends_as_an_uninterrupted_run(synthetic_root, tmp_path):
    epochs = ["--epochs", "4"]
    reference = tmp_path / "reference"
    whole = start("--data", synthetic_root, "--out", reference, *TRAIN, *epochs)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.pt"

    # 1. Before the first epoch ends: the run folder and its config.yaml exist, no checkpoint.
    process = start("--data", synthetic_root, "--out", run, *TRAIN, *epochs)
    wait_for(lambda: (run / "run.json").exists(), process)
    kill(process)
    assert not last.exists()

    # 2. and 3. The moment a checkpoint lands (metrics.csv may not be rewritten yet). A resumed
    #    run rewrites config.yaml just before its first epoch: that times an epoch here.
    for finished_epoch in (1, 2):
        before, config_before = file_id(last), file_id(run / "config.yaml")
        process = start("--resume", run)
        wait_for(lambda c=config_before: file_id(run / "config.yaml") != c, process)
        epoch_started = time.monotonic()
        wait_for(lambda before=before: file_id(last) != before, process)
        kill(process)
        epoch_seconds = time.monotonic() - epoch_started
        assert load_checkpoint(last)["epoch"] == finished_epoch

    # 4. In the middle of epoch 3, a quarter of an epoch after it began.
    before = file_id(run / "config.yaml")
    process = start("--resume", run)
    wait_for(lambda: file_id(run / "config.yaml") != before, process)
    time.sleep(epoch_seconds / 4)
    kill(process)
    assert load_checkpoint(last)["epoch"] == 2  # killed before epoch 3 was saved

    finish = start("--resume", run)
    out, err = finish.communicate(timeout=600)
    assert finish.returncode == 0, err

    assert metrics(run) == metrics(reference)  # every number, as printed (6 digits)
    assert [row["epoch"] for row in metrics(run)] == ["1", "2", "3", "4"]
    resumed, uninterrupted = (
        load_checkpoint(r / "checkpoints" / "last.pt") for r in (run, reference)
    )
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name  # bit for bit
    assert resumed["history"] == [
        {**row, "seconds": resumed_row["seconds"]}
        for row, resumed_row in zip(uninterrupted["history"], resumed["history"], strict=True)
    ]
    assert leftovers(run) == []  # temporary files of killed writes were cleaned up


def test_ctrl_c_keeps_finished_epochs_and_the_run_resumes(synthetic_root, tmp_path):
    run = tmp_path / "run"
    # Tiny epochs take about 0.15 s each: 30 of them leave the signal seconds to arrive in,
    # even on a loaded machine, where 3 left it half a second.
    epochs = 30
    process = start("--data", synthetic_root, "--out", run, *TRAIN, "--epochs", epochs)
    wait_for(lambda: (run / "metrics.csv").exists(), process)  # epoch 1 fully saved
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)

    assert process.returncode == 130
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medseg: interrupted; the epochs finished so far are saved")
    assert lines[0].endswith(f"continue with: medseg train --resume {run}")
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]
    assert 1 <= saved < epochs  # the signal came after epoch 1, before the last one ended
    assert len(metrics(run)) == saved
    assert leftovers(run) == []

    finish = start("--resume", run)
    out, err = finish.communicate(timeout=300)
    assert finish.returncode == 0, err
    assert [row["epoch"] for row in metrics(run)] == [str(e) for e in range(1, epochs + 1)]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == epochs


def test_interrupted_predict_resumes_and_one_bad_image_loses_no_other(
    tiny_checkpoint, synthetic_root, tmp_path, monkeypatch, capsys
):
    images = tmp_path / "images"
    shutil.copytree(synthetic_root / "train" / "images", images)  # SYN_0000 ... SYN_0011
    broken = images / "SYN_0002x.jpg"  # sorts between SYN_0002 and SYN_0003
    whole = (images / "SYN_0002.jpg").read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    output = tmp_path / "masks"
    command = [
        "predict", "--checkpoint", str(tiny_checkpoint), "--input", str(images),
        "--output", str(output), "--batch-size", "4", "--device", "cpu", "--quiet",
    ]  # fmt: skip

    # Ctrl-C in the middle of writing the fifth mask.
    import medseg.prediction.outputs as inference

    real_save, saves = inference.save_png, []

    def interrupted_at_the_fifth(path, array):
        saves.append(path)
        if len(saves) == 5:
            with atomic_path(path) as temporary:
                temporary.write_bytes(b"\x89PNG half a mask")
                raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(inference, "save_png", interrupted_at_the_fifth)
    assert main(command) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"medseg: interrupted; the masks written so far are kept in {output}; run the same "
        f"command again to segment the rest"
    ]
    first = sorted(output.glob("*_segmentation.png"))
    assert [p.name for p in first] == [f"SYN_{i:04d}_segmentation.png" for i in range(4)]
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [RECORD_NAME, *(p.name for p in first)]
    )
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first}

    monkeypatch.setattr(inference, "save_png", real_save)
    assert main(command) == 1  # one image failed
    captured = capsys.readouterr()
    assert "8 masks written" in captured.out and "4 already there (kept)" in captured.out
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 2
    assert err_lines[0].startswith(f"medseg: could not segment: {broken} is corrupt or truncated")
    assert err_lines[1].startswith("medseg: error: 1 images failed")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first} == stamps  # not redone
    written = sorted(p.name for p in output.glob("*_segmentation.png"))
    assert written == [f"SYN_{i:04d}_segmentation.png" for i in range(12)]
    assert "Traceback" not in captured.err


def test_a_run_resumed_from_its_config_yaml_alone_keeps_the_settings_of_its_time(tmp_path):
    # A run started before model.separable existed, killed before its first epoch ended.
    from medseg.config import Config
    from medseg.engine.run_folder import RunFolder
    from medseg.engine.train import resume_point

    values = Config().to_dict()
    del values["model"]["separable"]
    run = RunFolder(tmp_path / "old-run")
    run.path.mkdir()
    run.config.write_text(yaml.safe_dump(values))
    checkpoint, config = resume_point(run, {})
    assert checkpoint is None
    assert config.model.separable is False  # how that run's network was built
