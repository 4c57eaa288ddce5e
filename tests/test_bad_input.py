"""Bad input through the command line: one line (what, where, how to fix), exit status 2, no
traceback, and nothing written or damaged.

Each test feeds one kind of bad input to ``medseg.cli.main`` and checks the message's form with
`refused`, then that the output folder was not created (or its earlier files are byte for byte
the same) and that the input itself was left alone.
"""

import errno
import hashlib
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import models

from medseg.cli import main
from medseg.data.io import read_image, read_mask
from medseg.engine import train as train_module
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from medseg.model import DeepLabV3Plus

TINY = ["--backbone", "resnet18", "--image-size", "64", "--no-pretrained", "--quiet"]
SHORT = [*TINY, "--epochs", "1", "--batch-size", "4"]


def refused(capsys, *argv, expect=()):
    """Run a command that must refuse; check the form of its message and return it."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    message = lines[0]
    assert message.startswith("medseg: error: ")
    for fragment in expect:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    return message


def snapshot(folder):
    """{relative path: sha256} of every file under `folder` (to compare before and after)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def refuses_training(capsys, data, tmp_path, *, expect, extra=SHORT):
    """`medseg train` on `data` must refuse, write no run folder and leave the data as it was."""
    out = tmp_path / "run"
    before = snapshot(data) if data.is_dir() else None
    message = refused(capsys, "train", "--data", data, "--out", out, *extra, expect=expect)
    assert not out.exists()
    if before is not None:
        assert snapshot(data) == before
    return message


