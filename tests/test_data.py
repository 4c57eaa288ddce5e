"""Reading images and masks, pairing folders, the split, the prepared cache, sampler, dataset."""

import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import medseg.data.cache as cache_module
from medseg.core.errors import MedsegError
from medseg.data.cache import cache_root, prepare
from medseg.data.folder import (
    SegmentationFolder,
    check_pair,
    find_pairs,
    train_val_samples,
)
from medseg.data.io import read_image, read_mask
from medseg.data.sampler import EpochSampler
from medseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

# --- read_image / read_mask ---------------------------------------------------------------


def save(array, path):
    Image.fromarray(array).save(path)
    return path


def test_read_image_rgb(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = read_image(save(pixels, tmp_path / "rgb.png"))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, pixels)


def test_read_image_grayscale_is_repeated_to_three_channels(tmp_path):
    pixels = np.array([[0, 100], [200, 255]], np.uint8)
    image = read_image(save(pixels, tmp_path / "gray.png"))
    assert image.shape == (2, 2, 3)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(pixels[..., None], 3, axis=2))


def test_read_image_rgba_is_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    image = read_image(save(pixels, tmp_path / "rgba.png"))
    assert image.shape == (1, 3, 3)
    np.testing.assert_array_equal(image[0, 0], [255, 255, 255])  # fully transparent: white
    np.testing.assert_array_equal(image[0, 1], [0, 0, 255])  # opaque: unchanged
    np.testing.assert_allclose(image[0, 2], [127, 127, 127], atol=1)  # half black on white


def test_read_image_palette(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    palette.putdata([2, 0, 1])
    palette.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[0], [[10, 20, 30], [255, 0, 0], [0, 128, 0]])


def test_read_image_palette_with_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putdata([0, 1])
    palette.save(tmp_path / "palette.png", transparency=0)
    image = read_image(tmp_path / "palette.png")
    np.testing.assert_array_equal(image[0], [[255, 255, 255], [0, 0, 255]])


def test_read_image_16_bit_scales_the_full_range(tmp_path):
    pixels = np.array([[0, 65535], [32768, 1028]], np.uint16)
    path = save(pixels, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    image = read_image(path)
    assert image.shape == (2, 2, 3)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], [[0, 255], [128, 4]])  # rounded
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_read_image_windows_a_12_bit_radiograph_to_its_own_range(tmp_path):
    pixels = np.array([[100, 4095], [2097, 100]], np.uint16)  # 12 bits used of 16
    image = read_image(save(pixels, tmp_path / "xray.png"), channels=1)
    np.testing.assert_array_equal(image[..., 0], [[0, 255], [127, 0]])  # not 0..15: black


def test_read_mask_cuts_8_bit_masks_at_half(tmp_path):
    pixels = np.array([[0, 127, 128, 255]], np.uint8)
    mask = read_mask(save(pixels, tmp_path / "mask.png"))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, [[False, False, True, True]])


def test_read_mask_keeps_0_1_masks(tmp_path):
    pixels = np.array([[0, 1], [1, 0]], np.uint8)
    mask = read_mask(save(pixels, tmp_path / "mask.png"))
    np.testing.assert_array_equal(mask, [[False, True], [True, False]])


def test_read_mask_16_bit_and_rgb(tmp_path):
    deep = read_mask(save(np.array([[0, 30000, 40000]], np.uint16), tmp_path / "deep.png"))
    np.testing.assert_array_equal(deep, [[False, False, True]])
    colour = np.zeros((1, 2, 3), np.uint8)
    colour[0, 1] = 255
    rgb = read_mask(save(colour, tmp_path / "rgb.png"))
    np.testing.assert_array_equal(rgb, [[False, True]])


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "ISIC_empty.png"
    path.write_bytes(b"")
    with pytest.raises(MedsegError, match="ISIC_empty.png is empty"):
        read_image(path)


