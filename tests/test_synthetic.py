"""Tests for the synthetic demo data set."""

import cv2
import numpy as np
import pytest
from PIL import Image

from medseg.core.errors import MedsegError
from medseg.data.synthetic import (
    MAX_AREA_FRACTION,
    MIN_AREA_FRACTION,
    make_synthetic_dataset,
    synthetic_sample,
)


def _read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _read_mask(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, n_train=4, n_test=2, size=64, seed=1)


def test_layout_and_counts(dataset):
    train_ids = [f"SYN_{i:04d}" for i in range(4)]
    test_ids = [f"SYN_{i:04d}" for i in range(4, 6)]
    for split, ids in [("train", train_ids), ("test", test_ids)]:
        images = sorted(p.name for p in (dataset / split / "images").iterdir())
        masks = sorted(p.name for p in (dataset / split / "masks").iterdir())
        assert images == [f"{i}.jpg" for i in ids]
        assert masks == [f"{i}_segmentation.png" for i in ids]
    assert "SYNTHETIC" in (dataset / "README.txt").read_text()


def test_files_are_jpeg_images_and_binary_png_masks(dataset):
    for mask_path in sorted(dataset.glob("*/masks/*.png")):
        sample_id = mask_path.name.removesuffix("_segmentation.png")
        image_path = mask_path.parents[1] / "images" / f"{sample_id}.jpg"
        with Image.open(image_path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        with Image.open(mask_path) as mask:
            assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (64, 64))
        values = np.unique(_read_mask(mask_path))
        assert values.tolist() == [0, 255]


def test_lesion_area_is_within_range_and_varies():
    fractions = [synthetic_sample(np.random.default_rng(seed), 64)[1].mean() for seed in range(40)]
    assert min(fractions) >= MIN_AREA_FRACTION - 0.02
    assert max(fractions) <= MAX_AREA_FRACTION + 0.02
    assert min(fractions) < 0.15 and max(fractions) > 0.35


def test_mask_is_one_solid_region():
    # Hairs drawn over the lesion must not cut holes in or add pieces to the mask.
    for seed in range(10):
        _, mask = synthetic_sample(np.random.default_rng(seed), 96)
        count, _ = cv2.connectedComponents(mask.astype(np.uint8))
        holes, _ = cv2.connectedComponents((~mask).astype(np.uint8))
        assert count == 2 and holes == 2


def test_lesion_is_darker_than_skin():
    for seed in range(20):
        image, mask = synthetic_sample(np.random.default_rng(seed), 64)
        grey = image.mean(axis=2)
        assert grey[mask].mean() < grey[~mask].mean() - 5


def test_sample_shapes_and_types():
    image, mask = synthetic_sample(np.random.default_rng(0), 80)
    assert image.shape == (80, 80, 3) and image.dtype == np.uint8
    assert mask.shape == (80, 80) and mask.dtype == bool


def test_same_seed_gives_same_sample_and_other_seed_differs():
    image_a, mask_a = synthetic_sample(np.random.default_rng(5), 64)
    image_b, mask_b = synthetic_sample(np.random.default_rng(5), 64)
    image_c, mask_c = synthetic_sample(np.random.default_rng(6), 64)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c)


def test_dataset_is_deterministic(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", n_train=2, n_test=1, size=48, seed=3)
    second = make_synthetic_dataset(tmp_path / "b", n_train=2, n_test=1, size=48, seed=3)
    other = make_synthetic_dataset(tmp_path / "c", n_train=2, n_test=1, size=48, seed=4)
    masks = sorted(p.relative_to(first) for p in first.glob("*/masks/*.png"))
    assert len(masks) == 3
    for relative in masks:
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    for image_path in first.glob("*/images/*.jpg"):
        relative = image_path.relative_to(first)
        np.testing.assert_array_equal(_read_rgb(image_path), _read_rgb(second / relative))
    mask_name = "train/masks/SYN_0000_segmentation.png"
    assert (first / mask_name).read_bytes() != (other / mask_name).read_bytes()


def test_sample_does_not_depend_on_dataset_size(tmp_path):
    small = make_synthetic_dataset(tmp_path / "small", n_train=1, n_test=0, size=48, seed=2)
    large = make_synthetic_dataset(tmp_path / "large", n_train=3, n_test=1, size=48, seed=2)
    name = "train/masks/SYN_0000_segmentation.png"
    assert (small / name).read_bytes() == (large / name).read_bytes()


@pytest.mark.parametrize(
    "kwargs", [{"n_train": 0}, {"n_test": -1}, {"size": 16}], ids=["no-train", "neg-test", "tiny"]
)
def test_bad_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(MedsegError):
        make_synthetic_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
