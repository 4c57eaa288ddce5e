"""Exports as they reach users: descriptions edited by hand are refused on load, every kind of
--checkpoint is taken where it can be used (and named where it cannot), and an export never
writes over the run it comes from."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import one_line_failure
from PIL import Image

from medseg import api
from medseg.cli import main
from medseg.config import build_config
from medseg.engine.checkpoint import save_checkpoint
from medseg.model import DeepLabV3Plus

THREE_CLASSES = {
    "model.backbone": "resnet18",
    "model.pretrained": False,
    "data.image_size": 64,
    "data.labels": ["background", "a", "b"],
    "model.num_classes": 3,
    "data.channels": 1,
    "model.in_channels": 1,
}


def contents(folder) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def safetensors_export(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("safetensors") / "export"
    api.export(checkpoint=tiny_checkpoint, out=folder)
    return folder


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """A 3-class grayscale model exported to ONNX."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    config = build_config(overrides=THREE_CLASSES)
    model = DeepLabV3Plus.from_config(config.model)
    checkpoint = tmp_path_factory.mktemp("three-classes") / "best.pt"
    save_checkpoint(checkpoint, {"config": config.to_dict(), "model": model.state_dict()})
    folder = tmp_path_factory.mktemp("onnx") / "export"
    api.export(checkpoint=checkpoint, out=folder, format="onnx")
    return folder


def predict_argv(checkpoint, images, out):
    return ["predict", "--checkpoint", checkpoint, "-i", images, "-o", out, "--quiet"]


# --- an export's description is checked when it is loaded ---------------------------------------


def edited(folder, tmp_path, name: str, change) -> object:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    values = json.loads((copy / name).read_text())
    change(values)
    (copy / name).write_text(json.dumps(values))
    return copy


def set_in(section: str, **values):
    return lambda config: config[section].update(values)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (set_in("data", image_size=1_000_000), "data.image_size=1000000 is impossible"),
        (set_in("data", channels=100_000), "data.channels=100000 is impossible"),
        (set_in("model", aspp_rates=[6, 100_000]), "each rate must be 1 to 512"),
        (
            lambda config: config["data"].update(labels=[f"c{i}" for i in range(300)]),
            "data.labels names 300 classes; at most 256",
        ),
    ],
)
def test_a_safetensors_export_with_impossible_sizes_is_refused_in_one_line(
    safetensors_export, synthetic_root, tmp_path, capsys, change, said
):
    folder = edited(safetensors_export, tmp_path, "config.json", change)
    argv = predict_argv(folder, synthetic_root / "test" / "images", tmp_path / "masks")
    one_line_failure(capsys, argv, expect=[said, folder / "config.json"])
    assert not (tmp_path / "masks").exists()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda meta: meta["output"]["labels"].append("c"), "output.labels is ["),
        (lambda meta: meta["output"]["shape"].__setitem__(1, 4), "output.shape is ['batch', 4,"),
        (lambda meta: meta["input"].update(channels=3), "input.channels is 3 but its config"),
        (lambda meta: meta["input"].update(size=[256, 256]), "input.size is [256, 256]"),
    ],
)
def test_an_onnx_export_whose_description_was_edited_is_refused(
    onnx_export, label_map_root, tmp_path, capsys, change, said
):
    folder = edited(onnx_export, tmp_path, "medseg.json", change)
    argv = predict_argv(folder, label_map_root / "test" / "images", tmp_path / "masks")
    one_line_failure(capsys, argv, expect=[folder / "medseg.json", said, "was edited"])


def test_an_onnx_export_given_a_class_its_graph_lacks_is_refused(
    onnx_export, label_map_root, tmp_path, capsys
):
    def add_class(meta):
        meta["config"]["data"]["labels"].append("c")
        meta["config"]["model"]["num_classes"] = 4
        meta["output"]["labels"].append("c")
        meta["output"]["shape"][1] = 4

    folder = edited(onnx_export, tmp_path, "medseg.json", add_class)
    argv = predict_argv(folder, label_map_root / "test" / "images", tmp_path / "masks")
    one_line_failure(capsys, argv, expect=["has 3 output channels but medseg.json describes 4"])
    # Untouched, the same export predicts.
    assert main([str(arg) for arg in predict_argv(onnx_export, *argv[4:7:2])]) == 0


# --- every kind of --checkpoint where it can be used; named where it cannot -------------------


