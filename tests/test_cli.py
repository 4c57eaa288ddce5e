"""End to end through the command line: train → evaluate → predict → visualize, and resume."""

import csv
import json

import numpy as np
import pytest
import yaml
from conftest import PRECISIONS
from PIL import Image

from medseg.cli import main
from medseg.engine import train as train_module


def _train(data, run, flags, *extra):
    return main(["train", "--data", str(data), "--out", str(run), *flags, *extra])


def _metrics_rows(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _mask_values(path):
    return set(np.unique(np.asarray(Image.open(path))).tolist())


def test_real_pairs_train_evaluate_predict_visualize(small_isic, tmp_path, capsys, tiny_flags):
    run = tmp_path / "run"
    assert _train(small_isic, run, tiny_flags, "--epochs", "1") == 0

    for name in (
        "config.yaml",
        "run.json",
        "metrics.csv",
        "curves.png",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    rows = _metrics_rows(run)
    assert len(rows) == 1
    assert list(rows[0])[0] == "epoch" and rows[0]["epoch"] == "1"
    assert 0.0 <= float(rows[0]["val_dice"]) <= 1.0

    evaluation = tmp_path / "evaluation"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--data",
                str(small_isic),
                "--out",
                str(evaluation),
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["images"] == 4  # test/ of the copied root
    assert 0.0 <= summary["dice"] <= 1.0 and 0.0 <= summary["iou"] <= summary["dice"] + 1e-9
    with open(evaluation / "per_image.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "Thresholded Jaccard" in capsys.readouterr().out

    masks = tmp_path / "masks"
    code = main(
        ["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input", str(small_isic / "test" / "images"),
         "--output", str(masks), "--probabilities", "--overlay", "--quiet"]
    )  # fmt: skip
    assert code == 0
    for image in sorted((small_isic / "test" / "images").iterdir()):
        mask = masks / f"{image.stem}_segmentation.png"
        assert Image.open(mask).size == Image.open(image).size  # original size, not 64×64
        assert _mask_values(mask) <= {0, 255}
        assert (masks / f"{image.stem}_probability.png").is_file()
        assert Image.open(masks / f"{image.stem}_overlay.png").size == Image.open(image).size

    figures = tmp_path / "figures"
    assert (
        main(
            [
                "visualize",
                "--checkpoint",
                str(run),
                "--data",
                str(small_isic / "test"),
                "--out",
                str(figures),
                "--num-samples",
                "2",
            ]
        )
        == 0
    )
    assert len(list(figures.glob("*.png"))) == 2


def test_synthetic_data_and_an_odd_sized_image(synthetic_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    assert _train(synthetic_root, run, tiny_flags, "--epochs", "1", "--preset", "seed") == 0
    odd = tmp_path / "odd" / "lesion.png"
    odd.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (250, 301, 3), dtype=np.uint8)).save(
        odd
    )

    out = tmp_path / "predictions"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run),
                "--input",
                str(odd),
                "--output",
                str(out),
                "--tta",
                "--postprocess",
                "--quiet",
            ]
        )
        == 0
    )
    mask = Image.open(out / "lesion_segmentation.png")
    assert mask.size == (301, 250)
    assert _mask_values(out / "lesion_segmentation.png") <= {0, 255}


def test_interrupted_training_resumes_after_the_last_finished_epoch(
    synthetic_root, tmp_path, monkeypatch, capsys, tiny_flags
):
    run = tmp_path / "run"
    real_epoch = train_module.train_one_epoch

    def interrupted_in_epoch_two(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted_in_epoch_two)
    assert _train(synthetic_root, run, tiny_flags, "--epochs", "3") == 130
    assert "resume" in capsys.readouterr().err
    assert [row["epoch"] for row in _metrics_rows(run)] == ["1"]

    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # data found from run.json
    assert [row["epoch"] for row in _metrics_rows(run)] == ["1", "2", "3"]


def test_train_needs_data(capsys):
    assert main(["train", "--epochs", "1"]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_offline_and_says_the_data_is_synthetic(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "test Dice" in out
    run = tmp_path / "demo" / "run"
    assert (run / "evaluation-test" / "summary.json").is_file()
    assert len(list((run / "figures").glob("*.png"))) == 6


def test_train_without_out_creates_a_dated_run_folder(
    synthetic_root, tmp_path, monkeypatch, tiny_flags
):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(synthetic_root), "--epochs", "1", *tiny_flags]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("train-")
    assert (run / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow  # compiling takes about half a minute on two cores
def test_predict_compile_gives_the_masks_of_the_uncompiled_network(
    tiny_checkpoint, synthetic_root, tmp_path, capsys
):
    source = synthetic_root / "test" / "images"
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        flags = ["--checkpoint", str(tiny_checkpoint), "--input", str(source), "--tta", "none"]
        assert main(["predict", *flags, "--output", str(tmp_path / name), "--quiet", *extra]) == 0
    assert "torch.compile failed" not in capsys.readouterr().err  # it really ran compiled
    masks = sorted((tmp_path / "eager").glob("*.png"))
    assert len(masks) == 4
    for eager in masks:
        compiled = tmp_path / "compiled" / eager.name
        agreement = np.mean(np.array(Image.open(eager)) == np.array(Image.open(compiled)))
        # Folding BatchNorm into the weights changes rounding: a few border pixels may flip.
        assert agreement > 0.99, f"{eager.name}: {agreement:.4f}"


@pytest.mark.parametrize("flag", ["--out", "--output", "-o"])
def test_every_command_names_its_output_folder_the_same_ways(tmp_path, tiny_checkpoint, flag):
    from medseg.cli import build_parser

    parser = build_parser()
    target = str(tmp_path / "out")
    images = str(tmp_path / "images")
    for argv in (
        ["train", "--data", images, flag, target],
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", images, flag, target],
        ["predict", "--checkpoint", str(tiny_checkpoint), "-i", images, flag, target],
        ["visualize", "--checkpoint", str(tiny_checkpoint), "--data", images, flag, target],
        ["demo", flag, target],
    ):
        assert parser.parse_args(argv).out == target, argv


def test_predict_with_short_flags_writes_masks(synthetic_root, tmp_path, tiny_checkpoint):
    out = tmp_path / "masks"
    argv = ["predict", "--checkpoint", tiny_checkpoint, "-i", synthetic_root / "test" / "images"]
    assert main([str(arg) for arg in [*argv, "-o", out, "--quiet", "--tta", "none"]]) == 0
    assert len(list(out.glob("*_segmentation.png"))) == 4


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_runs_in_each_precision_on_any_cpu(
    synthetic_root, tmp_path, tiny_flags, precision
):
    # bf16 is native on CPUs with AVX-512 BF16 or AMX and emulated by PyTorch elsewhere:
    # both paths train here, whichever CPU runs the tests.
    run = tmp_path / "run"
    assert _train(synthetic_root, run, tiny_flags, "--epochs", "1", "--precision", precision) == 0
    [row] = _metrics_rows(run)
    assert np.isfinite(float(row["train_loss"])) and np.isfinite(float(row["val_loss"]))
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == precision
