"""medseg as a new user meets it: logs without progress-bar redraws, run folders that hold only
results, evaluation folders named after what was scored, tables that fit the task, and docs
whose first commands run as written."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from medseg import api
from medseg.cli import main
from medseg.commands.evaluate import format_summary, scored_name
from medseg.config import build_config
from medseg.engine.checkpoint import save_checkpoint
from medseg.engine.run_folder import RunFolder
from medseg.model import DeepLabV3Plus

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# --- logs and run folders -----------------------------------------------------------------------


def test_a_finished_training_logs_plain_lines_and_leaves_no_lock(
    synthetic_root, tmp_path, capsys, tiny_flags
):
    run = tmp_path / "run"
    flags = [flag for flag in tiny_flags if flag != "--quiet"]  # progress on, stderr not a terminal
    argv = ["train", "--data", str(synthetic_root), "--out", str(run), *flags, "--epochs", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err  # neither the epoch's bar nor validation's redraws
    assert "(resnet18, --variant seed)" in captured.out  # the network's flag, not a "seed variant"
    assert (run / "checkpoints" / "best.pt").is_file()
    assert not (run / ".medseg.lock").exists()


def test_a_run_folder_is_locked_while_claimed_and_not_after(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(RuntimeError), folder.claim():
        assert "pid" in folder.lock_file.read_text()
        raise RuntimeError("the run failed")
    assert not folder.lock_file.exists()  # whatever ended it
    with folder.claim():
        assert folder.lock_file.exists()
    assert not folder.lock_file.exists()


def test_evaluate_logs_plain_lines_and_names_its_folder_after_what_it_scored(
    tiny_checkpoint, synthetic_root, tmp_path, capsys
):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, run / "checkpoints" / "best.pt")
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(synthetic_root)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    assert "evaluating: 1/1 (100%)" in captured.err.splitlines()
    out = run / "evaluation-synthetic-test"
    assert f"scored {synthetic_root / 'test'} (4 pairs)" in captured.out
    assert captured.out.strip().splitlines()[-1] == f"per-image scores and summary: {out}"
    assert json.loads((out / "summary.json").read_text())["images"] == 4
    # The split folder itself is the same scored data: the same folder, kept.
    argv = ["evaluate", "--checkpoint", str(run), "--data", str(synthetic_root / "test")]
    assert main([*argv, "--quiet"]) == 2
    assert f"{out} already holds an evaluation" in capsys.readouterr().err


def test_scored_names(synthetic_root, tmp_path, monkeypatch):
    assert scored_name(synthetic_root) == "synthetic-test"
    assert scored_name(synthetic_root / "train") == "synthetic-train"
    monkeypatch.chdir(synthetic_root)
    assert scored_name("test") == "synthetic-test"
    assert scored_name(".") == "synthetic-test"
    (tmp_path / "mine" / "images").mkdir(parents=True)
    assert scored_name(tmp_path / "mine") == "mine"  # a folder of pairs that is no split
    assert scored_name(tmp_path / "missing") == "missing"  # evaluate names the problem


# --- the table fits the task ----------------------------------------------------------------


@pytest.fixture
def label_map_checkpoint(tmp_path):
    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.pretrained": False,
            "data.image_size": 64,
            "data.labels": ["background", "disc", "bar"],
            "model.num_classes": 3,
            "data.channels": 1,
            "model.in_channels": 1,
        }
    )
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict()})
    return path


def table(summary) -> list[str]:
    """The metric names of the first table `format_summary` prints."""
    lines = format_summary(summary).splitlines()
    return [re.split(r"\s{2,}", line)[0] for line in lines[2 : lines.index("")]]


def test_a_label_map_model_is_scored_by_its_classes_not_by_isic_rules(
    label_map_checkpoint, label_map_root, tiny_checkpoint, synthetic_root, tmp_path
):
    options = {"progress": False, "precision": "fp32"}
    summary = api.evaluate(
        checkpoint=label_map_checkpoint, data=label_map_root, out=tmp_path / "labels", **options
    )
    text = format_summary(summary)
    assert "Thresholded Jaccard" not in text and "AUC" not in text
    assert text.splitlines()[0].startswith("metric (mean over the 2 foreground classes)")
    assert table(summary)[:2] == ["Dice (mean over images)", "Dice (median)"]
    assert [line.split()[0] for line in text.splitlines() if line.startswith(("disc", "bar"))] == [
        "disc",
        "bar",
    ]
    binary = api.evaluate(
        checkpoint=tiny_checkpoint, data=synthetic_root, out=tmp_path / "binary", **options
    )
    rows = format_summary(binary).splitlines()
    assert rows[0].startswith("metric ") and "foreground classes" not in rows[0]
    assert any(row.startswith("Thresholded Jaccard (ISIC 2018") for row in rows)
    assert any(row.startswith("Pixel AUC") for row in rows)


# --- the docs ---------------------------------------------------------------------------------


def commands(page: Path, name: str) -> list[str]:
    """The command lines of ``page`` that run ``medseg NAME``, in order."""
    return [
        line.strip()
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith(f"medseg {name} ")
    ]


def test_the_first_training_command_a_new_user_meets_runs_offline():
    # The README and the command-line page, where a first command is copied from: without
    # --no-pretrained it downloads ImageNet weights, which fails offline.
    for page in (REPO / "README.md", REPO / "docs" / "cli.md"):
        first = commands(page, "train")[0]
        assert "--no-pretrained" in first, f"{page.name}: {first}"


def test_the_docs_name_the_network_variant_and_the_preset_apart():
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    assert "seed variant" not in text
    assert "`--variant seed`" in (REPO / "docs" / "model.md").read_text(encoding="utf-8")


def test_the_docs_say_what_onnx_masks_equal():
    export = " ".join((REPO / "docs" / "export.md").read_text(encoding="utf-8").split())
    assert "The float32 ONNX graph gives PyTorch's float32 masks (`--precision fp32`)" in export
    assert "For masks identical to an ONNX export's, predict with `--precision fp32`" in export
