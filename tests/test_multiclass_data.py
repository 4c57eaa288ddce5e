"""Label maps and grayscale images: dataset.json, exact reading, nearest resizing, the plan."""

import json

import numpy as np
import pytest
from PIL import Image

from medseg.cli import main
from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.data.cache import prepare
from medseg.data.dataset import read_dataset_info
from medseg.data.folder import find_pairs
from medseg.data.io import read_image, read_label_map, read_mask, read_target
from medseg.data.plan import BINARY_IMAGE_SIZE, plan, round_trip
from medseg.data.transforms import resize_label_map, train_transform

LABELS = ["background", "disc", "bar"]


def test_dataset_json_gives_class_names_by_value_and_channels(label_map_root):
    info = read_dataset_info(label_map_root)
    assert info.labels == ("background", "disc", "bar")
    assert info.channels == 1
    assert read_dataset_info(label_map_root / "test") == info  # found from a split folder too


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{not json", "not readable JSON"),
        ({"labels": {"background": 0}}, "at least two classes"),
        ({"labels": {"background": 0, "a": 2}}, "without gaps"),
        ({"labels": {"background": 0, "a": [1, 2]}}, "region lists"),
        ({"labels": {"background": 0, "a": 1}, "channels": 0}, "0 channels"),
    ],
)
def test_a_bad_dataset_json_is_refused_in_one_line(tmp_path, content, named):
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(MedsegError, match=named) as error:
        read_dataset_info(tmp_path)
    assert "\n" not in str(error.value)


def test_nnunet_channel_names_count_the_channels(tmp_path):
    labels = {"background": 0, "tumour": 1}
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": labels, "channel_names": {"0": "CT"}})
    )
    assert read_dataset_info(tmp_path).channels == 1


def test_label_maps_are_read_exactly(label_map_root):
    (pair, *_) = find_pairs(label_map_root / "train")
    values = read_label_map(pair.mask, LABELS)
    assert values.dtype == np.uint8 and set(np.unique(values)) == {0, 1, 2}
    assert np.array_equal(values, np.asarray(Image.open(pair.mask)))
    assert np.array_equal(read_target(pair.mask, LABELS), values)


def test_a_value_outside_the_labels_names_the_file_the_value_and_the_classes(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [2, 7]], np.uint8)).save(path)
    with pytest.raises(MedsegError, match=r"m.png holds the value 7.*0 background, 1 disc, 2 bar"):
        read_label_map(path, LABELS)


def test_a_colour_coded_mask_is_explained(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray((np.zeros((4, 4, 3)) + [255, 0, 0]).astype(np.uint8)).save(path)
    with pytest.raises(MedsegError, match="colour image .* a label map is expected"):
        read_label_map(path, LABELS)


def test_binary_rule_points_class_labels_at_dataset_json(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [2, 2]], np.uint8)).save(path)
    with pytest.raises(MedsegError, match="dataset.json"):
        read_mask(path)


def test_grayscale_images_are_read_as_one_channel(label_map_root):
    (pair, *_) = find_pairs(label_map_root / "train")
    gray = read_image(pair.image, channels=1)
    assert gray.shape == (48, 48, 1)
    assert np.array_equal(gray[..., 0], np.asarray(Image.open(pair.image)))


def test_label_maps_resize_by_nearest_neighbour_and_never_mix_classes():
    labels = np.zeros((9, 9), np.uint8)
    labels[:, 3:6] = 2
    labels[4, :] = 1
    small = resize_label_map(labels, 4)
    assert set(np.unique(small)) <= {0, 1, 2}
    # A linear resize would have put 1s (the mean of 0 and 2) where 0 meets 2; nearest does not.
    assert (
        resize_label_map(np.kron(labels, np.ones((2, 2), np.uint8)), 9).tolist() == labels.tolist()
    )


def test_anatomy_augmentation_never_flips_and_keeps_class_values():
    image = np.zeros((32, 32, 1), np.uint8)
    labels = np.zeros((32, 32), np.uint8)
    labels[:, :8] = 1  # the patient's right side of the picture
    labels[:, -8:] = 2
    transform = train_transform(32, "anatomy", channels=1, label_map=True)
    for seed in range(20):
        transform.set_random_seed(seed)
        out = np.asarray(transform(image=image, mask=labels)["mask"])
        assert set(np.unique(out)) <= {0, 1, 2}
        ones, twos = np.argwhere(out == 1), np.argwhere(out == 2)
        assert ones[:, 1].mean() < twos[:, 1].mean()  # never mirrored


