"""Shipping a model: safetensors folders, ONNX (fp32 and int8), the model card, the refusals."""

import hashlib
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medseg
from medseg import api
from medseg.cli import main
from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.data.io import read_image
from medseg.data.transforms import normalisation
from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from medseg.model import DeepLabV3Plus
from medseg.prediction.predictor import Predictor, resolve_tta

MULTI_CLASS = {
    "model.backbone": "resnet18",
    "model.pretrained": False,
    "data.image_size": 64,
    "data.labels": ["background", "a", "b"],
    "model.num_classes": 3,
    "data.channels": 1,
    "model.in_channels": 1,
    "data.augment": "anatomy",
}


@pytest.fixture(scope="module")
def multiclass_checkpoint(tmp_path_factory):
    """An untrained 3-class grayscale resnet18 checkpoint for 64×64 inputs."""
    config = build_config(overrides=MULTI_CLASS)
    torch.manual_seed(1)
    model = DeepLabV3Plus.from_config(config.model)
    path = tmp_path_factory.mktemp("multiclass-checkpoint") / "best.pt"
    state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    save_checkpoint(path, state)
    return path


@pytest.fixture(params=["binary", "multiclass"])
def checkpoint(request, tiny_checkpoint, multiclass_checkpoint):
    return tiny_checkpoint if request.param == "binary" else multiclass_checkpoint


