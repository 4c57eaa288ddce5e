"""Ensembles: a k-fold run's folds (or chosen ones) and several checkpoints averaged as
probabilities, in every command, exported as safetensors folders or one ONNX graph."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.cli import main
from medseg.commands.evaluate import score_pair
from medseg.config import build_config
from medseg.data.io import read_image, read_target
from medseg.data.synthetic import make_synthetic_dataset
from medseg.engine.checkpoint import save_checkpoint
from medseg.model import DeepLabV3Plus
from medseg.model.ensemble import ProbabilityAverage
from medseg.prediction import ensemble
from medseg.prediction.predictor import EnsemblePredictor, Predictor

FP32 = {"precision": "fp32", "tta": "flip"}


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    """A 2-fold run of tiny resnet18 models (1 epoch each, different seeds) on synthetic
    64×64 data, laid out as ``medseg train --folds 2`` writes it: splits.json, fold_0/, fold_1/."""
    root = tmp_path_factory.mktemp("kfold")
    data = make_synthetic_dataset(root / "data", n_train=12, n_test=4, size=64, seed=0)
    run = root / "cv"
    ids = sorted(path.stem for path in (data / "train" / "images").iterdir())
    flags = [
        *("--no-pretrained", "--backbone", "resnet18", "--image-size", "64"),
        *("--batch-size", "4", "--epochs", "1", "--quiet"),
    ]
    for fold in range(2):
        status = main(["train", "--data", str(data), "--out", str(run / f"fold_{fold}"), *flags,
                       "--seed", str(fold)])  # fmt: skip
        assert status == 0
    splits = [{"train": ids[6:], "val": ids[:6]}, {"train": ids[:6], "val": ids[6:]}]
    (run / "splits.json").write_text(json.dumps(splits))
    images = [read_image(path) for path in sorted((data / "test" / "images").iterdir())]
    return run, data, images


def fold_probabilities(run, images, fold, **options):
    return Predictor.from_checkpoint(run / f"fold_{fold}", **(options or FP32)).probabilities(
        images
    )


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_kfold_run_predicts_the_mean_of_its_folds_probabilities(kfold, monkeypatch):
    run, _, images = kfold
    first, second = (fold_probabilities(run, images, fold) for fold in (0, 1))
    # The folds differ, so an ensemble that ran one fold twice would fail below.
    assert max(np.abs(a - b).max() for a, b in zip(first, second, strict=True)) > 1e-3
    kept = Predictor.from_checkpoint(run, **FP32)
    monkeypatch.setattr(ensemble, "MEMORY_BUDGET", 0)  # one member in memory at a time
    streamed = Predictor.from_checkpoint(run, **FP32)
    assert isinstance(kept, EnsemblePredictor) and kept.kept_loaded
    assert not streamed.kept_loaded and all(m.predictor is None for m in streamed.members)
    for predictor in (kept, streamed):
        assert predictor.tta == "flip" and predictor.threshold == 0.5
        averaged = predictor.probabilities(images)
        for probability, a, b, image in zip(averaged, first, second, images, strict=True):
            assert probability.shape == image.shape[:2] and probability.dtype == np.float32
            np.testing.assert_allclose(probability, (a + b) / 2, rtol=0, atol=1e-6)
        masks = predictor.masks(images)
        for mask, a, b in zip(masks, first, second, strict=True):
            np.testing.assert_array_equal(mask, (a + b) / 2 > 0.5)


def test_folds_choose_the_members_and_a_fold_that_is_not_there_is_refused(kfold, tmp_path, capsys):
    run, data, images = kfold
    only = Predictor.from_checkpoint(run, folds=[1], **FP32)
    for probability, expected in zip(
        only.probabilities(images), fold_probabilities(run, images, 1), strict=True
    ):
        np.testing.assert_array_equal(probability, expected)
    assert [member.source.path.name for member in only.members] == ["fold_1"]

    out = tmp_path / "masks"
    command = ["predict", "--checkpoint", str(run), "-i", str(data / "test"), "-o", str(out)]
    assert main([*command, "--folds", "0,2", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "has folds 0, 1; there is no fold 2" in error
    assert main([*command, "--folds", "1,1", "--quiet"]) == 2
    assert "fold 1 is chosen twice" in capsys.readouterr().err
    fold = str(run / "fold_0")
    assert main(["predict", "--checkpoint", fold, "--folds", "0", "-i", str(data / "test"),
                 "-o", str(out), "--quiet"]) == 2  # fmt: skip
    assert "is not one; leave --folds out" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.png"))

    # A fold still training (no best.pt yet) is named, with the finished ones to choose.
    partial = tmp_path / "partial"
    for fold in (0, 1):
        (partial / f"fold_{fold}" / "checkpoints").mkdir(parents=True)
        shutil.copyfile(run / f"fold_{fold}/checkpoints/best.pt",
                        partial / f"fold_{fold}/checkpoints/best.pt")  # fmt: skip
    (partial / "fold_2").mkdir()
    (partial / "splits.json").write_text(json.dumps([{"train": [], "val": []}] * 3))
    assert main(["evaluate", "--checkpoint", str(partial), "--data", str(data), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "fold 2 of its 3 folds has no checkpoints/best.pt yet" in error
    assert "--folds 0,1" in error
    chosen = Predictor.from_checkpoint(partial, folds=[0, 1], **FP32)
    assert len(chosen.members) == 2


@pytest.fixture
def other_tasks(tmp_path):
    """Untrained checkpoints of other tasks: gray input, three classes, another input size."""
    paths = {}
    for name, overrides in {
        "gray": {"data.channels": 1, "model.in_channels": 1},
        "three-classes": {"data.labels": ["background", "a", "b"], "model.num_classes": 3},
        "larger": {"data.image_size": 96},
    }.items():
        config = build_config(
            overrides={"model.backbone": "resnet18", "model.pretrained": False,
                       "data.image_size": 64, **overrides}
        )  # fmt: skip
        model = DeepLabV3Plus.from_config(config.model)
        paths[name] = tmp_path / f"{name}.pt"
        state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1}
        save_checkpoint(paths[name], {**state, "metrics": {}})
    return paths


def test_checkpoints_of_other_tasks_are_refused_in_one_line(kfold, other_tasks, tmp_path, capsys):
    run, data, _ = kfold
    expected = {
        "gray": "input channels differ (3 against 1)",
        "three-classes": "classes differ (binary masks against 3 classes: background, a, b)",
        "larger": "inputs differ (resized to 64×64 against resized to 96×96)",
    }
    out = tmp_path / "masks"
    for name, difference in expected.items():
        status = main(["predict", "--checkpoint", str(run), "--checkpoint",
                       str(other_tasks[name]), "-i", str(data / "test"), "-o", str(out),
                       "--quiet"])  # fmt: skip
        error = capsys.readouterr().err.strip()
        assert status == 2 and "\n" not in error, error
        assert "cannot be ensembled" in error and difference in error, error
        assert str(other_tasks[name]) in error
    assert not out.exists() or not list(out.glob("*.png"))
    # The same model twice would count double: refused.
    fold = str(run / "fold_1")
    assert main(["predict", "--checkpoint", str(run), "--checkpoint", fold, "-i",
                 str(data / "test"), "-o", str(out), "--quiet"]) == 2  # fmt: skip
    assert "is in the ensemble twice" in capsys.readouterr().err


def test_predict_evaluate_and_visualize_take_two_checkpoints(kfold, tmp_path, capsys):
    run, data, images = kfold
    first, second = (fold_probabilities(run, images, fold) for fold in (0, 1))
    members = ["--checkpoint", str(run / "fold_0"), "--checkpoint", str(run / "fold_1")]
    out = tmp_path / "masks"
    assert main(["predict", *members, "-i", str(data / "test"), "-o", str(out),
                 "--probabilities", "--precision", "fp32", "--tta", "flip", "--quiet"]) == 0  # fmt: skip
    paths = sorted((data / "test" / "images").iterdir())
    for path, a, b in zip(paths, first, second, strict=True):
        saved = np.asarray(Image.open(out / f"{path.stem}_probability.png"))
        np.testing.assert_array_equal(saved, np.round((a + b) / 2 * 255).astype(np.uint8))
        mask = np.asarray(Image.open(out / f"{path.stem}_segmentation.png"))
        np.testing.assert_array_equal(mask, ((a + b) / 2 > 0.5) * 255)
    record = json.loads((out / ".medseg-predict.json").read_text())
    assert record["checkpoint_sha256"] == [
        sha256(run / f"fold_{fold}/checkpoints/best.pt") for fold in (0, 1)
    ]
    assert record["ensemble_shares"] == [0.5, 0.5] and record["member_tta"] == ["flip", "flip"]
    # The same folder predicted by one fold alone is another model's: refused.
    assert main(["predict", "--checkpoint", str(run / "fold_0"), "-i", str(data / "test"),
                 "-o", str(out), "--quiet"]) == 2  # fmt: skip
    assert "another checkpoint" in capsys.readouterr().err

    assert main(["evaluate", *members, "--data", str(data), "--precision", "fp32",
                 "--tta", "flip", "--quiet"]) == 0  # fmt: skip
    (folder,) = (run / "fold_0").glob("evaluation-*-ensemble-of-2")  # beside the first
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["checkpoint"] == f"{run / 'fold_0'} + {run / 'fold_1'}"
    truths = [read_target(data / "test/masks" / f"{p.stem}_segmentation.png", ()) for p in paths]
    dice = [score_pair("x", (a + b) / 2 > 0.5, t)["dice"]
            for a, b, t in zip(first, second, truths, strict=True)]  # fmt: skip
    assert summary["dice"] == pytest.approx(np.mean(dice), abs=1e-6)

    figures = tmp_path / "figures"
    assert main(["visualize", "--checkpoint", str(run), "--folds", "1", "--data", str(data),
                 "-o", str(figures), "--num-samples", "2"]) == 0  # fmt: skip
    assert len(list(figures.glob("*_prediction.png"))) == 2


def test_probability_average_returns_the_logits_of_the_mean_probability():
    torch.manual_seed(0)
    for classes in (1, 3):
        members = [torch.nn.Conv2d(2, classes, 3, padding=1) for _ in range(3)]
        shares = [0.5, 0.3, 0.2]
        image = torch.randn(2, 2, 9, 7)
        with torch.no_grad():
            output = ProbabilityAverage(members, shares)(image)
            if classes == 1:
                found, each = output.sigmoid(), [member(image).sigmoid() for member in members]
            else:
                found, each = output.softmax(1), [member(image).softmax(1) for member in members]
        expected = sum(share * p for share, p in zip(shares, each, strict=True))
        assert found.shape == (2, classes, 9, 7)
        torch.testing.assert_close(found, expected, rtol=0, atol=2e-6)


def test_the_safetensors_export_of_a_kfold_run_holds_every_fold(kfold, tmp_path):
    run, _, images = kfold
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    described = json.loads((out / "ensemble.json").read_text())
    assert [(m["folder"], m["fold"], m["share"]) for m in described["members"]] == [
        ("fold_0", 0, 0.5),
        ("fold_1", 1, 0.5),
    ]
    assert described["members"][1]["sha256"] == sha256(run / "fold_1/checkpoints/best.pt")
    card = (out / "README.md").read_text()
    assert "Ensemble of 2 folds (folds 0, 1)" in card and "fold 1 in `fold_1/`" in card
    exported = Predictor.from_pretrained(out, **FP32)
    expected = Predictor.from_checkpoint(run, **FP32).probabilities(images)
    for found, wanted in zip(exported.probabilities(images), expected, strict=True):
        np.testing.assert_array_equal(found, wanted)  # the same weights, bit for bit
    only = Predictor.from_checkpoint(out, folds=[1], **FP32).probabilities(images)
    for found, wanted in zip(only, fold_probabilities(run, images, 1), strict=True):
        np.testing.assert_array_equal(found, wanted)


def test_the_onnx_ensemble_matches_the_pytorch_ensemble(kfold, tmp_path):
    pytest.importorskip("onnxruntime")
    run, _, images = kfold
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((out / "medseg.json").read_text())
    assert [member["fold"] for member in meta["ensemble"]] == [0, 1]
    assert meta["ensemble"][0]["sha256"] == sha256(run / "fold_0/checkpoints/best.pt")
    assert meta["verified_max_probability_difference"] < 1e-4
    assert "Ensemble of 2 folds (folds 0, 1)" in (out / "README.md").read_text()
    graph = Predictor.from_pretrained(out, **FP32)  # one graph: a plain Predictor
    assert not isinstance(graph, EnsemblePredictor)
    expected = Predictor.from_checkpoint(run, **FP32).probabilities(images)
    for found, wanted in zip(graph.probabilities(images), expected, strict=True):
        np.testing.assert_allclose(found, wanted, rtol=0, atol=1e-4)


def test_serve_holds_an_ensemble_as_one_model(kfold):
    from medseg.cli import build_parser
    from medseg.commands.serve.model import ServedModel
    from medseg.formats.source import resolve_source

    run, data, images = kfold
    args = build_parser().parse_args(["serve", "--checkpoint", str(run), "--folds", "1"])
    assert args.checkpoint == [str(run)] and args.folds == [1]
    served = ServedModel(resolve_source(run, folds=[1]), precision="fp32")
    assert served.describe()["kind"] == "kfold" and served.checkpoint == f"{run} (folds 1)"
    image = sorted((data / "test" / "images").iterdir())[0]
    segmentation = served.segment(image, tta="flip")
    np.testing.assert_array_equal(
        segmentation.probability, fold_probabilities(run, images[:1], 1)[0]
    )
    mask = served.mask(segmentation, threshold=0.3)  # a request's own threshold
    np.testing.assert_array_equal(mask, segmentation.probability > 0.3)


def test_a_multi_class_ensemble_averages_softmax_and_exports_as_one_graph(tmp_path):
    overrides = {
        "model.backbone": "resnet18", "model.pretrained": False, "data.image_size": 64,
        "data.labels": ["background", "a", "b"], "model.num_classes": 3, "data.channels": 1,
        "model.in_channels": 1, "data.augment": "anatomy",
    }  # fmt: skip
    config = build_config(overrides=overrides)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = DeepLabV3Plus.from_config(config.model)
        paths.append(tmp_path / f"model-{seed}.pt")
        state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1}
        save_checkpoint(paths[-1], {**state, "metrics": {}})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70), dtype=np.uint8), rng.integers(0, 256, (64, 64, 1))]
    images = [image.astype(np.uint8) for image in images]
    options = {"precision": "fp32", "tta": "auto"}  # "auto": none for the anatomy recipe
    each = [Predictor.from_checkpoint(path, **options).probabilities(images) for path in paths]
    ensemble_predictor = Predictor.from_checkpoint([str(path) for path in paths], **options)
    assert ensemble_predictor.tta == "none" and ensemble_predictor.threshold is None
    averaged = ensemble_predictor.probabilities(images)
    for found, first, second in zip(averaged, *each, strict=True):
        assert found.shape == (3, *first.shape[1:])
        np.testing.assert_allclose(found, (first + second) / 2, rtol=0, atol=1e-6)
        np.testing.assert_allclose(found.sum(0), 1, atol=1e-5)
    for mask, found in zip(ensemble_predictor.masks(images), averaged, strict=True):
        np.testing.assert_array_equal(mask, found.argmax(0))

    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    command = ["export", "--checkpoint", str(paths[0]), "--checkpoint", str(paths[1])]
    assert main([*command, "--format", "onnx", "--out", str(out)]) == 0
    described = json.loads((out / "medseg.json").read_text())["ensemble"]
    assert [member["share"] for member in described] == [0.5, 0.5]
    assert "Ensemble of 2 models" in (out / "README.md").read_text()
    graph = Predictor.from_pretrained(out, **options).probabilities(images)
    for found, wanted in zip(graph, averaged, strict=True):
        np.testing.assert_allclose(found, wanted, rtol=0, atol=1e-4)
