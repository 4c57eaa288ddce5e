"""Patch training at the images' own resolution: the plan, the cache, patch sampling, and a
patch-trained model predicting whole images by sliding window (`medseg.engine.sliding_window`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PRECISIONS, PROBABILITY_TOLERANCE
from PIL import Image

from medseg.cli import main
from medseg.config import build_config, config_from_saved
from medseg.data.cache import Ragged, prepare
from medseg.data.folder import SegmentationFolder, find_pairs
from medseg.data.patches import PatchFolder, cut_patch, patch_corner, patches_per_image
from medseg.data.plan import plan
from medseg.data.transforms import train_transform
from medseg.prediction import resolve_tta
from medseg.prediction.predictor import Predictor


def write_vessel_set(root: Path, *, n_train: int = 6, n_test: int = 2, shape=(150, 170), seed=0):
    """Images of their own (non-square) size with 1-2 pixel wide dark lines as the foreground:
    structures that a resize to a small square erases."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            mask = np.zeros(shape, dtype=np.uint8)
            for _ in range(6):
                row = int(rng.integers(5, shape[0] - 5))
                mask[row : row + int(rng.integers(1, 3)), 10 : shape[1] - 10] = 1
                column = int(rng.integers(5, shape[1] - 5))
                mask[10 : shape[0] - 10, column : column + 1] = 1
            image = np.full((*shape, 3), 200, dtype=np.uint8)
            image[mask == 1] = (60, 20, 20)
            image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"v{index}.png")
            Image.fromarray(mask * 255).save(root / split / "masks" / f"v{index}_segmentation.png")
    return root


@pytest.fixture
def vessel_root(tmp_path):
    return write_vessel_set(tmp_path / "vessels")


# -- the plan ---------------------------------------------------------------------------------


def test_thin_structures_plan_patches_and_blobs_plan_a_resize(vessel_root, synthetic_root, capsys):
    planned = plan(build_config(), vessel_root)
    assert (planned.data.mode, planned.data.image_size) == ("patch", 128)  # 150 // 32 * 32
    printed = capsys.readouterr().out
    assert "patches of 128×128 at the images' own resolution" in printed
    assert planned.model.decoder_stride == 2 and "decoder at stride 2" in printed
    assert planned.model.pooling_window == 128 and "image pooling over 128-pixel" in printed
    # No zoom or blur to change what a one-pixel structure is; flips stay, and so flip TTA.
    assert planned.data.augment == "thin" and "augmentation 'thin'" in printed
    assert resolve_tta("auto", planned) == "flip"
    blobs = plan(build_config(), synthetic_root)
    assert blobs.data.mode == "resize" and blobs.data.image_size > 0
    assert blobs.model.decoder_stride == 4 and blobs.model.pooling_window == 0  # global
    assert blobs.data.augment == "default"


def test_the_mode_and_size_a_config_sets_are_kept(vessel_root):
    resized = plan(build_config(overrides={"data.mode": "resize"}), vessel_root)
    assert resized.data.mode == "resize" and resized.data.image_size > 0
    patches = plan(build_config(overrides={"data.image_size": 64}), vessel_root)
    assert (patches.data.mode, patches.data.image_size) == ("patch", 64)
    papers = plan(build_config(overrides={"model.decoder_stride": 4}), vessel_root)
    assert (papers.data.mode, papers.model.decoder_stride) == ("patch", 4)
    wider = plan(build_config(overrides={"model.pooling_window": 512}), vessel_root)
    assert wider.model.pooling_window == 512


def test_runs_saved_before_patch_training_read_as_resized():
    saved = build_config(overrides={"data.image_size": 160}).to_dict()
    del saved["data"]["mode"]
    assert config_from_saved(saved, source="old run").data.mode == "resize"


# -- the cache at the images' own size ---------------------------------------------------------