def test_the_cache_holds_gray_images_and_label_maps(label_map_root):
    samples = find_pairs(label_map_root / "train")
    cache = prepare(samples, size=24, channels=1, labels=LABELS, progress=False)
    assert cache.images.shape == (8, 24, 24, 1)
    image, target = cache.get(0)
    assert target.dtype == np.uint8 and set(np.unique(target)) <= {0, 1, 2}
    expected = resize_label_map(read_label_map(samples[0].mask, LABELS), 24)
    assert np.array_equal(target, expected)
    # The same files read as binary masks are another cache, not this one.
    with pytest.raises(MedsegError, match="dataset.json"):
        prepare(samples, size=24, progress=False)


def test_the_plan_reads_classes_and_channels_and_sizes_label_maps_by_round_trip(
    label_map_root, capsys
):
    planned = plan(build_config(), label_map_root)
    assert planned.data.labels == LABELS
    assert planned.data.channels == planned.model.in_channels == 1
    assert planned.model.num_classes == 3
    assert planned.data.augment == "anatomy"
    assert planned.data.image_size == 48  # the thin bar needs the images' own size
    assert "3 classes (background, disc, bar), grayscale" in capsys.readouterr().out
    # Settings already given are kept; a resumed run's config comes back unchanged.
    given = plan(
        build_config(overrides={"data.image_size": 32, "data.augment": "none"}), label_map_root
    )
    assert (given.data.image_size, given.data.augment) == (32, "none")
    assert plan(planned, label_map_root) == planned


def test_the_plan_keeps_binary_data_at_the_recipes_size(synthetic_root):
    planned = plan(build_config(), synthetic_root)
    assert planned.data.image_size == BINARY_IMAGE_SIZE
    assert (planned.data.labels, planned.model.num_classes, planned.data.augment) == (
        [],
        1,
        "default",
    )


def test_round_trip_of_a_label_map_at_its_own_size_is_exact():
    labels = np.random.default_rng(0).integers(0, 4, (20, 20)).astype(np.uint8)
    assert np.array_equal(round_trip(labels, 20, 4), labels)


def test_a_binary_loss_is_refused_for_label_maps(capsys, label_map_root, tmp_path, tiny_flags):
    argv = ["train", "--data", label_map_root, "--out", tmp_path / "run", *tiny_flags]
    code = main([str(arg) for arg in [*argv, "--loss", "focal"]])
    assert code == 2
    assert "train.loss='focal' is binary only" in capsys.readouterr().err


def test_training_on_label_maps_writes_per_class_dice_columns(label_map_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    argv = ["train", "--data", label_map_root, "--out", run, *tiny_flags, "--epochs", "2"]
    assert main([str(arg) for arg in argv]) == 0
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert "val_dice_disc" in header.split(",") and "val_dice_bar" in header.split(",")
    assert len(rows) == 2
    config = build_config(config_file=run / "config.yaml")
    assert config.model.num_classes == 3 and config.data.channels == 1


def test_real_jsrt_label_maps_plan_and_cache(small_jsrt, capsys):
    planned = plan(build_config(), small_jsrt)
    assert planned.data.labels[1:3] == ["right_lung", "left_lung"]
    assert planned.model.num_classes == 6 and planned.data.channels == 1
    assert planned.data.image_size == 256  # an exact halving of 512 keeps the clavicles
    cache = prepare(
        find_pairs(small_jsrt / "train"), size=64, channels=1, labels=planned.data.labels
    )
    assert cache.images.shape == (6, 64, 64, 1)
    assert set(np.unique(np.asarray(cache.masks))) == set(range(6))


def test_a_label_map_of_another_size_than_its_image_is_refused(capsys, label_map_root, tmp_path):
    (pair, *_) = find_pairs(label_map_root / "train")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(pair.mask)
    out = tmp_path / "run"
    code = main(["train", "--data", str(label_map_root), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"mask {pair.mask.name} is 48×40 but image {pair.image.name} is 48×48" in err
    assert not out.exists()
