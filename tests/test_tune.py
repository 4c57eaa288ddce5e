"""``medseg tune``: an Optuna study of short trainings kept in a folder, on tiny synthetic data."""

from __future__ import annotations

import csv
import sys
import time

import pytest
import yaml

from medseg import cli
from medseg.commands import tune as tuning
from medseg.core.errors import MedsegError

optuna = pytest.importorskip("optuna")

TINY = ["--set", "model.backbone=resnet18", "--set", "data.image_size=64"]
TINY += ["--set", "model.pretrained=false", "--set", "train.batch_size=4"]
TINY_OVERRIDES = {
    "model.backbone": "resnet18",
    "data.image_size": 64,
    "model.pretrained": False,
    "train.batch_size": 4,
}


def load(folder):
    storage = f"sqlite:///{folder / 'study.db'}"
    return optuna.load_study(study_name=tuning.STUDY_NAME, storage=storage)


def table(folder) -> list[dict[str, str]]:
    with open(folder / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def metrics(run) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_study_resumes_with_its_trials_kept_and_its_best_config_trains(synthetic_root, tmp_path):
    study = tmp_path / "study"
    command = ["tune", "--data", str(synthetic_root), "--out", str(study), "--epochs", "1", *TINY]
    assert cli.main([*command, "--trials", "1", "--quiet"]) == 0
    [first] = load(study).trials
    assert first.state.name == "COMPLETE"
    # The trial's score is its run's best validation Dice, epoch by epoch in the study.
    dice = [float(row["val_dice"]) for row in metrics(study / "trial_000")]
    assert first.intermediate_values == {1: pytest.approx(dice[0], abs=1e-6)}
    assert first.value == pytest.approx(max(dice), abs=1e-6)
    assert not (study / "trial_000/checkpoints/last.pt").exists()  # trials are never resumed
    assert (study / "trial_000/checkpoints/best.pt").is_file()

    # Killed or not, the same command again continues the study: one more trial, the first kept.
    assert cli.main([*command, "--trials", "2", "--quiet"]) == 0
    trials = load(study).trials
    assert len(trials) == 2 and trials[1].state.name == "COMPLETE"
    kept = trials[0]
    assert (kept.params, kept.value, kept.datetime_complete) == (
        first.params,
        first.value,
        first.datetime_complete,
    )
    rows = table(study)
    assert [row["trial"] for row in rows] == ["0", "1"]
    assert float(rows[0]["val_dice"]) == pytest.approx(first.value, abs=1e-5)
    assert rows[0]["train.lr"] == str(first.params["train.lr"])
    assert (study / "trials.png").stat().st_size > 10_000

    # best_config.yaml: the best trial's settings over the study's base, for a full training.
    best = max(trials, key=lambda trial: trial.value)
    best_config = yaml.safe_load((study / "best_config.yaml").read_text())
    assert best_config["train"]["lr"] == best.params["train.lr"]
    assert best_config["train"]["batch_size"] == best.params["train.batch_size"]
    assert best_config["train"]["loss"] == best.params["train.loss"]
    assert best_config["model"]["backbone"] == "resnet18"
    assert best_config["train"]["epochs"] == 0  # planned by the full training, not the trial's 1
    run = tmp_path / "best"
    train = ["train", "--data", str(synthetic_root), "--config", str(study / "best_config.yaml")]
    assert cli.main([*train, "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["loss"] == best.params["train.loss"]
    assert len(metrics(run)) == 1


def test_the_pruner_stops_a_trial_after_the_epoch_it_judges(synthetic_root, tmp_path):
    study = tmp_path / "study"
    every_trial_trails = optuna.pruners.ThresholdPruner(lower=1.01)  # Dice is never above 1
    summary = tuning.tune(
        synthetic_root, study, trials=1, epochs=2, overrides=TINY_OVERRIDES,
        pruner=every_trial_trails, progress=False,
    )  # fmt: skip
    [trial] = load(study).trials
    assert trial.state.name == "PRUNED"
    assert list(trial.intermediate_values) == [1]
    assert len(metrics(study / "trial_000")) == 1  # epoch 2 never ran
    assert [row["state"] for row in table(study)] == ["pruned"]
    assert summary["best"] is None and not (study / "best_config.yaml").exists()


def test_a_killed_trial_is_marked_failed_and_does_not_count(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tuning, "GRACE_SECONDS", 1)
    study_folder = tmp_path / "study"
    assert tuning.tune(synthetic_root, study_folder, trials=0, epochs=1, overrides=TINY_OVERRIDES)
    # What a killed `medseg tune` leaves: a running trial whose heartbeats stopped.
    study = load(study_folder)
    killed = study.ask()
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(2.5)
    tuning.tune(None, study_folder, trials=1, epochs=None, progress=False)
    states = [trial.state.name for trial in load(study_folder).trials]
    assert states == ["FAIL", "COMPLETE"]
    assert [row["state"] for row in table(study_folder)] == ["failed", "complete"]


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ("train.lr: []\n", "train.lr"),
        ("train.lrr: [0.1, 0.01]\n", "train.lrr"),
        ("train.loss: [dice, dcie]\n", "dcie"),
        ("train.seed: [0, 1]\n", "train.seed"),
        ("train.lr: {low: 0, high: 1.0e-3, log: true}\n", "A > 0"),
        ("- train.lr\n", "must map settings"),
    ],
)
def test_a_bad_search_space_is_refused_before_any_trial(
    synthetic_root, tmp_path, capsys, space, named
):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    study = tmp_path / "study"
    command = ["tune", "--data", str(synthetic_root), "--out", str(study), "--trials", "1"]
    assert cli.main([*command, "--space", str(path)]) == 2
    error = capsys.readouterr().err
    assert named in error and str(path) in error and len(error.strip().splitlines()) == 1
    assert not list(study.glob("trial_*"))
    assert not (study / "search_space.yaml").exists()  # a corrected --space may start it


def test_a_study_keeps_its_settings(synthetic_root, tmp_path, capsys):
    study = tmp_path / "study"
    start = ["tune", "--out", str(study), "--trials", "0"]
    assert cli.main([*start, "--data", str(synthetic_root), "--epochs", "2", *TINY]) == 0
    assert (study / "search_space.yaml").read_text() == tuning.DEFAULT_SPACE
    capsys.readouterr()
    for changed in (["--epochs", "3"], ["--data", str(tmp_path)], ["--set", "train.lr=0.5"]):
        assert cli.main([*start, *changed]) == 2
        assert "was started with" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("train.lr: [0.1, 0.01]\n")
    assert cli.main([*start, "--space", str(other)]) == 2
    assert "already has its search space" in capsys.readouterr().err
    # A trial drew train.lr from the default values; the study's file may not change them now.
    load(study).add_trial(
        optuna.trial.create_trial(
            params={"train.lr": 1e-4},
            distributions={
                "train.lr": optuna.distributions.CategoricalDistribution([1e-5, 1e-4, 1e-3])
            },
            value=0.5,
        )
    )
    (study / "search_space.yaml").write_text("train.lr: [0.1, 0.01]\n")
    with pytest.raises(MedsegError, match="changes the values of train.lr"):
        tuning.tune(None, study, trials=0)


def test_without_optuna_one_line_names_the_extra(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    command = ["tune", "--data", str(synthetic_root), "--out", str(tmp_path / "s"), "--trials", "1"]
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert "pip install 'medseg[tune]'" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_under_torchrun_it_refuses_in_one_line(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    command = ["tune", "--data", str(synthetic_root), "--out", str(tmp_path / "s"), "--trials", "1"]
    assert cli.main(command) == 2
    assert "without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
