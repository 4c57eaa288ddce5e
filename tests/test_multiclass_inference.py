"""Prediction with a K-class checkpoint: class probabilities, arg-max label maps, TTA "auto",
per-class post-processing, grayscale input and what predict and visualize write."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medseg.api import visualize
from medseg.commands.predict import predict
from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.data.io import read_image, to_channels
from medseg.data.transforms import normalisation
from medseg.drawing import overlay, save_prediction_figure
from medseg.engine.checkpoint import save_checkpoint
from medseg.engine.runtime import Precision
from medseg.prediction.outputs import RECORD_NAME, output_names
from medseg.prediction.postprocess import keep_largest_components
from medseg.prediction.predictor import Predictor, resolve_tta

LABELS = ["background", "left lung", "heart"]
MULTI_CLASS = {
    "model.backbone": "resnet18",
    "model.pretrained": False,
    "data.image_size": 64,
    "data.labels": LABELS,
    "model.num_classes": 3,
    "data.channels": 1,
    "model.in_channels": 1,
    "data.augment": "anatomy",
}


@pytest.fixture(scope="module")
def multi_checkpoint(tmp_path_factory):
    """An untrained resnet18 for 3 classes of 64×64 gray images, trained "anatomy" (no flips)."""
    from medseg.model import DeepLabV3Plus

    config = build_config(overrides=MULTI_CLASS)
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    with torch.no_grad():
        # Untrained logits barely differ between classes; scaled up, every class wins somewhere.
        model.decoder.classifier.weight.mul_(300)
    path = tmp_path_factory.mktemp("multi-checkpoint") / "best.pt"
    save_checkpoint(
        path, {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    )
    return path


def gray_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    image[height // 4 : height // 2, width // 5 : width // 2] //= 4  # a dark region
    return image


def test_probabilities_are_k_maps_at_the_image_size_summing_to_one(multi_checkpoint):
    predictor = Predictor.from_checkpoint(multi_checkpoint, device="cpu")
    images = [gray_image(37, 53), gray_image(71, 45, seed=1)]
    probabilities = predictor.probabilities(images)
    assert [p.shape for p in probabilities] == [(3, 37, 53), (3, 71, 45)]
    for probability in probabilities:
        assert probability.dtype == np.float32
        assert probability.min() >= 0 and probability.max() <= 1
        np.testing.assert_allclose(probability.sum(0), 1, atol=1e-5)
    masks = predictor.masks(images)
    for mask, probability in zip(masks, probabilities, strict=True):
        # The arg-max of the probabilities at the image's own size, not a resized label map.
        assert mask.dtype == np.uint8 and mask.shape == probability.shape[1:]
        assert np.array_equal(mask, probability.argmax(0))
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) == {0, 1, 2}


class BandedClasses(nn.Module):
    """Logits -(x - c_k)² for normalised gray level x: each class wins nearest its centre c_k."""

    def __init__(self, centres: tuple[float, ...]):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres).view(1, -1, 1, 1))

    def forward(self, batch):
        return -((batch - self.centres) ** 2)


def banded_predictor(tta: str = "none", postprocess: bool = False) -> Predictor:
    config = build_config(overrides=MULTI_CLASS)
    return Predictor(
        BandedClasses((-2.0, 0.0, 2.0)),
        config,
        torch.device("cpu"),
        Precision("fp32", None),
        tta=tta,
        postprocess=postprocess,
    )


def test_probabilities_are_the_softmax_of_the_logits():
    image = np.zeros((64, 64, 1), np.uint8)
    image[:, 20:40] = 128
    image[:, 40:] = 255
    probability = banded_predictor().probabilities([image])[0]
    (mean,), (std,) = normalisation(1)
    for column, value in [(5, 0), (30, 128), (60, 255)]:
        x = (value / 255 - mean) / std
        logits = -((x - np.array([-2.0, 0.0, 2.0])) ** 2)
        expected = np.exp(logits) / np.exp(logits).sum()  # by hand, not torch's softmax
        np.testing.assert_allclose(probability[:, 10, column], expected, rtol=1e-5)
    labels = banded_predictor(tta="flip").masks([image])[0]
    assert (
        (labels[:, :20] == 0).all()
        and (labels[:, 21:39] == 1).all()
        and (labels[:, 41:] == 2).all()
    )


class FixedLogits(nn.Module):
    """The same (1, K, h, w) logits for every image of a batch."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, batch):
        return self.logits.expand(batch.shape[0], -1, -1, -1)


