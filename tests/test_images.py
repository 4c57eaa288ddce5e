"""Images from the real world: EXIF orientation, predict writing into its own input folder,
odd shapes on both backends, and the memory of a large image at its own resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROBABILITY_TOLERANCE
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from medseg.cli import main
from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.data.folder import Sample, check_pair
from medseg.data.io import image_size, read_image, read_mask
from medseg.engine.runtime import Precision
from medseg.engine.sliding_window import blend_tiles, sliding_window
from medseg.prediction.outputs import (
    OUTPUT_SUFFIXES,
    RECORD_NAME,
    collect_inputs,
    output_names,
)
from medseg.prediction.predictor import Predictor

# -- EXIF orientation --------------------------------------------------------------------------

ROTATED = 6  # EXIF orientation 6: stored sideways, shown turned 90° clockwise


def sideways_jpeg(path, array: np.ndarray, orientation: int = ROTATED):
    """Save ``array`` (stored H × W) as a JPEG that a viewer shows turned by ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=100, subsampling=0)
    return path


def corner_block(height: int, width: int, channels: int = 0) -> np.ndarray:
    """A black picture with a white 8 × 12 block in its top-left corner, as stored."""
    array = np.zeros((height, width, channels) if channels else (height, width), np.uint8)
    array[:8, :12] = 255
    return array


def test_an_exif_turned_jpeg_is_read_as_it_is_shown_image_and_mask(tmp_path):
    stored = corner_block(40, 64, channels=3)  # landscape as stored
    image = read_image(sideways_jpeg(tmp_path / "photo.jpg", stored))
    mask = read_mask(sideways_jpeg(tmp_path / "mask.jpg", corner_block(40, 64)))
    # Shown turned clockwise: portrait, and the top-left block now at the top right.
    assert image.shape == (64, 40, 3) and mask.shape == (64, 40)
    assert image_size(tmp_path / "photo.jpg") == (64, 40)
    np.testing.assert_array_equal(mask, np.rot90(corner_block(40, 64) > 127, k=-1))
    assert image[:12, -8:].min() > 200 and image[12:, :].max() < 60
    # Orientation 1 (as stored) and no EXIF at all read as stored.
    assert read_image(sideways_jpeg(tmp_path / "upright.jpg", stored, 1)).shape == (40, 64, 3)


def test_a_mask_drawn_on_the_shown_photo_pairs_with_it(tmp_path):
    photo = sideways_jpeg(tmp_path / "photo.jpg", corner_block(40, 64, channels=3))
    shown = tmp_path / "shown_segmentation.png"
    Image.fromarray(np.rot90(corner_block(40, 64), k=-1).copy()).save(shown)
    check_pair(Sample(image=photo, mask=shown, id="photo"))  # 40 × 64 both, as shown
    stored = tmp_path / "stored_segmentation.png"
    Image.fromarray(corner_block(40, 64)).save(stored)
    with pytest.raises(MedsegError, match="is 64×40 but image photo.jpg is 40×64"):
        check_pair(Sample(image=photo, mask=stored, id="photo"))


def test_predict_writes_masks_and_overlays_of_the_shown_size(tiny_checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    sideways_jpeg(images / "photo.jpg", corner_block(40, 64, channels=3))
    out = tmp_path / "out"
    flags = ["--tta", "none", "--overlay", "--quiet"]
    command = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(images)]
    assert main([*command, "--out", str(out), *flags]) == 0
    for name in ("photo_segmentation.png", "photo_overlay.png"):
        with Image.open(out / name) as written:
            assert written.size == (40, 64), name  # PIL: (width, height) as shown


# -- predict with --out equal to --input -------------------------------------------------------