def test_export_takes_a_safetensors_folder_or_its_files(
    safetensors_export, synthetic_root, tmp_path, capsys
):
    for given in (safetensors_export, safetensors_export / "model.safetensors"):
        out = tmp_path / f"again-{given.name}"
        assert main(["export", "--checkpoint", str(given), "--out", str(out)]) == 0
        assert (out / "model.safetensors").read_bytes() == (
            safetensors_export / "model.safetensors"
        ).read_bytes()
        config = json.loads((out / "config.json").read_text())
        sha256 = hashlib.sha256((safetensors_export / "model.safetensors").read_bytes())
        assert config["source_checkpoint_sha256"] == sha256.hexdigest()
    images = synthetic_root / "test" / "images"
    masks = {}
    for given in (safetensors_export, safetensors_export / "config.json"):
        out = tmp_path / f"masks-{given.name}"
        assert main([str(arg) for arg in predict_argv(given, images, out)]) == 0
        masks[given.name] = [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]
    first, second = masks.values()
    assert len(first) == 4 and all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_export_to_onnx_takes_a_safetensors_folder(safetensors_export, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    argv = ["export", "--checkpoint", safetensors_export, "--format", "onnx", "--out", out]
    assert main([str(arg) for arg in argv]) == 0
    meta = json.loads((out / "medseg.json").read_text())
    config = json.loads((safetensors_export / "config.json").read_text())
    assert meta["config"] == {key: config[key] for key in ("data", "model", "train")}
    weights = hashlib.sha256((safetensors_export / "model.safetensors").read_bytes())
    assert meta["source_checkpoint_sha256"] == weights.hexdigest()


def test_commands_name_the_checkpoint_they_cannot_use(
    onnx_export, safetensors_export, synthetic_root, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", onnx_export, "--out", out]
    one_line_failure(capsys, argv, expect=[onnx_export, "is an ONNX export, which cannot be"])
    argv = ["export", "--checkpoint", onnx_export / "medseg.json", "--out", out]
    one_line_failure(capsys, argv, expect=["is an ONNX export"])
    for name, kind in (("config.yaml", "a YAML file"), ("metrics.csv", "a table")):
        (tmp_path / name).write_text("epoch\n")
        argv = predict_argv(tmp_path / name, synthetic_root / "test" / "images", out)
        one_line_failure(capsys, argv, expect=[tmp_path / name, f"is {kind}, not a model"])
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(safetensors_export / "model.safetensors", lone / "model.safetensors")
    argv = ["export", "--checkpoint", lone / "model.safetensors", "--out", out]
    one_line_failure(capsys, argv, expect=["a safetensors file without its config.json"])
    assert not out.exists()


@pytest.fixture
def run_folder(tiny_checkpoint, tmp_path):
    """A run folder as training leaves it: checkpoints/best.pt beside its records."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, run / "checkpoints" / "best.pt")
    (run / "metrics.csv").write_text("epoch,val_dice\n1,0.5\n")
    (run / "README.md").write_text("my notes on this run\n")
    return run


@pytest.mark.parametrize("given", ["run", "run/checkpoints/best.pt"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_into_the_run_folder_itself_is_refused(
    run_folder, tmp_path, capsys, given, overwrite
):
    before = contents(run_folder)
    argv = ["export", "--checkpoint", tmp_path / given, "--out", run_folder]
    argv += ["--overwrite"] if overwrite else []
    one_line_failure(capsys, argv, expect=[f"--out {run_folder} is the folder of the model"])
    argv = ["export", "--checkpoint", tmp_path / given, "--out", run_folder / "checkpoints"]
    one_line_failure(capsys, argv, expect=["is the folder of the model"])
    assert contents(run_folder) == before
    assert main([str(arg) for arg in ["export", "--checkpoint", run_folder, "--out",
                                      run_folder / "export"]]) == 0  # fmt: skip
    assert (run_folder / "export" / "model.safetensors").is_file()


def test_resume_names_an_export_or_a_checkpoint_file_it_was_given(
    onnx_export, safetensors_export, run_folder, tmp_path, capsys
):
    for export, kind in ((safetensors_export, "a safetensors export"), (onnx_export, "an ONNX")):
        argv = ["train", "--resume", export]
        one_line_failure(capsys, argv, expect=[f"--resume {export}: it is {kind}", "not a run"])
    best = run_folder / "checkpoints" / "best.pt"
    argv = ["train", "--resume", best]
    one_line_failure(
        capsys, argv, expect=[f"{best} is a file", f"run folder medseg train wrote: {run_folder}"]
    )
    argv = ["train", "--resume", tmp_path / "nowhere"]
    one_line_failure(capsys, argv, expect=["no run to resume", "no such folder"])