def test_a_label_map_is_the_arg_max_after_the_resize_to_the_image():
    # Left half class 1 at (0.45, 0.55, 0), right half class 2 at (0.45, 0, 0.55). Enlarged,
    # the pixels between them average to about (0.45, 0.275, 0.275): background. A resized
    # label map would jump from 1 to 2 with no background between.
    probability = np.full((3, 64, 64), 1e-6, np.float32)
    probability[0] = 0.45
    probability[1, :, :32] = probability[2, :, 32:] = 0.55
    network = FixedLogits(torch.from_numpy(np.log(probability))[None])
    predictor = banded_predictor()
    predictor.network = network
    image = np.zeros((64, 256, 1), np.uint8)
    resized = predictor.probabilities([image])[0]
    mask = predictor.masks([image])[0]
    assert resized.shape == (3, 64, 256) and np.array_equal(mask, resized.argmax(0))
    assert (mask[:, :120] == 1).all() and (mask[:, 136:] == 2).all()
    assert (mask[:, 127:129] == 0).all()  # the boundary, where neither class is sure enough


@pytest.mark.parametrize(
    ("augment", "labels", "expected"),
    [
        ("default", [], "flip"),
        ("seed", [], "flip"),
        ("anatomy", [], "none"),
        ("none", [], "none"),
        ("anatomy", LABELS, "none"),
        ("auto", [], "flip"),  # a config never planned: binary data plans "default"
        ("auto", LABELS, "none"),  # and label maps "anatomy"
    ],
)
def test_tta_auto_flips_only_where_training_flipped(augment, labels, expected):
    overrides = {"data.augment": augment}
    if labels:
        overrides.update({"data.labels": labels, "model.num_classes": len(labels)})
    config = build_config(overrides=overrides)
    assert resolve_tta("auto", config) == expected
    assert resolve_tta("d4", config) == "d4" and resolve_tta("none", config) == "none"


def test_tta_auto_is_resolved_per_checkpoint(multi_checkpoint, tiny_checkpoint):
    assert Predictor.from_checkpoint(multi_checkpoint, device="cpu").tta == "none"
    assert Predictor.from_checkpoint(tiny_checkpoint, device="cpu").tta == "flip"
    assert Predictor.from_checkpoint(multi_checkpoint, device="cpu", tta="flip").tta == "flip"
    with pytest.raises(MedsegError, match="unknown TTA mode 'sideways'"):
        Predictor.from_checkpoint(multi_checkpoint, device="cpu", tta="sideways")


def test_a_threshold_is_refused_for_a_multi_class_checkpoint(multi_checkpoint):
    with pytest.raises(MedsegError, match="applies to binary masks only") as error:
        Predictor.from_checkpoint(multi_checkpoint, device="cpu", threshold=0.3)
    assert "\n" not in str(error.value)
    assert Predictor.from_checkpoint(multi_checkpoint, device="cpu").threshold is None


def one_hot(label_map: np.ndarray, classes: int = 3, sure: float = 0.8) -> np.ndarray:
    """(K, H, W) probabilities whose arg-max is ``label_map``."""
    rest = (1 - sure) / (classes - 1)
    stack = np.full((classes, *label_map.shape), rest, dtype=np.float32)
    for value in range(classes):
        stack[value][label_map == value] = sure
    return stack


def test_postprocess_keeps_each_class_largest_region_and_fills_its_background_holes():
    labels = np.zeros((20, 20), np.uint8)
    labels[2:12, 2:12] = 1  # the large class-1 region ...
    labels[4, 4] = 0  # ... with a background hole, filled
    labels[6:9, 6:9] = 2  # ... and the large class-2 region inside it, kept
    labels[15:18, 15:18] = 1  # a small class-1 region: removed
    labels[15, 2] = 2  # a small class-2 region: removed
    labels[0, 19] = 2  # touching nothing of its class diagonally: removed too
    expected = np.zeros_like(labels)
    expected[2:12, 2:12] = 1
    expected[6:9, 6:9] = 2
    assert np.array_equal(keep_largest_components(labels), expected)
    predictor = banded_predictor(postprocess=True)
    assert np.array_equal(predictor.label_map(one_hot(labels)), expected)
    assert np.array_equal(banded_predictor().label_map(one_hot(labels)), labels)


def test_postprocess_gives_a_shared_hole_to_the_innermost_region():
    labels = np.zeros((15, 15), np.uint8)
    labels[1:14, 1:14] = 1
    labels[4:11, 4:11] = 2  # a class-2 ring inside the class-1 square ...
    labels[6:9, 6:9] = 0  # ... around background: a hole of both, given to 2
    labels[2, 2] = 0  # a hole of class 1 only
    expected = labels.copy()
    expected[6:9, 6:9] = 2
    expected[2, 2] = 1
    assert np.array_equal(keep_largest_components(labels), expected)


def test_postprocess_joins_diagonal_neighbours_and_leaves_background_alone():
    labels = np.eye(5, dtype=np.uint8) * 2  # one 8-connected class-2 region
    labels[0, 4] = 2
    expected = np.eye(5, dtype=np.uint8) * 2
    assert np.array_equal(keep_largest_components(labels), expected)
    assert not keep_largest_components(np.zeros((4, 4), np.uint8)).any()