def test_the_native_cache_keeps_each_image_at_its_own_size_memory_mapped(tmp_path):
    root = tmp_path / "mixed" / "train"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    shapes = [(40, 70), (90, 33), (64, 64)]
    for index, shape in enumerate(shapes):
        image = np.random.default_rng(index).integers(0, 255, (*shape, 3), dtype=np.uint8)
        mask = np.zeros(shape, np.uint8)
        mask[5:9, 3:20] = 255
        Image.fromarray(image).save(root / "images" / f"m{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"m{index}_segmentation.png")
    pairs = find_pairs(root)
    cache = prepare(pairs, size=0, progress=False)
    assert isinstance(cache.images, Ragged) and isinstance(cache.images.flat, np.memmap)
    for index, shape in enumerate(shapes):
        image, mask = cache.get(index)
        expected = np.asarray(Image.open(root / "images" / f"m{index}.png"))
        assert np.array_equal(image, expected) and mask.shape == shape
        assert mask[5:9, 3:20].all() and mask.sum() == 4 * 17
    share = prepare(pairs[1:], size=0, progress=False)  # the same cache, two of its rows
    assert [share.get(i)[1].shape for i in range(2)] == shapes[1:]
    assert share.images.flat.filename == cache.images.flat.filename


def test_a_truncated_native_cache_is_rebuilt(tmp_path, capsys):
    root = write_vessel_set(tmp_path / "v", n_train=2, n_test=0)
    pairs = find_pairs(root / "train")
    cache = prepare(pairs, size=0, progress=False)
    path = Path(cache.images.flat.filename)
    del cache
    path.write_bytes(path.read_bytes()[:100])
    rebuilt = prepare(pairs, size=0, progress=False)
    assert rebuilt.get(1)[0].shape == (150, 170, 3)
    assert "was damaged" in capsys.readouterr().err


# -- patch sampling ---------------------------------------------------------------------------


def test_foreground_patches_contain_foreground_and_others_fall_anywhere():
    target = np.zeros((300, 400), np.uint8)
    target[250:252, 30:32] = 1  # one 2×2 spot, far from the middle
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left = patch_corner(target, 64, rng, foreground=True)
        assert cut_patch(target, top, left, 64).sum() >= 1  # the drawn pixel, at least
        assert 0 <= top <= 300 - 64 and 0 <= left <= 400 - 64
    uniform = [
        cut_patch(target, *patch_corner(target, 64, rng, foreground=False), 64).any()
        for _ in range(400)
    ]
    # A uniformly placed 64×64 patch holds the spot with probability about 63·63 / (237·337).
    assert 0 < np.mean(uniform) < 0.15


def test_foreground_patches_draw_each_present_class():
    target = np.zeros((200, 200), np.uint8)
    target[:, :150] = 1  # a large class
    target[190:192, 190:192] = 2  # a rare one
    rng = np.random.default_rng(1)
    rare = [
        cut_patch(target, *patch_corner(target, 32, rng, foreground=True), 32) for _ in range(200)
    ]
    share = np.mean([(patch == 2).any() for patch in rare])
    assert 0.35 < share < 0.65  # half the foreground patches go to each class


def test_the_foreground_fraction_sets_the_share_of_patches_with_foreground(tmp_path):
    root = tmp_path / "spot" / "train"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    mask = np.zeros((256, 256), np.uint8)
    mask[200:204, 20:24] = 255
    for index in range(2):
        Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "images" / f"s{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{index}_segmentation.png")
    pairs = find_pairs(root)
    images = SegmentationFolder(
        pairs, train_transform(32, "none"), cache=prepare(pairs, size=0, progress=False)
    )
    for fraction in (0.0, 0.5, 1.0):
        patches = PatchFolder(images, size=32, per_image=600, foreground_fraction=fraction)
        held = np.mean([patches[(i, i)]["mask"].any().item() for i in range(len(patches))])
        chance = (32 + 3) ** 2 / (256 - 31) ** 2  # a uniform patch holding part of the spot
        assert abs(held - (fraction + (1 - fraction) * chance)) < 0.05  # 3.5 sigma at 1200


def test_small_images_give_padded_patches_and_an_epoch_covers_the_mean_area():
    image = np.ones((20, 30, 3), np.uint8)
    patch = cut_patch(image, 0, 0, 32)
    assert patch.shape == (32, 32, 3) and patch.sum() == 20 * 30 * 3
    assert patch_corner(
        np.zeros((20, 30), np.uint8), 32, np.random.default_rng(0), foreground=False
    ) == (0, 0)
    assert patches_per_image([(565, 584), (565, 584)], 256) == 6
    assert patches_per_image([(100, 100)], 256) == 1


# -- training on patches and predicting by sliding window --------------------------------------