def images_for(predictor: Predictor) -> list[np.ndarray]:
    """Smooth random images of several sizes (one smaller, one larger than the network's)."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in [(50, 70), (64, 64), (97, 120)]:
        coarse = rng.integers(0, 256, (6, 6, predictor.config.data.channels), dtype=np.uint8)
        picture = Image.fromarray(coarse.squeeze(-1) if coarse.shape[-1] == 1 else coarse)
        images.append(np.asarray(picture.resize((width, height), Image.BILINEAR)))
    return images


def dice_per_class(first: np.ndarray, second: np.ndarray) -> float:
    """The smallest Dice over the values in either mask (a bool mask: its foreground);
    1 where both masks are empty."""
    values = (
        [True] if first.dtype == bool else sorted(set(np.unique(first)) | set(np.unique(second)))
    )
    scores = []
    for value in values:
        a, b = first == value, second == value
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2 * (a & b).sum() / total)
    return float(min(scores))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- safetensors -----------------------------------------------------------------------------


def test_safetensors_round_trip_gives_identical_logits_and_masks(checkpoint, tmp_path):
    out = tmp_path / "pretrained"
    result = api.export(checkpoint=checkpoint, out=out, format="safetensors")
    assert sorted(result["files"]) == sorted(path.name for path in out.iterdir())
    assert {"model.safetensors", "config.json", "README.md"} == set(result["files"])
    original, config = model_from_checkpoint(load_checkpoint(checkpoint))
    written = json.loads((out / "config.json").read_text())
    assert written["format"] == "medseg-pretrained"
    assert written["source_checkpoint_sha256"] == sha256(checkpoint)
    assert {key: written[key] for key in ("data", "model", "train")} == config.to_dict()

    loaded = medseg.load_pretrained(out)
    batch = torch.randn(2, config.data.channels, 64, 80)
    with torch.no_grad():
        assert torch.equal(loaded(batch), original.eval()(batch))
    for tta in ("none", "auto"):
        from_checkpoint = Predictor.from_checkpoint(checkpoint, device="cpu", tta=tta)
        from_folder = Predictor.from_pretrained(out, device="cpu", tta=tta)
        assert from_folder.tta == from_checkpoint.tta and from_folder.config == config
        images = images_for(from_checkpoint)
        for expected, got in zip(
            from_checkpoint.probabilities(images), from_folder.probabilities(images), strict=True
        ):
            assert np.array_equal(expected, got)
        for expected, got in zip(
            from_checkpoint.masks(images), from_folder.masks(images), strict=True
        ):
            assert np.array_equal(expected, got)


def test_a_pretrained_folder_loads_without_unpickling_anything(
    tiny_checkpoint, tmp_path, monkeypatch
):
    out = tmp_path / "pretrained"
    api.export(checkpoint=tiny_checkpoint, out=out)

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained folder was unpickled")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    predictor = Predictor.from_pretrained(out, device="cpu", tta="none")
    assert predictor.masks(images_for(predictor))[0].dtype == bool


def test_model_save_pretrained_with_and_without_the_run_config(multiclass_checkpoint, tmp_path):
    model, config = model_from_checkpoint(load_checkpoint(multiclass_checkpoint))
    medseg.save_pretrained(model, tmp_path / "full", config=config)
    assert Predictor.from_pretrained(tmp_path / "full", device="cpu").config == config

    medseg.save_pretrained(model, tmp_path / "bare")  # the model's arguments alone
    bare = medseg.load_pretrained(tmp_path / "bare")
    batch = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(bare(batch), model.eval()(batch))
    with pytest.raises(MedsegError, match="no input size"):
        Predictor.from_pretrained(tmp_path / "bare")
    with pytest.raises(MedsegError, match="already holds an exported model"):
        medseg.save_pretrained(model, tmp_path / "bare")


def test_a_pretrained_folder_keeps_the_aspp_rates_and_decoder_the_model_was_built_with(tmp_path):
    model = DeepLabV3Plus(
        backbone="resnet18", aspp_rates=(3, 6, 9), decoder_stride=2, pooling_window=32
    ).eval()
    medseg.save_pretrained(model, tmp_path / "rates")
    loaded = medseg.load_pretrained(tmp_path / "rates")
    assert loaded.aspp.rates == (3, 6, 9) and loaded.decoder.fine is not None
    assert loaded.aspp.branches[-1].window == 2
    batch = torch.randn(1, 3, 64, 64)  # larger than the window: the windowed average
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


def test_predict_evaluate_and_visualize_take_a_pretrained_folder(
    tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "pretrained"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    test = synthetic_root / "test"
    for checkpoint, masks in [(tiny_checkpoint, "from-pt"), (out, "from-folder")]:
        argv = [
            "predict",
            "--checkpoint",
            checkpoint,
            "-i",
            test / "images",
            "-o",
            tmp_path / masks,
        ]
        assert main([str(arg) for arg in [*argv, "--quiet"]]) == 0
    for mask in sorted((tmp_path / "from-pt").glob("*_segmentation.png")):
        expected = np.asarray(Image.open(mask))
        assert np.array_equal(
            expected, np.asarray(Image.open(tmp_path / "from-folder" / mask.name))
        )
    argv = ["evaluate", "--checkpoint", out, "--data", test, "--out", tmp_path / "eval", "--quiet"]
    assert main([str(arg) for arg in argv]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["images"] == 4
    argv = ["visualize", "--checkpoint", out, "--data", test, "--out", tmp_path / "figures"]
    assert main([str(arg) for arg in [*argv, "--num-samples", "2"]]) == 0
    assert len(list((tmp_path / "figures").glob("*.png"))) == 2


# --- ONNX ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_exports(tiny_checkpoint, multiclass_checkpoint, tmp_path_factory):
    """{"binary": folder, "multiclass": folder}, each exported to fp32 ONNX once."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    folders = {}
    for name, checkpoint in [("binary", tiny_checkpoint), ("multiclass", multiclass_checkpoint)]:
        folders[name] = tmp_path_factory.mktemp(f"onnx-{name}") / "export"
        api.export(checkpoint=checkpoint, out=folders[name], format="onnx")
    return folders


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
@pytest.mark.parametrize("tta", ["none", "d4", "flip-scales"])
def test_onnx_masks_equal_the_pytorch_masks(
    kind, tta, onnx_exports, tiny_checkpoint, multiclass_checkpoint
):
    checkpoint = tiny_checkpoint if kind == "binary" else multiclass_checkpoint
    torch_predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32", tta=tta)
    for source in (onnx_exports[kind], onnx_exports[kind] / "model.onnx"):
        onnx_predictor = Predictor.from_checkpoint(source, tta=tta)
        assert not isinstance(onnx_predictor.network, torch.nn.Module)
        images = images_for(torch_predictor)
        expected = torch_predictor.probabilities(images)
        got = onnx_predictor.probabilities(images)
        for image_expected, image_got in zip(expected, got, strict=True):
            np.testing.assert_allclose(image_got, image_expected, atol=1e-4)
            first, second = (
                torch_predictor.to_mask(image_expected),
                onnx_predictor.to_mask(image_got),
            )
            assert dice_per_class(first, second) >= 0.999