def test_predict_into_its_own_input_folder_never_segments_its_outputs(tiny_checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    command = [
        *("predict", "--checkpoint", str(tiny_checkpoint), "--input", str(folder)),
        *("--out", str(folder), "--tta", "none", "--overlay", "--probabilities", "--quiet"),
    ]
    assert main(command) == 0
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert main(command) == 0
    after = sorted(path.name for path in folder.iterdir())
    assert after == sorted(
        [RECORD_NAME, "a.png", "b.png"]
        + [
            f"{name}_{kind}.png"
            for name in "ab"
            for kind in ("overlay", "probability", "segmentation")
        ]
    )
    assert not any("_segmentation_" in name for name in after)
    # The second run found every mask done: nothing was written again.
    assert {name: written[name] for name in after if name != RECORD_NAME} == {
        path.name: path.stat().st_mtime_ns for path in folder.iterdir() if path.name != RECORD_NAME
    }
    assert [path.name for path in collect_inputs(folder)] == ["a.png", "b.png"]


def test_files_named_like_outputs_are_inputs_where_predict_never_wrote(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    for name in ("case_segmentation.png", "case_overlay.png", "case.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)
    everything = ["case.png", "case_overlay.png", "case_segmentation.png"]
    assert [path.name for path in collect_inputs(folder)] == everything
    assert collect_inputs(folder / "case_segmentation.png") == [folder / "case_segmentation.png"]
    (folder / RECORD_NAME).write_text("{}")  # predict wrote here: its outputs are not inputs
    assert [path.name for path in collect_inputs(folder)] == ["case.png"]
    (folder / "case.png").unlink()
    with pytest.raises(MedsegError, match="holds only medseg predict's own outputs"):
        collect_inputs(folder)


@pytest.mark.parametrize("multi_class", [False, True])
def test_every_name_predict_writes_ends_as_collect_inputs_expects(multi_class):
    names = output_names(Path("x.png"), probabilities=True, overlays=True, multi_class=multi_class)
    assert all(name.endswith(OUTPUT_SUFFIXES) for name in names), names


# -- odd shapes, on both backends --------------------------------------------------------------

ODD_SHAPES = [(1, 1), (20, 20), (10, 4000), (4000, 10)]
MODELS = {
    "binary": {},
    "six classes, gray": {
        "data.labels": ["background", "a", "b", "c", "d", "e"],
        "model.num_classes": 6,
        "data.channels": 1,
        "model.in_channels": 1,
    },
    "binary patches": {"data.mode": "patch", "model.decoder_stride": 2, "model.pooling_window": 64},
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """(checkpoint, ONNX export folder) of an untrained resnet18 for 64-pixel inputs."""
    from medseg import api
    from medseg.config import build_config
    from medseg.engine.checkpoint import save_checkpoint
    from medseg.model import DeepLabV3Plus

    overrides = {"model.backbone": "resnet18", "model.pretrained": False, "data.image_size": 64}
    config = build_config(overrides={**overrides, **MODELS[request.param]})
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    folder = tmp_path_factory.mktemp("odd-shapes")
    checkpoint = folder / "best.pt"
    state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    save_checkpoint(checkpoint, state)
    api.export(checkpoint=checkpoint, out=folder / "onnx", format="onnx")
    return checkpoint, folder / "onnx"


def odd_images(channels: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*shape, channels), dtype=np.uint8) for shape in ODD_SHAPES]


def test_both_backends_segment_odd_shapes_alike(exported):
    pytest.importorskip("onnxruntime")
    checkpoint, onnx = exported
    by_torch = Predictor.from_checkpoint(checkpoint, device="cpu", tta="none", precision="fp32")
    by_onnx = Predictor.from_checkpoint(onnx, tta="none")
    images = odd_images()
    for image, expected, got in zip(
        images, by_torch.probabilities(images), by_onnx.probabilities(images), strict=True
    ):
        assert got.shape[-2:] == image.shape[:2]
        np.testing.assert_allclose(got, expected, atol=PROBABILITY_TOLERANCE["fp32"])
        assert by_onnx.to_mask(got).shape == image.shape[:2]


def test_predict_writes_a_mask_of_each_odd_shape_on_both_backends(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "odd"
    folder.mkdir()
    for image, (height, width) in zip(odd_images(), ODD_SHAPES, strict=True):
        Image.fromarray(image).save(folder / f"odd_{height}x{width}.png")
    for model in exported:
        out = tmp_path / f"masks-{model.name}"
        command = ["predict", "--checkpoint", str(model), "--input", str(folder)]
        assert main([*command, "--out", str(out), "--tta", "none", "--quiet"]) == 0
        for height, width in ODD_SHAPES:
            with Image.open(out / f"odd_{height}x{width}_segmentation.png") as mask:
                assert mask.size == (width, height)


# -- a large image at its own resolution: what the sliding window holds ------------------------


class FreshTensors(TorchDispatchMode):
    """Records every tensor an operation allocates (not views, not in-place results):
    (bytes, dtype, shape, operation). ``paused`` skips what runs inside the network."""

    def __init__(self):
        super().__init__()
        self.fresh: list[tuple[int, torch.dtype, tuple[int, ...], str]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            inputs = {
                tensor.untyped_storage().data_ptr()
                for tensor in tree_flatten((args, kwargs))[0]
                if isinstance(tensor, torch.Tensor)
            }
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor) and (
                    tensor.untyped_storage().data_ptr() not in inputs
                ):
                    nbytes = tensor.untyped_storage().nbytes()
                    self.fresh.append((nbytes, tensor.dtype, tuple(tensor.shape), str(func)))
        return out


def pointwise_patch_predictor(classes: int = 1) -> Predictor:
    """A patch model's Predictor (256-pixel patches, 384-pixel tiles, one tile per call) whose
    network is a 1 × 1 convolution: what matters here is what surrounds the network."""
    labels = {} if classes == 1 else {"data.labels": [f"c{k}" for k in range(classes)]}
    config = build_config(
        overrides={
            "data.mode": "patch", "data.image_size": 256, "model.num_classes": classes, **labels
        }
    )  # fmt: skip
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, classes, 1)
    precision = Precision("fp32", None)
    return Predictor(network, config, torch.device("cpu"), precision, tta="none", tile_batch=1)


@pytest.mark.parametrize("classes", [1, 3])
def test_a_large_image_is_blended_into_one_float32_map_and_no_other_whole_image_copy(
    classes, monkeypatch
):
    predictor = pointwise_patch_predictor(classes)
    height, width = 2048, 1536  # 3.1 megapixels: a float32 map of it is 12 MiB
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    # What the predictor did before: the whole image normalised as one float tensor, blended.
    with torch.no_grad():
        expected = sliding_window(predictor._scores, predictor.preprocess([image]), tile=384)[0]
    seen, recorder = [], FreshTensors()
    transform, network = predictor.transform, predictor.network

    def run_unrecorded(tiles):
        recorder.paused = True
        try:
            return network(tiles)
        finally:
            recorder.paused = False

    monkeypatch.setattr(predictor, "network", run_unrecorded)
    monkeypatch.setattr(
        predictor, "transform", lambda image: seen.append(image.shape[:2]) or transform(image=image)
    )
    with recorder:
        probability = predictor.probabilities([image])[0]
    whole_map = 4 * height * width
    large = [fresh for fresh in recorder.fresh if fresh[0] >= whole_map // 2]
    # The policy: one float32 (1, K, H, W) sum, which becomes the result in place.
    assert [(nbytes, dtype, shape) for nbytes, dtype, shape, _ in large] == [
        (whole_map * classes, torch.float32, (1, classes, height, width))
    ], large
    assert max(rows * columns for rows, columns in seen) <= 384 * 384  # tiles, never the image
    assert probability.dtype == np.float32
    assert probability.shape == ((height, width) if classes == 1 else (classes, height, width))
    np.testing.assert_allclose(probability, expected.squeeze(0).numpy(), atol=1e-6)


def test_tiles_are_summed_in_place_into_the_float32_result():
    images = torch.randn(1, 3, 150, 211)
    result = blend_tiles(
        lambda tiles: tiles[:, :2] * 2, lambda index, top, left: images[index, :, top : top + 64, left : left + 64],
        count=1, size=(150, 211), tile=64, tile_batch=5,
    )  # fmt: skip
    assert result.dtype == torch.float32 and result.shape == (1, 2, 150, 211)
    torch.testing.assert_close(result, images[:, :2] * 2, rtol=1e-5, atol=1e-5)
