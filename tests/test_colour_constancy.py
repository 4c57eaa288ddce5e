"""Shades of Gray colour constancy: what it does to an image, and that training, prediction and
export all apply it alike (the whole image at the network's scale)."""

import json
import shutil

import numpy as np
import pytest
import torch

from medseg import api
from medseg.cli import main
from medseg.config import Config, build_config
from medseg.core.errors import MedsegError
from medseg.data.folder import SegmentationFolder, find_pairs
from medseg.data.io import read_image
from medseg.data.transforms import (
    SHADES_OF_GRAY_POWER,
    ImageCorrection,
    colour_constancy,
    eval_transform,
    resize_image,
)
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from medseg.engine.train import augment_on_device
from medseg.prediction.predictor import Predictor

SOG = "shades-of-gray"


def channel_light(image: np.ndarray) -> np.ndarray:
    pixels = image.reshape(-1, image.shape[2]).astype(np.float64)
    return np.mean(pixels**SHADES_OF_GRAY_POWER, axis=0) ** (1 / SHADES_OF_GRAY_POWER)


@pytest.fixture
def skin(isic_root) -> np.ndarray:
    """A real dermoscopy image, darkened so that a colour cast on it clips nothing."""
    path = sorted((isic_root / "train" / "images").iterdir())[0]
    return (read_image(path) * 0.6).astype(np.uint8)


def test_the_light_becomes_gray_and_the_brightness_stays(skin):
    corrected = colour_constancy(skin, SOG)
    light = channel_light(corrected)
    assert np.ptp(light) / light.mean() < 0.01  # every channel's light alike
    before = channel_light(skin)
    assert abs(np.sqrt(np.mean(light**2)) / np.sqrt(np.mean(before**2)) - 1) < 0.01
    assert not np.array_equal(corrected, skin)  # a real image has a cast to remove


def test_a_camera_cast_is_removed_up_to_the_overall_brightness(skin):
    cast = (skin * np.array([1.0, 0.8, 0.6])).astype(np.uint8)  # a bluish light turned orange
    plain, from_cast = (colour_constancy(image, SOG).astype(float) for image in (skin, cast))
    # The cast image corrected is the plain image corrected, times one number for all channels.
    ratios = from_cast.reshape(-1, 3).sum(0) / plain.reshape(-1, 3).sum(0)
    assert np.ptp(ratios) / ratios.mean() < 0.02
    uncorrected = cast.reshape(-1, 3).sum(0) / skin.reshape(-1, 3).sum(0)
    assert np.ptp(uncorrected) / uncorrected.mean() > 0.3


def test_gray_none_black_borders_and_a_second_pass_change_nothing(skin):
    gray = np.repeat(skin[..., :1], 3, axis=2)
    assert np.array_equal(colour_constancy(gray, SOG), gray)
    assert np.array_equal(colour_constancy(skin[..., :1], SOG), skin[..., :1])
    assert colour_constancy(skin, "none") is skin
    corrected = colour_constancy(skin, SOG)
    assert np.abs(colour_constancy(corrected, SOG).astype(int) - corrected).max() <= 1
    framed = np.pad(skin, ((40, 40), (40, 40), (0, 0)))  # a vignette or a fundus mask
    assert np.abs(colour_constancy(framed, SOG)[40:-40, 40:-40].astype(int) - corrected).max() <= 1
    with pytest.raises(MedsegError, match="unknown colour constancy 'grey'"):
        colour_constancy(skin, "grey")


def test_training_items_are_corrected_whole_before_augmentation(small_isic):
    samples = find_pairs(small_isic / "train")[:2]
    plain = SegmentationFolder(samples, transform=None)
    corrected = SegmentationFolder(samples, transform=None, correction=ImageCorrection(SOG))
    image, mask = plain.load(0)
    got, got_mask = corrected.load(0)
    assert np.array_equal(got, colour_constancy(image, SOG)) and np.array_equal(got_mask, mask)