def test_a_patch_trained_run_predicts_and_evaluates_whole_images(vessel_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    assert (
        main(["train", "--data", str(vessel_root), "--out", str(run), *tiny_flags, "--epochs", "2"])
        == 0
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["mode"] == "patch" and saved["data"]["image_size"] == 64
    assert saved["model"]["decoder_stride"] == 2 and saved["model"]["pooling_window"] == 64
    out = tmp_path / "masks"
    test_images = vessel_root / "test" / "images"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run),
                "--input",
                str(test_images),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    mask = np.asarray(Image.open(out / "v0_segmentation.png"))
    assert mask.shape == (150, 170)  # the image's own size, no resize on the way
    evaluation = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--data",
                str(vessel_root),
                "--out",
                str(evaluation),
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["images"] == 2 and 0 <= summary["dice"] <= 1


def test_the_predictor_of_a_patch_model_tiles_each_image(
    vessel_root, tmp_path, tiny_flags, monkeypatch
):
    run = tmp_path / "run"
    assert (
        main(["train", "--data", str(vessel_root), "--out", str(run), *tiny_flags, "--epochs", "1"])
        == 0
    )
    predictor = Predictor.from_checkpoint(run, tta="none")
    assert predictor.patches
    seen = []
    network = predictor.network
    monkeypatch.setattr(
        predictor, "network", lambda batch: seen.append(tuple(batch.shape)) or network(batch)
    )
    image = np.asarray(Image.open(vessel_root / "test" / "images" / "v0.png"))
    probability = predictor.probabilities([image])[0]
    assert probability.shape == (150, 170)
    # 150 × 170 in tiles of 1.5 patches (96 pixels) at half overlap: 3 rows × 3 columns, in
    # batches of 8.
    assert seen == [(8, 3, 96, 96), (1, 3, 96, 96)]
    torch.testing.assert_close(torch.from_numpy(probability).min() >= 0, torch.tensor(True))


def test_medseg_prepare_fills_the_native_cache_that_patch_training_reads(
    vessel_root, tmp_path, tiny_flags, capsys
):
    assert main(["prepare", str(vessel_root)]) == 0
    assert "cached" in capsys.readouterr().out
    folders = {path.parent for path in Path(os.environ["MEDSEG_CACHE_DIR"]).rglob("images.bin")}
    assert len(folders) == 2  # train/ and test/, each at the images' own size
    run = tmp_path / "run"
    flags = [*tiny_flags, "--epochs", "1"]
    assert main(["train", "--data", str(vessel_root), "--out", str(run), *flags]) == 0
    assert "preparing" not in capsys.readouterr().err  # the cache was ready
    assert {
        path.parent for path in Path(os.environ["MEDSEG_CACHE_DIR"]).rglob("images.bin")
    } == folders


def test_an_onnx_export_of_a_patch_model_predicts_by_sliding_window(
    vessel_root, tmp_path, tiny_flags
):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    assert (
        main(["train", "--data", str(vessel_root), "--out", str(run), *tiny_flags, "--epochs", "1"])
        == 0
    )
    export = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(export)]) == 0
    image = np.asarray(Image.open(vessel_root / "test" / "images" / "v0.png"))
    exported = Predictor.from_checkpoint(export, tta="none")
    assert exported.patches
    by_onnx = exported.probabilities([image])[0]
    assert by_onnx.shape == (150, 170)
    # onnxruntime computes in float32: PyTorch in each precision, within that precision's rounding.
    for precision in PRECISIONS:
        torch_path = Predictor.from_checkpoint(run, tta="none", precision=precision)
        by_torch = torch_path.probabilities([image])[0]
        np.testing.assert_allclose(by_onnx, by_torch, atol=PROBABILITY_TOLERANCE[precision])
    card = (export / "README.md").read_text()
    assert "in Gaussian-weighted overlapping tiles of 96×96 (trained on 64×64 patches)" in card
    assert "image pooling over 64×64 windows" in card
    assert "logits at stride 2" in card


def test_an_unwritable_cache_folder_keeps_the_native_arrays_in_memory(tmp_path, monkeypatch):
    import medseg.data.cache as cache

    monkeypatch.setattr(cache, "_writable", lambda folder: False)
    root = write_vessel_set(tmp_path / "v", n_train=2, n_test=0)
    prepared = prepare(find_pairs(root / "train"), size=0, progress=False)
    assert not isinstance(prepared.images.flat, np.memmap)
    image, mask = prepared.get(1)
    expected = np.asarray(Image.open(root / "train" / "images" / "v1.png"))
    assert np.array_equal(image, expected) and mask.shape == (150, 170)
