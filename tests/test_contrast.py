"""CLAHE local contrast (``data.contrast``): what it does to an image, that it follows colour
constancy, and that training, prediction and export apply it alike to the whole image."""

import json
import shutil

import cv2
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
    ImageCorrection,
    colour_constancy,
    eval_transform,
    local_contrast,
)
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from medseg.engine.train import augment_on_device
from medseg.prediction.predictor import Predictor

SOG = "shades-of-gray"


@pytest.fixture
def dim(isic_root) -> np.ndarray:
    """A real dermoscopy image squeezed into a dim, flat quarter of the range."""
    path = sorted((isic_root / "train" / "images").iterdir())[0]
    return (20 + read_image(path) * 0.25).astype(np.uint8)


def lightness(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 0].astype(float)


def test_clahe_spreads_a_flat_image_and_keeps_its_hues(dim):
    equalised = local_contrast(dim, "clahe")
    assert equalised.shape == dim.shape and equalised.dtype == np.uint8
    assert lightness(equalised).std() > 1.5 * lightness(dim).std()
    # Only CIELAB's lightness changes: the colour axes stay within rounding.
    chroma = [
        cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 1:].astype(int) for image in (dim, equalised)
    ]
    assert np.median(np.abs(chroma[0] - chroma[1])) <= 2


def test_clahe_takes_gray_and_many_channels_channel_by_channel(dim):
    gray = dim[..., :1]
    equalised = local_contrast(gray, "clahe")
    assert equalised.shape == gray.shape
    assert equalised.astype(float).std() > 1.5 * gray.astype(float).std()
    two = np.concatenate([gray, gray], axis=2)
    assert np.array_equal(local_contrast(two, "clahe"), np.concatenate([equalised] * 2, axis=2))
    assert np.array_equal(local_contrast(dim[..., 0], "clahe"), equalised[..., 0])


def test_none_is_the_image_itself_and_an_unknown_method_is_named(dim):
    assert local_contrast(dim, "none") is dim
    with pytest.raises(MedsegError, match="unknown contrast 'histogram'.*clahe"):
        local_contrast(dim, "histogram")


def test_the_correction_removes_the_colour_cast_first(dim):
    both = ImageCorrection(SOG, "clahe")
    assert np.array_equal(both(dim), local_contrast(colour_constancy(dim, SOG), "clahe"))
    assert both and ImageCorrection(contrast="clahe") and not ImageCorrection()
    data = Config().data
    data.contrast = "clahe"
    assert ImageCorrection.of(data) == ImageCorrection("none", "clahe")


def test_training_items_are_equalised_whole_before_augmentation(small_isic):
    samples = find_pairs(small_isic / "train")[:2]
    plain = SegmentationFolder(samples, transform=None)
    equalised = SegmentationFolder(
        samples, transform=None, correction=ImageCorrection("none", "clahe")
    )
    image, mask = plain.load(0)
    got, got_mask = equalised.load(0)
    assert np.array_equal(got, local_contrast(image, "clahe")) and np.array_equal(got_mask, mask)


def with_contrast(checkpoint, tmp_path, **data):
    """A copy of ``checkpoint`` whose config equalises contrast (and sets ``data``)."""
    state = load_checkpoint(checkpoint)
    state["config"]["data"].update(contrast="clahe", **data)
    path = tmp_path / "clahe.pt"
    save_checkpoint(path, state)
    return path


def test_a_patch_model_equalises_the_whole_image_not_each_tile(tiny_checkpoint, dim, tmp_path):
    checkpoint = with_contrast(tiny_checkpoint, tmp_path, mode="patch")
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    expected = eval_transform(None)(image=local_contrast(dim, "clahe"))["image"]
    assert torch.equal(predictor.preprocess([dim])[0], expected)


def test_device_augmentation_leaves_contrast_to_the_loader():
    data = Config().data
    data.contrast, data.augment = "clahe", "default"
    assert not augment_on_device(data, torch.device("cuda"))
    data.augment_on = "device"
    with pytest.raises(MedsegError, match="data.contrast=clahe .*use data.augment_on=loader"):
        augment_on_device(data, torch.device("cuda"))


def test_a_run_with_clahe_trains_predicts_and_records_it(synthetic_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    flags = [*tiny_flags, "--epochs", "1", "--set", "data.contrast=clahe"]
    assert main(["train", "--data", str(synthetic_root), "--out", str(run), *flags]) == 0
    assert load_checkpoint(run / "checkpoints" / "best.pt")["config"]["data"]["contrast"] == "clahe"
    out = tmp_path / "masks"
    images = synthetic_root / "test" / "images"
    assert main(["predict", "--checkpoint", str(run), "-i", str(images), "-o", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == len(list(images.iterdir()))


def test_an_unknown_contrast_is_one_line_before_training(synthetic_root, tmp_path, capsys):
    argv = ["train", "--data", str(synthetic_root), "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", "data.contrast=histogram"]) == 2
    assert "clahe" in capsys.readouterr().err


def test_onnx_export_says_how_and_predicts_as_pytorch(tiny_checkpoint, dim, tmp_path):
    pytest.importorskip("onnxruntime")
    checkpoint = with_contrast(tiny_checkpoint, tmp_path, colour_constancy=SOG)
    api.export(checkpoint=checkpoint, out=tmp_path / "onnx", format="onnx")
    meta = json.loads((tmp_path / "onnx" / "medseg.json").read_text())
    assert meta["input"]["contrast"].startswith("clahe: OpenCV createCLAHE(clipLimit=2.0")
    assert meta["input"]["colour_constancy"].startswith(SOG)
    onnx = Predictor.from_checkpoint(tmp_path / "onnx", tta="none")
    torch_path = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32", tta="none")
    np.testing.assert_allclose(
        onnx.probabilities([dim])[0], torch_path.probabilities([dim])[0], atol=1e-4
    )
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert f"colour-corrected ({SOG}) then contrast-equalised (clahe)" in card
    shutil.rmtree(tmp_path / "onnx")


def test_contrast_defaults_to_off_and_exports_as_nothing():
    assert build_config().data.contrast == "none"