def with_colour(checkpoint, tmp_path):
    """A copy of ``checkpoint`` whose config corrects colour."""
    state = load_checkpoint(checkpoint)
    state["config"]["data"]["colour_constancy"] = SOG
    path = tmp_path / "sog.pt"
    save_checkpoint(path, state)
    return path


def test_the_predictor_corrects_the_resized_image(tiny_checkpoint, skin, tmp_path):
    predictor = Predictor.from_checkpoint(
        with_colour(tiny_checkpoint, tmp_path), device="cpu", precision="fp32"
    )
    expected = eval_transform(64)(image=colour_constancy(resize_image(skin, 64), SOG))["image"]
    assert torch.equal(predictor.preprocess([skin])[0], expected)
    plain = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    assert not torch.equal(plain.preprocess([skin])[0], expected)


def test_a_patch_model_corrects_the_whole_image_not_each_tile(tiny_checkpoint, skin, tmp_path):
    state = load_checkpoint(tiny_checkpoint)
    state["config"]["data"].update(mode="patch", colour_constancy=SOG)
    save_checkpoint(tmp_path / "patch.pt", state)
    predictor = Predictor.from_checkpoint(tmp_path / "patch.pt", device="cpu", precision="fp32")
    # Its tiles are cut from this one corrected image: a tile of a dark corner, corrected
    # alone, would be scaled differently.
    expected = eval_transform(None)(image=colour_constancy(skin, SOG))["image"]
    assert torch.equal(predictor.preprocess([skin])[0], expected)


def test_device_augmentation_leaves_colour_correction_to_the_loader():
    data = Config().data
    data.colour_constancy, data.augment = SOG, "default"
    assert not augment_on_device(data, torch.device("cuda"))
    data.augment_on = "device"
    with pytest.raises(MedsegError, match="use data.augment_on=loader"):
        augment_on_device(data, torch.device("cuda"))


def test_a_run_with_colour_constancy_trains_predicts_and_records_it(
    synthetic_root, tmp_path, tiny_flags
):
    run = tmp_path / "run"
    flags = [*tiny_flags, "--epochs", "1", "--set", f"data.colour_constancy={SOG}"]
    assert main(["train", "--data", str(synthetic_root), "--out", str(run), *flags]) == 0
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["config"]["data"]["colour_constancy"] == SOG
    out = tmp_path / "masks"
    images = synthetic_root / "test" / "images"
    assert main(["predict", "--checkpoint", str(run), "-i", str(images), "-o", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == len(list(images.iterdir()))


def test_an_unknown_method_is_one_line_before_training(synthetic_root, tmp_path, capsys):
    argv = ["train", "--data", str(synthetic_root), "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", "data.colour_constancy=grey-world"]) == 2
    assert "shades-of-gray" in capsys.readouterr().err


def test_onnx_export_says_how_and_predicts_as_pytorch(tiny_checkpoint, skin, tmp_path):
    pytest.importorskip("onnxruntime")
    checkpoint = with_colour(tiny_checkpoint, tmp_path)
    api.export(checkpoint=checkpoint, out=tmp_path / "onnx", format="onnx")
    meta = json.loads((tmp_path / "onnx" / "medseg.json").read_text())
    assert meta["input"]["colour_constancy"].startswith(f"{SOG}: per channel")
    assert f"** {SHADES_OF_GRAY_POWER}" in meta["input"]["colour_constancy"]
    onnx = Predictor.from_checkpoint(tmp_path / "onnx", tta="none")
    torch_path = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32", tta="none")
    np.testing.assert_allclose(
        onnx.probabilities([skin])[0], torch_path.probabilities([skin])[0], atol=1e-4
    )
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert f"colour-corrected ({SOG}" in card
    shutil.rmtree(tmp_path / "onnx")


def test_the_setting_defaults_to_off():
    assert build_config().data.colour_constancy == "none"