def test_non_image_file_is_named(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(MedsegError, match="notes.jpg is not an image"):
        read_mask(path)


def test_truncated_jpeg_is_named(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = save(pixels, tmp_path / "whole.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MedsegError, match="cut.jpg is corrupt or truncated"):
        read_image(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MedsegError, match="file not found: .*gone.png"):
        read_image(tmp_path / "gone.png")


def test_real_isic_pair_reads(small_isic):
    image_path = sorted((small_isic / "train" / "images").iterdir())[0]
    image = read_image(image_path)
    mask = read_mask(small_isic / "train" / "masks" / f"{image_path.stem}_segmentation.png")
    assert image.shape == (256, 256, 3)
    assert mask.shape == (256, 256)
    assert 0 < mask.mean() < 1


# --- pairing and splitting -----------------------------------------------------------------


def test_find_pairs_matches_by_id(synthetic_root):
    samples = find_pairs(synthetic_root / "train")
    assert [s.id for s in samples] == [f"SYN_{i:04d}" for i in range(12)]
    for sample in samples:
        assert sample.image.name == f"{sample.id}.jpg"
        assert sample.mask.name == f"{sample.id}_segmentation.png"
        assert sample.mask.parent == synthetic_root / "train" / "masks"


def test_find_pairs_on_real_data(small_isic):
    samples = find_pairs(small_isic / "test")
    assert len(samples) == 4
    assert all(s.id.startswith("ISIC_") and s.mask.stem == f"{s.id}_segmentation" for s in samples)


def test_image_without_mask_is_named(synthetic_root):
    (synthetic_root / "train" / "masks" / "SYN_0003_segmentation.png").unlink()
    with pytest.raises(MedsegError, match="1 images without a mask: SYN_0003.jpg;"):
        find_pairs(synthetic_root / "train")


def test_many_orphans_are_summarised(synthetic_root):
    for i in range(7):
        (synthetic_root / "train" / "masks" / f"SYN_{i:04d}_segmentation.png").unlink()
    expected = "7 images without a mask: SYN_0000.jpg, SYN_0001.jpg, SYN_0002.jpg, SYN_0003.jpg, SYN_0004.jpg and 2 more"
    with pytest.raises(MedsegError, match=expected):
        find_pairs(synthetic_root / "train")


def test_mask_without_image_is_named(synthetic_root):
    masks = synthetic_root / "train" / "masks"
    shutil.copyfile(masks / "SYN_0000_segmentation.png", masks / "SYN_0099_segmentation.png")
    with pytest.raises(MedsegError, match="1 masks without an image: SYN_0099_segmentation.png"):
        find_pairs(synthetic_root / "train")


def test_mask_with_another_suffix_is_named(synthetic_root):
    masks = synthetic_root / "train" / "masks"
    shutil.copyfile(masks / "SYN_0000_segmentation.png", masks / "SYN_0000_mask.png")
    with pytest.raises(MedsegError, match="1 masks without an image: SYN_0000_mask.png"):
        find_pairs(synthetic_root / "train")


def test_folder_without_masks_is_refused(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(MedsegError, match="masks is not a folder"):
        find_pairs(tmp_path / "train")


def split_ids(root, seed, fraction=0.25):
    train, val = train_val_samples(
        root, mask_suffix="_segmentation", val_fraction=fraction, seed=seed
    )
    return [s.id for s in train], [s.id for s in val]


def test_validation_split_is_seeded_and_disjoint(synthetic_root):
    train, val = split_ids(synthetic_root, seed=0)
    assert (train, val) == split_ids(synthetic_root, seed=0)
    assert len(val) == 3  # round(0.25 × 12)
    assert not set(train) & set(val)
    assert sorted(train + val) == [f"SYN_{i:04d}" for i in range(12)]  # test/ never used
    assert split_ids(synthetic_root, seed=1)[1] != val


def test_tiny_fraction_still_holds_one_out(synthetic_root):
    train, val = split_ids(synthetic_root, seed=0, fraction=0.01)
    assert (len(train), len(val)) == (11, 1)


def test_val_folder_is_used_when_present(synthetic_root):
    shutil.copytree(synthetic_root / "test", synthetic_root / "val")
    train, val = split_ids(synthetic_root, seed=0)
    assert train == [f"SYN_{i:04d}" for i in range(12)]
    assert val == [f"SYN_{i:04d}" for i in range(12, 16)]


def test_split_of_real_data(small_isic):
    train, val = split_ids(small_isic, seed=0, fraction=0.1)
    assert (len(train), len(val)) == (11, 1)


def test_check_pair_names_both_sizes(synthetic_root):
    sample = find_pairs(synthetic_root / "train")[0]
    Image.new("L", (32, 16)).save(sample.mask)
    expected = "mask SYN_0000_segmentation.png is 32×16 but image SYN_0000.jpg is 64×64"
    with pytest.raises(MedsegError, match=expected):
        check_pair(sample)
    with pytest.raises(MedsegError, match=expected):
        SegmentationFolder([sample], eval_transform(32))[0]


# --- prepared cache ------------------------------------------------------------------------


@pytest.fixture
def samples(synthetic_root):
    return find_pairs(synthetic_root / "train")


def cache_folders():
    return sorted(path.name for path in cache_root().iterdir())


def count_reads(monkeypatch):
    calls = []

    def counting(path, **options):
        calls.append(path)
        return read_image(path, **options)

    monkeypatch.setattr(cache_module, "read_image", counting)
    return calls


def test_prepare_resizes_every_pair(samples):
    cache = prepare(samples, size=32, progress=False)
    assert cache.images.shape == (12, 32, 32, 3)
    assert cache.masks.shape == (12, 32, 32)
    assert cache.bad == []
    assert [s.id for s in cache.samples] == [s.id for s in samples]
    image, mask = cache.get(5)
    expected = cv2.resize(read_image(samples[5].image), (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(image, expected)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}  # class values
    full_mask = read_mask(samples[5].mask)
    assert abs(mask.mean() - full_mask.mean()) < 0.03


def test_prepare_builds_once_then_reuses(samples, monkeypatch):
    first = prepare(samples, size=32, progress=False)

    def fail(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(cache_module, "read_image", fail)
    second = prepare(samples, size=32, progress=False)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.masks, first.masks)
    assert len(cache_folders()) == 1


def test_prepare_rebuilds_when_a_file_is_touched(samples, monkeypatch):
    prepare(samples, size=32, progress=False)
    stat = samples[4].image.stat()
    os.utime(samples[4].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reads = count_reads(monkeypatch)
    prepare(samples, size=32, progress=False)
    assert len(reads) == 12
    assert len(cache_folders()) == 2


def test_prepare_sees_new_content(samples):
    before = prepare(samples, size=32, progress=False)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(samples[3].image)
    after = prepare(samples, size=32, progress=False)
    assert before.images[3].mean() > 50
    assert after.images[3].max() == 0
    np.testing.assert_array_equal(after.images[4], before.images[4])


def test_prepare_rebuilds_for_another_size(samples, monkeypatch):
    prepare(samples, size=32, progress=False)
    reads = count_reads(monkeypatch)
    cache = prepare(samples, size=48, progress=False)
    assert cache.images.shape == (12, 48, 48, 3)
    assert len(reads) == 12


def test_skip_bad_lists_the_corrupt_file_and_keeps_the_rest(samples):
    samples[2].image.write_bytes(b"not a jpeg at all")
    cache = prepare(samples, size=32, skip_bad=True, progress=False)
    assert [s.id for s in cache.samples] == [s.id for s in samples if s.id != "SYN_0002"]
    assert len(cache.bad) == 1
    assert "SYN_0002.jpg" in cache.bad[0]
    assert cache.images.shape == (11, 32, 32, 3)
    # Rows stay aligned with samples after the gap: row 2 is now SYN_0003.
    expected = cv2.resize(read_image(samples[3].image), (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(cache.get(2)[0], expected)
    assert prepare(samples, size=32, skip_bad=True, progress=False).bad == cache.bad


def test_without_skip_bad_the_corrupt_file_stops_preparing(samples):
    samples[2].image.write_bytes(b"not a jpeg at all")
    with pytest.raises(MedsegError, match="SYN_0002.jpg .*--skip-bad"):
        prepare(samples, size=32, progress=False)
    assert cache_folders() == []


def test_all_pairs_bad(samples):
    for sample in samples[:2]:
        sample.mask.write_bytes(b"")
    with pytest.raises(
        MedsegError, match="none of the 2 pairs could be read; first problem: .*SYN_0000"
    ):
        prepare(samples[:2], size=32, skip_bad=True, progress=False)


def test_unwritable_cache_falls_back_to_memory(samples, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot live under a file")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(blocker))
    cache = prepare(samples[:3], size=32, progress=False)
    assert cache.images.shape == (3, 32, 32, 3)
    assert not isinstance(cache.images, np.memmap)
    assert [s.id for s in cache.samples] == ["SYN_0000", "SYN_0001", "SYN_0002"]


def test_prepare_real_data(small_isic):
    cache = prepare(find_pairs(small_isic / "test"), size=64, progress=False)
    assert cache.images.shape == (4, 64, 64, 3)
    assert all(0 < cache.get(i)[1].mean() < 1 for i in range(4))


# --- EpochSampler --------------------------------------------------------------------------


def epoch_items(length=10, epoch=0, **kwargs):
    sampler = EpochSampler(length, **kwargs)
    sampler.set_epoch(epoch)
    items = list(sampler)
    assert len(items) == len(sampler)
    return items


def test_same_epoch_same_order_and_seeds():
    items = epoch_items(epoch=3, seed=7)
    assert items == epoch_items(epoch=3, seed=7)
    assert sorted(index for index, _ in items) == list(range(10))


def test_another_epoch_or_seed_changes_order_and_seeds():
    items = epoch_items(epoch=3, seed=7)
    for other in (epoch_items(epoch=4, seed=7), epoch_items(epoch=3, seed=8)):
        assert [i for i, _ in other] != [i for i, _ in items]
        assert dict(other) != dict(items)


def test_without_shuffle_the_order_is_the_index_order():
    assert [i for i, _ in epoch_items(shuffle=False, epoch=2)] == list(range(10))


def test_two_ranks_partition_the_epoch():
    whole = dict(epoch_items(epoch=1, seed=5))
    ranks = [epoch_items(epoch=1, seed=5, rank=r, world_size=2) for r in (0, 1)]
    indices = [[i for i, _ in items] for items in ranks]
    assert len(indices[0]) == len(indices[1]) == 5
    assert not set(indices[0]) & set(indices[1])
    assert set(indices[0]) | set(indices[1]) == set(range(10))
    # Each item's augmentation seed does not depend on which rank draws it.
    for items in ranks:
        assert all(whole[index] == seed for index, seed in items)


def test_uneven_length_pads_ranks_to_equal_shares():
    ranks = [epoch_items(11, rank=r, world_size=2) for r in (0, 1)]
    assert [len(items) for items in ranks] == [6, 6]
    assert {i for items in ranks for i, _ in items} == set(range(11))


def test_even_false_covers_each_index_exactly_once():
    ranks = [epoch_items(11, epoch=2, rank=r, world_size=3, even=False) for r in range(3)]
    assert [len(items) for items in ranks] == [4, 4, 3]
    assert sorted(i for items in ranks for i, _ in items) == list(range(11))


def test_drop_last_gives_equal_shares_without_repeats():
    ranks = [epoch_items(11, rank=r, world_size=2, drop_last=True) for r in (0, 1)]
    indices = [i for items in ranks for i, _ in items]
    assert [len(items) for items in ranks] == [5, 5]
    assert len(set(indices)) == 10


# --- SegmentationFolder --------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["default", "seed", "thin"])
def test_item_shapes_dtypes_and_seeded_augmentation(samples, augment):
    dataset = SegmentationFolder(samples, train_transform(32, augment))
    item = dataset[(4, 123)]
    assert item["id"] == "SYN_0004"
    assert item["image"].shape == (3, 32, 32)
    assert item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32)
    assert item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}

    dataset[(7, 5)]  # another item in between must not change what seed 123 gives
    again = dataset[(4, 123)]
    assert torch.equal(again["image"], item["image"])
    assert torch.equal(again["mask"], item["mask"])
    assert not torch.equal(dataset[(4, 124)]["image"], item["image"])


def test_thin_moves_a_structure_as_seed_does_and_only_adds_colour():
    # A gray image crossed by one-pixel lines: "thin" must warp them exactly as the seed's
    # pipeline does (no zoom, no blur), while its colour jitter moves the image's gray level.
    image = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[30, :], mask[:, 20] = 1, 1
    seed, thin = train_transform(64, "seed"), train_transform(64, "thin")
    levels = []
    for draw in range(20):
        seed.set_random_seed(draw)
        thin.set_random_seed(draw)
        plain, coloured = seed(image=image, mask=mask), thin(image=image, mask=mask)
        assert torch.equal(plain["mask"], coloured["mask"])
        levels.append([float(out["image"][:, 24:40, 24:40].mean()) for out in (plain, coloured)])
    plain_spread, coloured_spread = np.std(levels, axis=0)
    assert plain_spread < 0.02 and coloured_spread > 0.05  # noise alone against ±20% brightness


def test_eval_item_is_the_normalised_resized_pair(samples):
    item = SegmentationFolder(samples, eval_transform(64))[2]  # synthetic images are 64×64
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = torch.tensor(read_image(samples[2].image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["image"], (pixels - mean) / std, atol=1e-5, rtol=1e-5)
    expected_mask = torch.from_numpy(read_mask(samples[2].mask)).float()
    assert torch.equal(item["mask"][0], expected_mask)


def test_cached_items_come_from_the_cache(samples, monkeypatch):
    cache = prepare(samples, size=32, progress=False)
    dataset = SegmentationFolder(cache.samples, eval_transform(32), cache=cache)

    def fail(path):
        raise AssertionError("read from disk")

    monkeypatch.setattr("medseg.data.folder.read_image", fail)
    item = dataset[3]
    assert item["id"] == "SYN_0003"
    assert torch.equal(item["mask"][0], torch.from_numpy(cache.get(3)[1].copy()).float())


def test_two_images_with_one_id_are_refused(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "a_segmentation.png")
    with pytest.raises(MedsegError, match="a.jpg and a.png"):
        find_pairs(tmp_path)


def test_a_cache_built_with_skip_bad_still_refuses_without_it(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name in ("good", "bad"):
        Image.new("L", (8, 8)).save(tmp_path / "masks" / f"{name}_segmentation.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
    pairs = find_pairs(tmp_path)
    assert len(prepare(pairs, size=8, skip_bad=True, progress=False).samples) == 1
    with pytest.raises(MedsegError, match="bad.png.*--skip-bad"):
        prepare(pairs, size=8, skip_bad=False, progress=False)