def test_the_onnx_graph_takes_any_batch_height_and_width(onnx_exports):
    import onnx
    import onnxruntime

    for kind, (channels, classes) in {"binary": (3, 1), "multiclass": (1, 3)}.items():
        path = onnx_exports[kind] / "model.onnx"
        graph = onnx.load(str(path))
        assert max(entry.version for entry in graph.opset_import if entry.domain == "") >= 17
        (graph_input,) = graph.graph.input
        dims = graph_input.type.tensor_type.shape.dim
        assert [dim.dim_param != "" for dim in dims] == [True, False, True, True]
        assert dims[1].dim_value == channels
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).normal(size=(3, channels, 40, 72)).astype(np.float32)
        (logits,) = session.run(None, {"image": batch})
        assert logits.shape == (3, classes, 40, 72)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_medseg_json_says_how_to_feed_the_graph(
    kind, onnx_exports, tiny_checkpoint, multiclass_checkpoint
):
    checkpoint = tiny_checkpoint if kind == "binary" else multiclass_checkpoint
    _, config = model_from_checkpoint(load_checkpoint(checkpoint))
    meta = json.loads((onnx_exports[kind] / "medseg.json").read_text())
    mean, std = normalisation(config.data.channels)
    assert meta["input"]["size"] == [64, 64] and meta["input"]["channels"] == config.data.channels
    assert meta["input"]["mean"] == list(mean) and meta["input"]["std"] == list(std)
    assert meta["input"]["colour_constancy"] is None  # off by default: nothing for a runtime to do
    assert meta["tta"] == resolve_tta("auto", config) == ("flip" if kind == "binary" else "none")
    assert meta["output"]["threshold"] == (0.5 if kind == "binary" else None)
    assert meta["output"]["labels"] == (
        ["background", "foreground"] if kind == "binary" else ["background", "a", "b"]
    )
    assert meta["source_checkpoint_sha256"] == sha256(checkpoint)
    assert meta["files"]["model.onnx"]["sha256"] == sha256(onnx_exports[kind] / "model.onnx")
    assert meta["config"] == config.to_dict() and meta["quantization"] is None
    assert meta["verified_max_logit_difference"] < 1e-3


