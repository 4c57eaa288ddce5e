"""What a run tells beyond metrics.csv: train.log (the console as plain lines), TensorBoard
events and an MLflow run, each read back with its own library's reader, resumed without
duplicated steps."""

import csv
import json
import sys

import pytest

from medseg.cli import main
from medseg.config import choices
from medseg.core import console, progress
from medseg.core.errors import MedsegError
from medseg.engine.tracking import LOGGERS, check_loggers


def metrics_csv(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_log_keeps_lines_and_drops_a_terminals_redraws(tmp_path, monkeypatch):
    log = tmp_path / "train.log"
    with console.recording() as recording:
        print("before the folder exists")
        recording.attach(log)
        sys.stderr.write("\repoch 1:  10%|█         | 1/10")  # tqdm's frames
        sys.stderr.write("\repoch 1: 100%|██████████| 10/10")
        sys.stderr.write("\r                                  \r")  # leave=False erases it
        print("epoch 1/2  train loss 0.5000")
        print("\x1b[1mbold\x1b[0m")
        monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: True)
        for _ in progress.progress_bar(range(3), desc="caching"):
            pass
        print("", end="")
    assert log.read_text().splitlines() == [
        "before the folder exists",
        "epoch 1/2  train loss 0.5000",
        "bold",
        "caching: 3/3 (100%)",  # the terminal's bar, as the plain line a log gets
    ]
    assert not console.is_recording() and "_Tee" not in type(sys.stdout).__name__


def tensorboard_scalars(run, columns):
    """{column: [(step, value), ...]} as TensorBoard's own EventAccumulator reads the events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = {c: [(e.step, e.value) for e in events.Scalars(c)] for c in columns}
    return scalars, events


def mlflow_history(run, columns):
    """{column: [(step, value), ...]} of the run's MLflow run (its id from tracking.json)."""
    import mlflow

    record = json.loads((run / "tracking.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(tracking_uri=record["tracking_uri"])
    history = {
        column: sorted(
            (m.step, m.value) for m in client.get_metric_history(record["run_id"], column)
        )
        for column in columns
    }
    return history, client, client.get_run(record["run_id"])


def expected(run, columns):
    rows = metrics_csv(run)
    return {column: [(int(row["epoch"]), float(row[column])) for row in rows] for column in columns}


def same(logged, wanted):
    for column, values in wanted.items():
        assert [step for step, _ in logged[column]] == [step for step, _ in values], column
        assert [v for _, v in logged[column]] == pytest.approx([v for _, v in values], rel=1e-5)


COLUMNS = ("lr", "train_loss", "val_loss", "val_dice", "val_iou", "seconds")


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI (honoured over the default ./mlruns) naming a file store in tmp_path:
    no database to create, so the test takes seconds."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    store = tmp_path / "mlruns-file"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.chdir(tmp_path)
    return store


def test_tensorboard_and_mlflow_hold_metrics_csv_the_config_and_images_and_the_log_the_console(
    synthetic_root, tmp_path, tiny_flags, capsys, local_mlflow
):
    run = tmp_path / "run"
    logging = ["--log", "tensorboard", "--log", "mlflow", "--log-images-every", "1"]
    command = ["train", "--data", str(synthetic_root), "--out", str(run), *tiny_flags]
    assert main([*command, "--epochs", "2", *logging]) == 0
    shown = capsys.readouterr().out.splitlines()
    log = (run / "train.log").read_text().splitlines()
    assert log == shown[:-1]  # all the console showed, but the line printed after training
    assert [line[:9] for line in log if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]

    wanted = expected(run, COLUMNS)
    scalars, events = tensorboard_scalars(run, COLUMNS)
    same(scalars, wanted)
    (image,) = events.Tags()["images"]  # the one validation image of 12 synthetic pairs
    assert [event.step for event in events.Images(image)] == [1, 2]
    assert events.Images(image)[0].width == 2 * 64  # truth beside prediction

    history, client, logged = mlflow_history(run, COLUMNS)
    same(history, wanted)
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["model.backbone"] == "resnet18" and params["data.image_size"] == "64"
    assert params["train.epochs"] == "2" and params["data.labels"] == "[]"
    artifacts = [a.path for a in client.list_artifacts(logged.info.run_id, "validation")]
    assert artifacts == ["validation/epoch_0001", "validation/epoch_0002"]
    assert not (tmp_path / "mlruns").exists()  # MLFLOW_TRACKING_URI was used


@pytest.mark.slow
def test_a_run_killed_after_an_epoch_continues_the_same_logged_runs_without_a_step_twice(
    synthetic_root, tmp_path, local_mlflow
):
    from test_resume import kill, start, wait_for

    run = tmp_path / "run"
    process = start("--data", synthetic_root, "--out", run, "--backbone", "resnet18",
                    "--image-size", "64", "--no-pretrained", "--batch-size", "4", "--quiet",
                    "--epochs", "3", "--log", "tensorboard", "--log", "mlflow")  # fmt: skip
    wait_for((run / "checkpoints" / "last.pt").exists, process)
    kill(process)  # after epoch 1 was saved: logged, or not yet
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]

    finish = start("--resume", run)  # no --log: the run's loggers are remembered
    out, err = finish.communicate(timeout=600)
    assert finish.returncode == 0, err
    wanted = expected(run, COLUMNS)
    assert [step for step, _ in wanted["val_dice"]] == [1, 2, 3]
    same(tensorboard_scalars(run, COLUMNS)[0], wanted)
    history, client, logged = mlflow_history(run, COLUMNS)
    same(history, wanted)
    assert logged.info.run_id == run_id and logged.info.status == "FINISHED"
    assert len(client.search_runs([logged.info.experiment_id])) == 1


def test_a_missing_logger_package_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(MedsegError, match=r"pip install 'medseg\[mlflow\]'"):
        check_loggers(["mlflow"])


def test_the_log_choices_are_the_loggers():
    assert tuple(LOGGERS) == choices.TRACKERS