def test_colour_and_gray_images_meet_the_models_channels(tmp_path, multi_checkpoint):
    rgb = np.random.default_rng(3).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    # The luma read_image uses: an array gives what predict gets from the file.
    assert np.array_equal(to_channels(rgb, 1), read_image(tmp_path / "colour.png", channels=1))
    gray = to_channels(rgb, 1)
    assert to_channels(gray, 1) is gray
    assert np.array_equal(to_channels(gray[..., 0], 1), gray)
    assert np.array_equal(to_channels(gray[..., 0], 3), np.repeat(gray, 3, axis=2))
    with pytest.raises(MedsegError, match="float32"):
        to_channels(rgb.astype(np.float32), 1)
    with pytest.raises(MedsegError, match=r"\(9, 7, 4\)"):
        to_channels(np.zeros((9, 7, 4), np.uint8), 3)
    predictor = Predictor.from_checkpoint(multi_checkpoint, device="cpu")
    from_colour, from_gray, from_plane = predictor.probabilities([rgb, gray, gray[..., 0]])
    assert np.array_equal(from_colour, from_gray) and np.array_equal(from_gray, from_plane)


def write_images(folder, sizes) -> list:
    folder.mkdir(parents=True)
    paths = []
    for index, (height, width) in enumerate(sizes):
        path = folder / f"case{index}.png"
        Image.fromarray(gray_image(height, width, seed=index)[..., 0]).save(path)
        paths.append(path)
    return paths


def test_predict_writes_label_maps_probabilities_and_overlays(tmp_path, multi_checkpoint):
    paths = write_images(tmp_path / "in", [(37, 53), (66, 41)])
    out = tmp_path / "out"
    options = {"device": "cpu", "progress": False, "probabilities": True, "overlays": True}
    report = predict(multi_checkpoint, tmp_path / "in", out, batch_size=1, **options)
    assert len(report.written) == 2 and not report.failed
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["tta"] == "none" and record["threshold"] is None  # "auto", resolved
    assert output_names(paths[0], probabilities=True, overlays=True, multi_class=True) == [
        "case0_probabilities.npz",
        "case0_overlay.png",
        "case0_segmentation.png",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [RECORD_NAME]
        + [
            name
            for path in paths
            for name in output_names(path, probabilities=True, overlays=True, multi_class=True)
        ]
    )
    predictor = Predictor.from_checkpoint(multi_checkpoint, device="cpu")
    for path in paths:
        image = read_image(path, channels=1)
        with Image.open(out / f"{path.stem}_segmentation.png") as picture:
            assert picture.mode == "L"
            written = np.asarray(picture)
        assert written.shape == image.shape[:2] and written.max() < len(LABELS)
        assert np.array_equal(written, predictor.masks([image])[0])
        with np.load(out / f"{path.stem}_probabilities.npz") as saved:
            assert saved["probabilities"].dtype == np.float16
            assert saved["probabilities"].shape == (3, *image.shape[:2])
            assert saved["labels"].tolist() == LABELS
            np.testing.assert_allclose(
                saved["probabilities"], predictor.probabilities([image])[0], atol=5e-4
            )
        with Image.open(out / f"{path.stem}_overlay.png") as picture:
            drawn = np.asarray(picture.convert("RGB"))
        # The overlay on top, the legend strip below it.
        assert drawn.shape[0] > image.shape[0]
        expected = overlay(image, written, LABELS)
        assert np.array_equal(drawn, expected)
    again = predict(multi_checkpoint, tmp_path / "in", out, **options)
    assert len(again.skipped) == 2 and not again.written


def test_visualize_draws_label_map_figures(tmp_path, multi_checkpoint, monkeypatch):
    data = tmp_path / "data"
    paths = write_images(data / "images", [(37, 53), (40, 40)])
    (data / "masks").mkdir()
    for path in paths:
        with Image.open(path) as picture:
            height, width = np.asarray(picture).shape
        truth = np.zeros((height, width), np.uint8)
        truth[5:20, 5:15], truth[25:35, 20:30] = 1, 2
        Image.fromarray(truth).save(data / "masks" / f"{path.stem}_segmentation.png")
    drawn = []

    def recording(path, image, truth, prediction, **options):
        drawn.append((image, truth, prediction, options))
        return save_prediction_figure(path, image, truth, prediction, **options)

    monkeypatch.setattr("medseg.api.save_prediction_figure", recording)
    written = visualize(
        checkpoint=multi_checkpoint, data=data, out=tmp_path / "figures", device="cpu"
    )
    assert [figure.name for figure in written] == ["case0_prediction.png", "case1_prediction.png"]
    with Image.open(written[0]) as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1]
    image, truth, prediction, options = drawn[0]
    assert image.shape == (37, 53, 1) and options["labels"] == LABELS
    assert truth.dtype == prediction.dtype == np.uint8 and set(np.unique(truth)) == {0, 1, 2}
    assert options["title"].startswith("case0: Dice ")