def write_png_header(path, width, height):
    """A valid PNG of a few bytes whose header claims `width` × `height` grey pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- data folders --------------------------------------------------------------------------


def test_data_root_missing(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    refuses_training(
        capsys, missing, tmp_path, expect=["data root not found", missing, "pass the folder"]
    )


def test_data_root_empty(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refuses_training(capsys, empty, tmp_path, expect=[f"{empty} has no train/images", "expected"])


def test_data_root_without_images(capsys, synthetic_root, tmp_path):
    shutil.rmtree(synthetic_root / "train" / "images")
    refuses_training(capsys, synthetic_root, tmp_path, expect=["has no train/images", "expected"])


def test_data_root_without_masks(capsys, synthetic_root, tmp_path):
    shutil.rmtree(synthetic_root / "train" / "masks")
    masks = synthetic_root / "train" / "masks"
    refuses_training(
        capsys, synthetic_root, tmp_path, expect=[f"{masks} is not a folder", "expected"]
    )


def test_images_folder_without_images(capsys, synthetic_root, tmp_path):
    for image in (synthetic_root / "train" / "images").iterdir():
        image.unlink()
    refuses_training(capsys, synthetic_root, tmp_path, expect=["no images in", "put <id>.jpg"])


def test_mask_without_image(capsys, synthetic_root, tmp_path):
    (synthetic_root / "train" / "images" / "SYN_0003.jpg").unlink()
    refuses_training(
        capsys,
        synthetic_root,
        tmp_path,
        expect=["1 masks without an image: SYN_0003_segmentation.png", "expected a matching"],
    )


def test_images_without_masks_are_listed_with_a_count(capsys, synthetic_root, tmp_path):
    for index in range(7):
        (synthetic_root / "train" / "masks" / f"SYN_{index:04d}_segmentation.png").unlink()
    refuses_training(
        capsys,
        synthetic_root,
        tmp_path,
        expect=[
            "7 images without a mask: SYN_0000.jpg, SYN_0001.jpg, SYN_0002.jpg, SYN_0003.jpg, "
            "SYN_0004.jpg and 2 more",
            "expected a matching",
        ],
    )


def test_mask_of_another_size(capsys, synthetic_root, tmp_path):
    Image.new("L", (32, 16), 255).save(
        synthetic_root / "train" / "masks" / "SYN_0002_segmentation.png"
    )
    refuses_training(
        capsys,
        synthetic_root,
        tmp_path,
        expect=["SYN_0002_segmentation.png is 32×16", "SYN_0002.jpg is 64×64", "resize or replace"],
    )


def test_mask_of_class_labels_is_refused(capsys, synthetic_root, tmp_path):
    """0/1/2 labels (or a red outline, grey 76) would read as an empty mask: refused instead."""
    mask = synthetic_root / "train" / "masks" / "SYN_0001_segmentation.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 3).save(mask)
    refuses_training(
        capsys, synthetic_root, tmp_path, expect=[mask, "values up to 2", "255", "--skip-bad"]
    )


def test_soft_mask_values_are_cut_at_half_the_range(capsys, synthetic_root, tmp_path):
    """How a non-binary mask is read: foreground above 127 (8-bit), so soft edges cut in the middle."""
    mask = synthetic_root / "train" / "masks" / "SYN_0001_segmentation.png"
    values = np.zeros((64, 64), np.uint8)
    values[:, 16:32], values[:, 32:48], values[:, 48:] = 127, 128, 255
    Image.fromarray(values).save(mask)
    assert main(["prepare", str(synthetic_root), "--size", "64"]) == 0
    capsys.readouterr()
    expected = np.zeros((64, 64), bool)
    expected[:, 32:] = True
    np.testing.assert_array_equal(read_mask(mask), expected)


@pytest.mark.parametrize(
    "relative", ["train/images/SYN_0005.jpg", "train/masks/SYN_0006_segmentation.png"]
)
def test_truncated_file_is_named(capsys, synthetic_root, tmp_path, relative):
    bad = synthetic_root / relative
    cut_in_half(bad)
    refuses_training(
        capsys, synthetic_root, tmp_path, expect=[bad, "truncated", "replace it", "--skip-bad"]
    )


def test_skip_bad_goes_on_without_the_bad_files(capsys, synthetic_root, tmp_path):
    bad_image = synthetic_root / "train" / "images" / "SYN_0005.jpg"
    bad_mask = synthetic_root / "train" / "masks" / "SYN_0006_segmentation.png"
    cut_in_half(bad_image)
    cut_in_half(bad_mask)
    out = tmp_path / "run"
    code = main(["train", "--data", str(synthetic_root), "--out", str(out), *SHORT, "--skip-bad"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    skipped = [line for line in captured.out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 2
    assert any(str(bad_image) in line for line in skipped)
    assert any(str(bad_mask) in line for line in skipped)
    # 12 pairs: SYN_0009 held out for validation, the 2 bad ones left out of training
    assert "9 training / 1 validation images" in captured.out
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1


def test_zero_byte_file(capsys, synthetic_root, tmp_path):
    empty = synthetic_root / "train" / "images" / "SYN_0004.jpg"
    empty.write_bytes(b"")
    refuses_training(
        capsys, synthetic_root, tmp_path, expect=[empty, "is empty (0 bytes)", "replace it"]
    )


def test_file_that_is_not_an_image(capsys, synthetic_root, tmp_path):
    text = synthetic_root / "train" / "images" / "SYN_0004.jpg"
    text.write_text("patient notes, not a picture\n")
    refuses_training(
        capsys, synthetic_root, tmp_path, expect=[text, "is not an image", "replace it"]
    )


def test_decompression_bomb(capsys, synthetic_root, tmp_path):
    (synthetic_root / "train" / "images" / "SYN_0005.jpg").unlink()
    bomb = synthetic_root / "train" / "images" / "SYN_0005.png"
    write_png_header(bomb, 30_000, 30_000)  # 900 megapixels claimed in 100 bytes
    refuses_training(
        capsys, synthetic_root, tmp_path, expect=[bomb, "too large to decode safely", "downscale"]
    )


def test_16_bit_palette_rgba_and_grayscale_images_are_handled(capsys, tiny_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep.png")  # 16-bit grey
    palette = Image.new("P", (64, 64))
    palette.putpalette([0, 0, 0, 200, 40, 10] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    palette.save(folder / "palette.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[:, :32, 3] = 90, 255  # right half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((40, 70), 77, np.uint8)).save(folder / "grey.jpg")

    out = tmp_path / "masks"
    args = ["predict", "--checkpoint", tiny_checkpoint, "--input", folder, "--output", out]
    code = main([str(arg) for arg in [*args, "--quiet", "--device", "cpu"]])
    assert code == 0, capsys.readouterr().err
    sizes = {path.name: Image.open(path).size for path in out.glob("*_segmentation.png")}
    assert sizes == {
        "deep_segmentation.png": (64, 48),
        "palette_segmentation.png": (64, 64),
        "rgba_segmentation.png": (64, 64),
        "grey_segmentation.png": (70, 40),
    }
    # How each was read: 8-bit RGB, the 16-bit range scaled, transparency composited on white.
    images = {name: read_image(folder / name) for name in ("deep.png", "palette.png", "rgba.png")}
    assert all(image.dtype == np.uint8 and image.shape[2] == 3 for image in images.values())
    assert images["deep.png"][-1, -1].tolist() == [255, 255, 255]
    assert images["palette.png"][0, 0].tolist() == [200, 40, 10]
    assert images["rgba.png"][0, 0].tolist() == [90, 0, 0]
    assert images["rgba.png"][0, 63].tolist() == [255, 255, 255]
    assert read_image(folder / "grey.jpg").shape == (40, 70, 3)


# --- checkpoints ------------------------------------------------------------------------------


def inference_args(command, checkpoint, synthetic_root, out):
    data = synthetic_root / "test"
    if command == "predict":
        return ["predict", "--checkpoint", checkpoint, "--input", data / "images", "--output", out]
    return [command, "--checkpoint", checkpoint, "--data", data, "--out", out]


def refuses_checkpoint(capsys, checkpoint, synthetic_root, tmp_path, *, expect, command="predict"):
    """The command must refuse `checkpoint`, create no output and leave the file as it was."""
    out = tmp_path / "out"
    before = checkpoint.read_bytes()
    args = inference_args(command, checkpoint, synthetic_root, out)
    message = refused(capsys, *args, "--device", "cpu", expect=[checkpoint, *expect])
    assert not out.exists()
    assert checkpoint.read_bytes() == before
    return message


@pytest.mark.parametrize("command", ["predict", "evaluate", "visualize"])
def test_state_dict_is_not_a_medseg_checkpoint(capsys, synthetic_root, tmp_path, command):
    path = tmp_path / "weights.pt"
    torch.save(DeepLabV3Plus(backbone="resnet18").state_dict(), path)
    refuses_checkpoint(
        capsys,
        path,
        synthetic_root,
        tmp_path,
        command=command,
        expect=["is not a medseg checkpoint", "written by medseg train"],
    )


def test_text_file_is_not_a_checkpoint(capsys, synthetic_root, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello world\n")
    message = refuses_checkpoint(
        capsys,
        path,
        synthetic_root,
        tmp_path,
        expect=["is not a readable checkpoint", "medseg train"],
    )
    assert "carry code" not in message  # a damaged file is not mistaken for an attack


def test_truncated_checkpoint(capsys, tiny_checkpoint, synthetic_root, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:100_000])
    refuses_checkpoint(
        capsys,
        path,
        synthetic_root,
        tmp_path,
        expect=["not a readable checkpoint (truncated or corrupt?)", "complete .pt file"],
    )


def test_checkpoint_whose_weights_are_of_another_backbone(
    capsys, tiny_checkpoint, synthetic_root, tmp_path
):
    """The settings say resnet18 but the weights are a resnet34's: refused, not half loaded.

    (A checkpoint of another backbone whose settings match its weights is fine: the model is
    rebuilt from the checkpoint's own settings.)
    """
    state = load_checkpoint(tiny_checkpoint)
    state["model"] = DeepLabV3Plus(backbone="resnet34").state_dict()
    path = tmp_path / "mixed.pt"
    save_checkpoint(path, state)
    refuses_checkpoint(
        capsys,
        path,
        synthetic_root,
        tmp_path,
        expect=["was made for another model", "medseg train"],
    )


def test_checkpoint_for_another_number_of_classes(
    capsys, tiny_checkpoint, synthetic_root, tmp_path
):
    state = load_checkpoint(tiny_checkpoint)
    state["model"] = DeepLabV3Plus(num_classes=3, backbone="resnet18").state_dict()
    path = tmp_path / "three_classes.pt"
    save_checkpoint(path, state)
    refuses_checkpoint(
        capsys,
        path,
        synthetic_root,
        tmp_path,
        expect=["was made for 3 classes", "one foreground class"],
    )


def test_pretrained_weights_of_a_deeper_resnet(capsys, synthetic_root, tmp_path):
    """resnet34's first blocks fit a resnet18: its extra blocks must not be silently dropped."""
    weights = models.resnet18().state_dict()
    weights["layer1.2.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # a block resnet18 lacks
    path = tmp_path / "resnet34-ish.pth"
    torch.save(weights, path)
    refuses_training(
        capsys,
        synthetic_root,
        tmp_path,
        extra=["--backbone", "resnet18", "--image-size", "64", "--pretrained", path, "--quiet"],
        expect=["do not fit a resnet18 backbone", "1 unexpected", "layer1.2.conv1.weight"],
    )


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expect"),
    [
        (
            {"train": {"learning_rate": 0.1}},
            ["unknown key train.learning_rate", "known keys: epochs"],
        ),
        ({"train": {"epochs": "ten"}}, ["train.epochs='ten'", "wrong type; expected int"]),
        ({"train": {"lr": -0.001}}, ["train.lr=-0.001 is impossible", "greater than 0"]),
        ({"train": {"batch_size": 0}}, ["train.batch_size=0 is impossible", "at least 1"]),
        ({"model": {"backbone": "resnet19"}}, ["model.backbone='resnet19'", "choose one of"]),
    ],
    ids=["unknown-key", "wrong-type", "negative-lr", "batch-0", "unknown-choice"],
)
def test_bad_config_file_names_the_key(capsys, synthetic_root, tmp_path, values, expect):
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(values))
    refuses_training(
        capsys, synthetic_root, tmp_path, extra=["--config", config, "--quiet"], expect=expect
    )


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--batch-size", "0"], "--batch-size: 0 is impossible"),
        (["--lr", "-1"], "train.lr=-1.0 is impossible"),
        (["--set", "train.warmup_epochs=soon"], "train.warmup_epochs='soon'"),
    ],
)
def test_bad_setting_on_the_command_line_names_the_key(
    capsys, synthetic_root, tmp_path, flags, expect
):
    refuses_training(capsys, synthetic_root, tmp_path, extra=[*TINY, *flags], expect=[expect])


