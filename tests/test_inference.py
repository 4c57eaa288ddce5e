"""The predictor: what it feeds the network, TTA views, thresholds and post-processing."""

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import PRECISIONS, PROBABILITY_TOLERANCE
from PIL import Image
from torch import nn

from medseg.cli import build_parser, main
from medseg.commands.predict import predict
from medseg.config import build_config
from medseg.config.choices import DEFAULT_TTA, TTA_MODES, TTA_SCALES
from medseg.core.errors import MedsegError
from medseg.data.cache import prepare
from medseg.data.folder import find_pairs
from medseg.data.io import read_image
from medseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from medseg.engine.runtime import Precision, select_precision
from medseg.prediction.outputs import RECORD_NAME
from medseg.prediction.postprocess import keep_largest_component
from medseg.prediction.predictor import Predictor, _orient, _unorient, tta_views


class Recorder(nn.Module):
    """Runs ``network`` and keeps a copy of every batch it is given."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.inputs: list[torch.Tensor] = []

    def forward(self, batch):
        self.inputs.append(batch.detach().clone())
        return self.network(batch)


def write_pair(folder, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{name}_segmentation.png")


def test_predictor_feeds_the_network_what_training_saw_of_a_large_image(tiny_checkpoint, tmp_path):
    # Pixel noise is the worst case for a shrink that samples instead of averaging.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)
    mask = np.zeros((640, 640), dtype=bool)
    mask[100:400, 200:500] = True
    write_pair(tmp_path / "data", "big", image, mask)
    cache = prepare(find_pairs(tmp_path / "data"), size=64, progress=False)
    predictor = Predictor.from_checkpoint(
        tiny_checkpoint, device="cpu", precision="fp32", tta="none"
    )
    predictor.network = recorder = Recorder(predictor.network)

    predictor.probabilities([read_image(tmp_path / "data" / "images" / "big.png")])

    trained_on = (cache.images[0] / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    fed = recorder.inputs[0][0].permute(1, 2, 0).numpy()
    grey_level = 1 / 255 / min(IMAGENET_STD)
    assert fed.shape == trained_on.shape == (64, 64, 3)
    assert np.abs(fed - trained_on).max() <= grey_level + 1e-5


def asymmetric(size: int = 5) -> torch.Tensor:
    """A (1, 1, size, size) batch whose every rotation and reflection differs."""
    return torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)


@pytest.mark.parametrize("view", tta_views("d4"))
def test_unorient_undoes_orient(view):
    batch = asymmetric()
    turned = _orient(batch, view.turns, view.flip)
    assert torch.equal(_unorient(turned, view.turns, view.flip), batch)


@pytest.mark.parametrize(("mode", "count"), [("none", 1), ("flip", 4), ("d4", 8)])
def test_tta_views_are_distinct_orientations(mode, count):
    views = tta_views(mode)
    oriented = {
        tuple(_orient(asymmetric(), view.turns, view.flip).flatten().tolist()) for view in views
    }
    assert len(views) == len(oriented) == count
    assert {view.scale for view in views} == {1.0}


def test_flip_scales_are_the_four_flips_at_each_scale():
    views = tta_views("flip-scales")
    assert len(views) == 4 * len(TTA_SCALES) and 1.0 in TTA_SCALES
    for scale in TTA_SCALES:
        at_scale = [view._replace(scale=1.0) for view in views if view.scale == scale]
        assert at_scale == tta_views("flip")


def test_flip_scales_feeds_each_scale_and_averages_at_the_network_size(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(
        tiny_checkpoint, device="cpu", precision="fp32", tta="flip-scales"
    )
    predictor.network = recorder = Recorder(predictor.network)
    image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)

    (probability,) = predictor.probabilities([image])

    size = predictor.config.data.image_size
    sides = sorted({batch.shape[-1] for batch in recorder.inputs})
    assert sides == sorted(round(size * scale / 16) * 16 for scale in TTA_SCALES)
    assert all(batch.is_contiguous(memory_format=torch.channels_last) for batch in recorder.inputs)
    assert probability.shape == (90, 70) and 0 <= probability.min() <= probability.max() <= 1
    # The views at scale 1 alone are what flip TTA gives; the other scales move the average.
    flip = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", tta="flip")
    assert not np.allclose(probability, flip.probabilities([image])[0], atol=1e-4)


def test_a_network_that_ignores_scale_gives_the_same_probabilities_at_every_scale():
    class Flat(nn.Module):  # the same logit everywhere, whatever the input's size
        def forward(self, batch):
            return torch.full_like(batch[:, :1], 0.7)

    config = build_config(overrides={"data.image_size": 64})
    cpu = torch.device("cpu")
    predictor = Predictor(Flat(), config, cpu, select_precision("fp32", cpu), tta="flip-scales")
    image = np.zeros((50, 40, 3), dtype=np.uint8)
    (probability,) = predictor.probabilities([image])
    assert probability.shape == (50, 40)
    assert np.allclose(probability, 1 / (1 + np.exp(-0.7)), atol=1e-6)


def test_flip_views_are_the_four_flips():
    batch = asymmetric()
    views = tta_views("flip")
    flips = {tuple(_orient(batch, view.turns, view.flip).flatten().tolist()) for view in views}
    expected = [batch, batch.flip(-1), batch.flip(-2), batch.flip(-1).flip(-2)]
    assert flips == {tuple(image.flatten().tolist()) for image in expected}


def test_keep_largest_component_keeps_the_larger_blob_and_fills_its_hole():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:3, 1:3] = True  # 4 pixels
    mask[5:11, 4:10] = True  # 36 pixels, with a hole
    mask[7, 6] = False
    expected = np.zeros_like(mask)
    expected[5:11, 4:10] = True
    assert np.array_equal(keep_largest_component(mask), expected)


def test_keep_largest_component_joins_diagonal_neighbours():
    mask = np.eye(4, dtype=bool)  # one 8-connected region
    mask[0, 3] = True
    expected = np.eye(4, dtype=bool)
    assert np.array_equal(keep_largest_component(mask), expected)


def test_keep_largest_component_leaves_an_empty_mask_empty():
    mask = np.zeros((5, 5), dtype=bool)
    assert not keep_largest_component(mask).any()


def two_blobs() -> np.ndarray:
    """A probability map: a large blob at 0.6 with a 0.2 hole, a small one at 0.9, background 0.1."""
    probability = np.full((20, 20), 0.1, dtype=np.float32)
    probability[2:14, 2:14] = 0.6
    probability[7, 7] = 0.2
    probability[16:19, 16:19] = 0.9
    return probability


def test_predictor_cuts_at_its_threshold(tiny_checkpoint):
    probability = two_blobs()
    default = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", tta="none")
    assert default.threshold == default.config.train.threshold == 0.5
    assert np.array_equal(default.binarize(probability), probability > 0.5)
    high = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", threshold=0.7)
    assert high.threshold == 0.7
    assert np.array_equal(high.binarize(probability), probability > 0.7)  # the small blob only
    low = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", threshold=0.15)
    assert low.binarize(probability).sum() == 12 * 12 + 9  # the hole at 0.2 is in


def test_predictor_postprocess_keeps_the_largest_region_filled(tiny_checkpoint, monkeypatch):
    probability = two_blobs()
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", postprocess=True)
    expected = np.zeros((20, 20), dtype=bool)
    expected[2:14, 2:14] = True  # the small 0.9 blob dropped, the hole filled
    assert np.array_equal(predictor.binarize(probability), expected)
    monkeypatch.setattr(predictor, "probabilities", lambda images: [probability for _ in images])
    masks = predictor.masks([np.zeros((20, 20, 3), np.uint8)] * 2)
    assert len(masks) == 2 and all(np.array_equal(mask, expected) for mask in masks)


def test_a_predictor_built_directly_uses_the_default_tta(tiny_checkpoint):
    model, config = model_from_checkpoint(load_checkpoint(tiny_checkpoint), path=tiny_checkpoint)
    predictor = Predictor(model, config, torch.device("cpu"), Precision("fp32", None))
    # "auto" resolves to flips for a binary checkpoint, as every entry point did before it.
    assert DEFAULT_TTA == "auto" and predictor.tta == "flip"
    assert Predictor.from_checkpoint(tiny_checkpoint, device="cpu").tta == "flip"


@pytest.mark.parametrize("command", ["predict", "evaluate", "visualize"])
def test_the_command_line_takes_its_tta_default_and_choices_from_inference(command):
    parser = build_parser()
    tail = {"predict": ["--input", "i", "--output", "o"], "evaluate": ["--data", "d"]}
    tail["visualize"] = ["--data", "d", "--out", "o"]
    args = parser.parse_args([command, "--checkpoint", "c", *tail[command]])
    assert args.tta == DEFAULT_TTA and args.threshold is None
    assert (
        parser.parse_args([command, "--checkpoint", "c", *tail[command], "--tta"]).tta
        == DEFAULT_TTA
    )
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    tta = next(a for a in subparsers.choices[command]._actions if a.dest == "tta")
    assert tuple(tta.choices) == TTA_MODES


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.1, float("nan")])
def test_a_threshold_outside_zero_one_is_refused_in_one_line(tiny_checkpoint, tmp_path, threshold):
    with pytest.raises(MedsegError, match="not a probability strictly between 0 and 1") as error:
        Predictor.from_checkpoint(tiny_checkpoint, device="cpu", threshold=threshold)
    assert "\n" not in str(error.value) and repr(threshold) in str(error.value)
    with pytest.raises(MedsegError, match="strictly between 0 and 1"):
        predict(tiny_checkpoint, tmp_path / "in.png", tmp_path / "out", threshold=threshold)
    assert not (tmp_path / "out").exists()


def test_predict_records_its_threshold_and_refuses_to_resume_with_another(
    tiny_checkpoint, tmp_path
):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8)).save(source)
    options = {"device": "cpu", "tta": "none", "progress": False}
    report = predict(tiny_checkpoint, source, tmp_path / "out", threshold=0.3, **options)
    assert len(report.written) == 1
    assert json.loads((tmp_path / "out" / RECORD_NAME).read_text())["threshold"] == 0.3
    again = predict(tiny_checkpoint, source, tmp_path / "out", threshold=0.3, **options)
    assert len(again.skipped) == 1 and not again.written
    with pytest.raises(MedsegError, match="predicted with threshold"):
        predict(tiny_checkpoint, source, tmp_path / "out", threshold=0.7, **options)
    # Leaving it out means the checkpoint's 0.5: also another threshold than 0.3.
    with pytest.raises(MedsegError, match="predicted with threshold"):
        predict(tiny_checkpoint, source, tmp_path / "out", **options)


def test_predict_command_passes_its_threshold(tiny_checkpoint, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(source)
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(source)]
    argv += ["--output", str(tmp_path / "out"), "--tta", "none", "--device", "cpu", "--quiet"]
    assert main([*argv, "--threshold", "0.25"]) == 0
    assert json.loads((tmp_path / "out" / RECORD_NAME).read_text())["threshold"] == 0.25
    capsys.readouterr()
    assert main([*argv, "--threshold", "2", "--overwrite"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "threshold 2.0 is not a probability" in error[0]


def test_predict_logs_plain_lines_when_stderr_is_not_a_terminal(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / f"img{index}.png")
    predict(tiny_checkpoint, folder, tmp_path / "out", device="cpu", tta="none", batch_size=2)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.strip().splitlines()[-1] == "predicting: 3/3 (100%)"


# sha256 of the decoded pixels predict wrote for `pinned_image` with the tiny checkpoint, flip
# TTA and threshold 0.503288, computed before multi-class prediction existed (commit 3a1e4c8).
# An untrained network's probabilities lie in 0.5022..0.5040 here; that cut falls in a gap
# between pixels, so the mask splits the image (29% foreground) with room for rounding.
BINARY_PINS = {
    False: {
        "in_segmentation.png": "314e71ac9f644481d9c84bba12d6ba88d47cf329db2a31e52630df3c0af9418a",
        "in_overlay.png": "9ac533f953bd7f8f4d58f00da3d254649d2a76e2b8757b7cf93f8269d57c6892",
        "in_probability.png": "4bb0c6ee79cfa1a4f5337b50840539500f98b12c132c7b999a2c7027bebe67c9",
    },
    True: {
        "in_segmentation.png": "77fea817d69e292c23b4b811c7ac4b1634ee398dcec70796edcd143fd4c2680d",
        "in_overlay.png": "038f6e32eebd5d94ee2d47b90dc6d976bef9b8e6cb548daff1a8310af5e22d5c",
        "in_probability.png": "4bb0c6ee79cfa1a4f5337b50840539500f98b12c132c7b999a2c7027bebe67c9",
    },
}


def pinned_image() -> np.ndarray:
    image = np.random.default_rng(12).integers(0, 256, (45, 71, 3), np.uint8)
    image[10:30, 20:50] //= 3
    return image


@pytest.mark.parametrize("postprocess", [False, True])
def test_binary_predictions_are_the_pixels_they_were_before_multi_class(
    tiny_checkpoint, tmp_path, postprocess
):
    Image.fromarray(pinned_image()).save(tmp_path / "in.png")
    out = tmp_path / "out"
    predict(
        tiny_checkpoint, tmp_path / "in.png", out, device="cpu", postprocess=postprocess,
        probabilities=True, overlays=True, progress=False, threshold=0.503288, precision="fp32",
    )  # fmt: skip
    hashes = {}
    for name in BINARY_PINS[postprocess]:
        with Image.open(out / name) as picture:
            assert picture.mode == ("RGB" if "overlay" in name else "L")
            hashes[name] = hashlib.sha256(np.asarray(picture).tobytes()).hexdigest()
    assert hashes == BINARY_PINS[postprocess]
    assert json.loads((out / RECORD_NAME).read_text())["tta"] == "flip"  # "auto", resolved


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_predicts_the_pinned_probabilities_within_its_rounding(
    tiny_checkpoint, tmp_path, precision
):
    Image.fromarray(pinned_image()).save(tmp_path / "in.png")
    options = {"device": "cpu", "probabilities": True, "progress": False, "tta": "none"}
    predict(tiny_checkpoint, tmp_path / "in.png", tmp_path / "fp32", precision="fp32", **options)
    predict(
        tiny_checkpoint, tmp_path / "in.png", tmp_path / "other", precision=precision, **options
    )
    expected, got = (
        np.asarray(Image.open(tmp_path / folder / "in_probability.png"), np.float64) / 255
        for folder in ("fp32", "other")
    )
    # The PNG holds probability × 255: one grey level of rounding on top of the precision's own.
    tolerance = PROBABILITY_TOLERANCE[precision] + 1 / 255
    assert np.abs(got - expected).max() <= tolerance
    record = json.loads((tmp_path / "other" / RECORD_NAME).read_text())
    assert record["tta"] == "none"


def test_visualize_command_passes_its_threshold(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    argv = ["visualize", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_root)]
    argv += ["--out", str(tmp_path / "figures"), "--device", "cpu", "--num-samples", "1"]
    assert main([*argv, "--threshold", "2"]) == 2
    assert "threshold 2.0 is not a probability" in capsys.readouterr().err
    assert main([*argv, "--threshold", "0.3", "--tta", "none"]) == 0
    assert len(list((tmp_path / "figures").iterdir())) == 1