def test_predict_and_evaluate_run_an_onnx_export(
    onnx_exports, tiny_checkpoint, synthetic_root, tmp_path
):
    test = synthetic_root / "test"
    sources = [(tiny_checkpoint, "torch"), (onnx_exports["binary"] / "model.onnx", "onnx")]
    for checkpoint, masks in sources:
        argv = [
            "predict",
            "--checkpoint",
            checkpoint,
            "-i",
            test / "images",
            "-o",
            tmp_path / masks,
        ]
        assert main([str(arg) for arg in [*argv, "--quiet", "--tta", "none"]]) == 0
    for mask in sorted((tmp_path / "torch").glob("*_segmentation.png")):
        expected = np.asarray(Image.open(mask)) > 0
        got = np.asarray(Image.open(tmp_path / "onnx" / mask.name)) > 0
        assert dice_per_class(expected, got) >= 0.999
    record = json.loads((tmp_path / "onnx" / ".medseg-predict.json").read_text())
    assert record["checkpoint_sha256"] == sha256(onnx_exports["binary"] / "model.onnx")
    argv = ["evaluate", "--checkpoint", onnx_exports["binary"], "--data", test]
    assert main([str(arg) for arg in [*argv, "--out", tmp_path / "eval", "--quiet"]]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["images"] == 4


def test_an_onnx_model_is_refused_without_its_medseg_json_or_when_they_disagree(
    onnx_exports, tmp_path
):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(onnx_exports["binary"] / "model.onnx", lone / "model.onnx")
    with pytest.raises(MedsegError, match="has no medseg.json beside it"):
        Predictor.from_checkpoint(lone / "model.onnx")
    with pytest.raises(MedsegError, match="has no medseg.json beside it"):
        Predictor.from_checkpoint(lone)

    mixed = tmp_path / "mixed"
    shutil.copytree(onnx_exports["multiclass"], mixed)
    meta = json.loads((mixed / "medseg.json").read_text())
    meta["config"]["data"]["labels"] = []  # describes a binary model
    meta["config"]["model"]["num_classes"] = 1
    (mixed / "medseg.json").write_text(json.dumps(meta))
    with pytest.raises(MedsegError, match="has 3 output channels but medseg.json describes 1"):
        Predictor.from_checkpoint(mixed)

    shutil.copyfile(onnx_exports["binary"] / "medseg.json", mixed / "medseg.json")
    with pytest.raises(MedsegError, match="has 1 input channels but medseg.json describes 3"):
        Predictor.from_checkpoint(mixed)
    with pytest.raises(MedsegError, match="runs on the CPU"):
        Predictor.from_checkpoint(onnx_exports["binary"], device="cuda")


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_int8_quantization_runs_and_stays_close_to_float(
    kind, tiny_checkpoint, multiclass_checkpoint, synthetic_root, label_map_root, tmp_path
):
    pytest.importorskip("onnxruntime")
    import onnx

    checkpoint, data = (
        (tiny_checkpoint, synthetic_root)
        if kind == "binary"
        else (multiclass_checkpoint, label_map_root)
    )
    out = tmp_path / "int8"
    argv = ["export", "--checkpoint", checkpoint, "--format", "onnx", "--out", out]
    argv += ["--quantize", "int8", "--calibration", data]  # a data root: its train/images
    assert main([str(arg) for arg in argv]) == 0
    assert sorted(path.name for path in out.iterdir()) == [
        "README.md",
        "medseg.json",
        "model-fp32.onnx",
        "model.onnx",
    ]
    meta = json.loads((out / "medseg.json").read_text())
    assert meta["files"]["model.onnx"]["precision"] == "int8"
    assert meta["files"]["model-fp32.onnx"]["precision"] == "fp32"
    assert meta["quantization"]["calibration_images"] == (12 if kind == "binary" else 8)
    operators = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators

    int8 = Predictor.from_checkpoint(out, tta="none")
    fp32 = Predictor.from_checkpoint(out / "model-fp32.onnx", tta="none")
    channels = int8.config.data.channels
    images = [
        read_image(path, channels=channels) for path in sorted((data / "test" / "images").iterdir())
    ]
    batch = int8.preprocess(images)
    logits_int8, logits_fp32 = int8.network(batch).numpy(), fp32.network(batch).numpy()
    # An untrained network's logits all sit near one value, so its masks flip on any rounding
    # and its probabilities hardly move: int8 is judged by whether its logits still move with
    # float32's, pixel by pixel, on images it was not calibrated on.
    correlation = np.corrcoef(logits_int8.ravel(), logits_fp32.ravel())[0, 1]
    assert correlation >= 0.95, correlation
    probability_error = np.mean(
        np.abs(
            np.concatenate(int8.probabilities(images)) - np.concatenate(fp32.probabilities(images))
        )
    )
    assert probability_error <= 0.05, probability_error


# --- refusals --------------------------------------------------------------------------------


def run_export(capsys, *argv) -> tuple[int, str]:
    status = main(["export", *[str(arg) for arg in argv]])
    return status, capsys.readouterr().err.strip()


def test_export_refuses_a_missing_checkpoint_and_an_unknown_format(
    tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "out"
    status, error = run_export(capsys, "--checkpoint", tmp_path / "missing.pt", "--out", out)
    assert status == 2 and "checkpoint not found" in error and len(error.splitlines()) == 1
    status, error = run_export(
        capsys, "--checkpoint", tiny_checkpoint, "--format", "tflite", "--out", out
    )
    assert status == 2 and "invalid choice: 'tflite'" in error
    with pytest.raises(
        MedsegError, match="unknown export format 'tflite'; choose one of safetensors, onnx"
    ):
        api.export(checkpoint=tiny_checkpoint, out=out, format="tflite")
    with pytest.raises(MedsegError, match="needs --calibration DIR"):
        api.export(checkpoint=tiny_checkpoint, out=out, format="onnx", quantize="int8")
    with pytest.raises(MedsegError, match="applies to --format onnx"):
        api.export(checkpoint=tiny_checkpoint, out=out, quantize="int8", calibration=tmp_path)
    assert not out.exists()


def test_export_refuses_a_folder_holding_a_model_unless_overwrite(
    tiny_checkpoint, multiclass_checkpoint, tmp_path, capsys
):
    out = tmp_path / "out"
    assert run_export(capsys, "--checkpoint", tiny_checkpoint, "--out", out)[0] == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    status, error = run_export(capsys, "--checkpoint", multiclass_checkpoint, "--out", out)
    assert status == 2 and "already holds an exported model" in error and "--overwrite" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    argv = ("--checkpoint", multiclass_checkpoint, "--out", out, "--overwrite")
    assert run_export(capsys, *argv)[0] == 0
    assert json.loads((out / "config.json").read_text())["model"]["num_classes"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # not an export file: left alone
    hidden = [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert hidden == []  # no staging folder left behind


def test_a_failed_export_leaves_nothing_half_written(tiny_checkpoint, tmp_path, monkeypatch):
    from medseg.formats import safetensors as pretrained

    out = tmp_path / "out"
    api.export(checkpoint=tiny_checkpoint, out=out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def fail_half_way(weights, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail_half_way)
    for target, overwrite in [(tmp_path / "new", False), (out, True)]:
        with pytest.raises(MedsegError, match="No space left on device"):
            api.export(checkpoint=tiny_checkpoint, out=target, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert pretrained.is_pretrained(out)


@pytest.mark.parametrize(
    ("module", "format", "install"),
    [("onnxruntime", "onnx", "medseg[onnx]"), ("safetensors.torch", "safetensors", "safetensors")],
)
def test_a_missing_package_is_named_with_what_to_install(
    module, format, install, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    status, error = run_export(
        capsys, "--checkpoint", tiny_checkpoint, "--format", format, "--out", tmp_path / "out"
    )
    assert status == 2 and f"pip install '{install}'" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_running_an_onnx_export_without_onnxruntime_names_the_extra(onnx_exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MedsegError, match=r"pip install 'medseg\[onnx\]'"):
        Predictor.from_checkpoint(onnx_exports["binary"])


# --- the model card --------------------------------------------------------------------------


def test_the_model_card_comes_from_the_run_folder(label_map_root, tmp_path):
    run = tmp_path / "run"
    overrides = {"model.backbone": "resnet18", "model.pretrained": False}
    overrides |= {"data.image_size": 64, "train.epochs": 1, "train.batch_size": 4}
    api.train(data=label_map_root, out=run, overrides=overrides, progress=False)
    summary = api.evaluate(
        checkpoint=run, data=label_map_root / "test", out=run / "evaluation-test", progress=False
    )
    api.export(checkpoint=run, out=tmp_path / "shipped")

    card = (tmp_path / "shipped" / "README.md").read_text()
    header, row = (run / "metrics.csv").read_text().splitlines()
    val_dice = float(dict(zip(header.split(","), row.split(","), strict=True))["val_dice"])
    assert "3 classes (background, disc, bar)" in card
    assert "0 background, 1 disc, 2 bar" in card
    assert f"best Dice {val_dice:.4f} at epoch 1 of 1" in card
    assert f"mean Dice {summary['dice']:.4f}" in card and "2 images of" in card
    assert f"`{label_map_root.resolve()}`, 8 images in its train/images" in card
    assert "not a medical device" in card and "check it on your own labelled images" in card
    assert "grayscale images (uint8), resized to 64×64" in card
    assert "logits at stride 4" in card  # resized images: the paper's decoder
    assert "1 epoch from scratch, batch 4" in card