# --- output folders --------------------------------------------------------------------------


def test_train_refuses_a_folder_with_an_earlier_run(
    capsys, tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, out / "checkpoints" / "last.pt")
    (out / "metrics.csv").write_text("epoch,val_dice\n1,0.5\n")
    before = snapshot(out)
    refused(
        capsys,
        "train", "--data", synthetic_root, "--out", out, *SHORT,
        expect=[out, "already holds a run", "--resume", "--overwrite"],
    )  # fmt: skip
    assert snapshot(out) == before


def test_evaluate_refuses_a_folder_with_an_earlier_evaluation(
    capsys, tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "evaluation"
    out.mkdir()
    (out / "summary.json").write_text('{"dice": 0.9}')
    (out / "per_image.csv").write_text("id,dice\nSYN_0012,0.9\n")
    before = snapshot(out)
    args = inference_args("evaluate", tiny_checkpoint, synthetic_root, out)
    refused(capsys, *args, expect=[out, "already holds an evaluation", "--overwrite"])
    assert snapshot(out) == before


def test_visualize_refuses_a_folder_with_earlier_figures(
    capsys, tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "figures"
    out.mkdir()
    (out / "SYN_0013_prediction.png").write_bytes(b"an earlier figure")
    before = snapshot(out)
    args = inference_args("visualize", tiny_checkpoint, synthetic_root, out)
    refused(capsys, *args, "--device", "cpu", expect=["SYN_0013_prediction.png", "--overwrite"])
    assert snapshot(out) == before  # not even the figures before SYN_0013 were written


def test_predict_refuses_masks_it_did_not_write(capsys, tiny_checkpoint, synthetic_root, tmp_path):
    out = tmp_path / "masks"
    shutil.copytree(synthetic_root / "test" / "masks", out)  # ground truth, same names
    before = snapshot(out)
    args = inference_args("predict", tiny_checkpoint, synthetic_root, out)
    refused(
        capsys,
        *args,
        "--device",
        "cpu",
        expect=[out, "4 masks that medseg predict did not write", "--overwrite"],
    )
    assert snapshot(out) == before


def test_predict_refuses_masks_of_another_checkpoint(
    capsys, tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "masks"
    args = inference_args("predict", tiny_checkpoint, synthetic_root, out)
    assert main([str(arg) for arg in [*args, "--device", "cpu", "--quiet"]]) == 0
    before = snapshot(out)

    other = tmp_path / "other.pt"
    state = load_checkpoint(tiny_checkpoint)
    state["model"] = {
        key: value + 0.01 if value.is_floating_point() else value
        for key, value in state["model"].items()
    }
    save_checkpoint(other, state)
    args = inference_args("predict", other, synthetic_root, out)
    refused(
        capsys,
        *args,
        "--device",
        "cpu",
        expect=[out, "predicted with another checkpoint", "--overwrite"],
    )
    assert snapshot(out) == before

    assert main([str(arg) for arg in [*args, "--device", "cpu", "--quiet", "--overwrite"]]) == 0
    assert snapshot(out)[".medseg-predict.json"] != before[".medseg-predict.json"]


@pytest.fixture
def unwritable(tmp_path):
    """(an output path that cannot be created, an earlier file that must survive the attempt).

    As root, permissions do not stop writes, so the path then lies under a regular file, which
    stops everyone.
    """
    if os.geteuid() == 0:
        earlier = tmp_path / "results.txt"
        earlier.write_text("earlier results\n")
        yield earlier / "out", earlier
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    earlier = locked / "results.txt"
    earlier.write_text("earlier results\n")
    locked.chmod(0o555)
    yield locked / "out", earlier
    locked.chmod(0o755)


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "visualize"])
def test_unwritable_output_location(capsys, tiny_checkpoint, synthetic_root, unwritable, command):
    out, earlier = unwritable
    before = earlier.read_bytes()
    if command == "train":
        args = ["train", "--data", synthetic_root, "--out", out, *SHORT]
    else:
        args = [*inference_args(command, tiny_checkpoint, synthetic_root, out), "--device", "cpu"]
    refused(capsys, *args, expect=[f"cannot write to {out}", "choose"])
    assert earlier.read_bytes() == before
    assert not out.exists()


def fail_like_a_full_disk(path):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_earlier_evaluation(
    capsys, tiny_checkpoint, synthetic_root, tmp_path, monkeypatch
):
    out = tmp_path / "evaluation"
    args = [*inference_args("evaluate", tiny_checkpoint, synthetic_root, out), "--device", "cpu"]
    assert main([str(arg) for arg in [*args, "--quiet"]]) == 0
    capsys.readouterr()
    before = snapshot(out)

    monkeypatch.setattr("medseg.core.files._fsync_file", fail_like_a_full_disk)
    refused(
        capsys,
        *args, "--quiet", "--overwrite",
        expect=[f"cannot write {out / 'per_image.csv'}", "No space left", "free some space"],
    )  # fmt: skip
    assert snapshot(out) == before  # no half file, no temporary file left beside them


def test_full_disk_during_training_keeps_the_earlier_checkpoints(
    capsys, synthetic_root, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    real_save = torch.save
    saves, at_failure = [], {}

    def save_until_the_disk_is_full(obj, target):
        saves.append(target)
        if len(saves) <= 2:  # epoch 1: best.pt and last.pt
            return real_save(obj, target)
        # what stood there when the write began (not the temporary file being written)
        at_failure.update((k, v) for k, v in snapshot(checkpoints).items() if not k.startswith("."))
        with open(target, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        # torch's zip writer reports a failed write like this, not as an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    message = refused(
        capsys,
        "train", "--data", synthetic_root, "--out", out, *TINY, "--epochs", "2", "--batch-size", "4",
        expect=[f"cannot write {checkpoints}", "the write failed", "bytes free"],
    )  # fmt: skip
    assert "best.pt" in message or "last.pt" in message
    assert set(at_failure) == {"best.pt", "last.pt"}
    assert snapshot(checkpoints) == at_failure  # intact, and no temporary file left
    monkeypatch.undo()
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1


def test_loss_that_becomes_nan_stops_and_keeps_the_earlier_checkpoints(
    capsys, synthetic_root, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    real_build_loss = train_module.build_loss
    at_failure = {}

    def loss_that_breaks_at_the_fourth_step(name):
        loss = real_build_loss(name)
        steps = []

        def forward(logits, masks):
            value = loss(logits, masks)
            if torch.is_grad_enabled():  # training steps only, not validation
                steps.append(value)
                if len(steps) == 4:  # 11 images, batches of 4: 2 steps an epoch; epoch 2, step 2
                    at_failure.update(snapshot(checkpoints))
                    return value * float("nan")
            return value

        return forward

    monkeypatch.setattr(train_module, "build_loss", loss_that_breaks_at_the_fourth_step)
    refused(
        capsys,
        "train", "--data", synthetic_root, "--out", out, *TINY, "--epochs", "3", "--batch-size", "4",
        expect=["loss became nan by epoch 2, step 2", "kept", "lower --lr"],
    )  # fmt: skip
    assert set(at_failure) == {"best.pt", "last.pt"}
    assert snapshot(checkpoints) == at_failure
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1
    assert (out / "metrics.csv").read_text().count("\n") == 2  # the header and epoch 1
