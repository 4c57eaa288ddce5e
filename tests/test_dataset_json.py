"""Label maps and dataset.json as users make them: many classes, channels the images contradict,
binary masks saved 0/255, sets without foreground, a dataset.json that is not a file."""

import json

import cv2
import numpy as np
import pytest
from conftest import one_line_failure
from PIL import Image

from medseg.cli import main
from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.data import io as io_module
from medseg.data.cache import prepare
from medseg.data.dataset import read_dataset_info
from medseg.data.folder import find_pairs
from medseg.data.io import read_label_map, read_target
from medseg.data.plan import plan
from medseg.data.transforms import resize_image, resize_probabilities


def write_many_classes(root, classes: int, *, size: int = 136, n_train: int = 4, n_test: int = 1):
    """Gray images with 16-bit label maps whose every class is a horizontal band of pixels."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for index in range(count):
            values = (np.arange(size * size) * classes // (size * size)).reshape(size, size)
            values = np.roll(values, index * 7, axis=0).astype(np.uint16)
            image = rng.integers(0, 255, (size, size), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"C{index}.png")
            Image.fromarray(values).save(root / split / "masks" / f"C{index}_segmentation.png")
    labels = {("background" if value == 0 else f"c{value}"): value for value in range(classes)}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "channels": 1}))
    return root


# --- 256 classes are supported; more are refused at plan time ---------------------------------


def test_probabilities_of_256_classes_resize_as_each_class_alone():
    probabilities = np.random.default_rng(0).random((256, 30, 20)).astype(np.float32)
    resized = resize_probabilities(probabilities, (17, 11))
    expected = np.stack(
        [cv2.resize(p, (11, 17), interpolation=cv2.INTER_AREA) for p in probabilities]
    )
    assert resized.shape == (256, 17, 11)
    np.testing.assert_array_equal(resized, expected)
    # An image of more channels than OpenCV's area interpolation takes at once (5 MRI sequences).
    image = np.random.default_rng(1).integers(0, 255, (30, 20, 5), dtype=np.uint8)
    expected = np.stack(
        [cv2.resize(image[..., c], (11, 17), interpolation=cv2.INTER_AREA) for c in range(5)], 2
    )
    np.testing.assert_array_equal(resize_image(image, (17, 11)), expected)


def test_256_classes_in_16_bit_label_maps_plan_train_and_predict(tmp_path, capsys, tiny_flags):
    root = write_many_classes(tmp_path / "many", 256)
    mask = read_target(
        root / "train" / "masks" / "C0_segmentation.png", read_dataset_info(root).labels
    )
    assert mask.dtype == np.uint8 and (mask.min(), mask.max()) == (0, 255)
    run = tmp_path / "run"
    flags = [arg for arg in tiny_flags if arg not in ("--image-size", "64")]  # the plan sizes it
    argv = ["train", "--data", root, "--out", run, *flags, "--epochs", "1", "--batch-size", "2"]
    assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "256 classes (background, c1, c2, c3, c4, c5, c6, ..., c255)" in out
    assert "at 136×136" in out  # the bands keep every class only at the images' own size
    masks = tmp_path / "masks"
    assert main(["predict", "--checkpoint", str(run), "-i", str(root / "test" / "images"),
                 "-o", str(masks), "--quiet"]) == 0  # fmt: skip
    predicted = np.asarray(Image.open(masks / "C0_segmentation.png"))
    assert predicted.shape == (136, 136) and predicted.dtype == np.uint8


def test_300_classes_are_refused_at_plan_time_in_one_line(tmp_path, capsys, tiny_flags):
    root = write_many_classes(tmp_path / "many", 300, size=32, n_train=2)
    run = tmp_path / "run"
    argv = ["train", "--data", root, "--out", run, *tiny_flags, "--epochs", "1"]
    one_line_failure(
        capsys, argv, expect=[root / "dataset.json", "declares 300 classes", "at most 256"]
    )
    assert not (run / "config.yaml").exists()


# --- channels that the images contradict ------------------------------------------------------


def write_two_class_set(root, *, colour: bool, declared: dict, size: int = 40, masks=(0, 1)):
    rng = np.random.default_rng(0)
    for index in range(4):
        for folder in ("images", "masks"):
            (root / "train" / folder).mkdir(parents=True, exist_ok=True)
        shape = (size, size, 3) if colour else (size, size)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
            root / "train" / "images" / f"C{index}.png"
        )
        mask = np.full((size, size), masks[0], np.uint8)
        mask[10:30, 10:30] = masks[1]
        Image.fromarray(mask).save(root / "train" / "masks" / f"C{index}_segmentation.png")
    labels = {"background": 0, "lesion": 1}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, **declared}))
    return root


@pytest.mark.parametrize(
    ("colour", "declared", "said"),
    [
        (True, {"channels": 1}, "declares 1 channel but 4 of 4 training images looked at are in"),
        (False, {"channel_names": {"0": "R", "1": "G", "2": "B"}}, "declares 3 channels but"),
        (False, {"channels": 1}, None),
        (True, {"channels": 3}, None),
        (False, {}, None),  # nothing declared: gray images are read as RGB, as without a file
    ],
)
def test_channels_the_images_contradict_get_a_note(tmp_path, capsys, colour, declared, said):
    root = write_two_class_set(tmp_path / "set", colour=colour, declared=declared)
    planned = plan(build_config(), root)
    assert planned.data.channels == declared.get(
        "channels", 3
    )  # as declared: a note, not a refusal
    err = capsys.readouterr().err
    if said is None:
        assert "note" not in err
    else:
        (note,) = err.strip().splitlines()
        assert note.startswith(f"medseg: note: {root / 'dataset.json'} {said}")
        assert "C0.png" in note


# --- two classes saved 0/255 ---------------------------------------------------------------------


def test_two_classes_saved_as_0_and_255_read_255_as_the_foreground(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io_module, "_noted_folders", set())
    labels = ("background", "lesion")
    values = np.array([[0, 255], [255, 0]], np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(values).save(tmp_path / name)
    for name in ("a.png", "b.png"):
        np.testing.assert_array_equal(read_label_map(tmp_path / name, labels), values // 255)
    (note,) = capsys.readouterr().err.strip().splitlines()  # once for the folder
    assert note == (
        f"medseg: note: masks in {tmp_path} hold 0 and 255 (first a.png); dataset.json declares "
        f"two classes, so 255 is read as 'lesion' (1)"
    )
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 0/65535
    np.testing.assert_array_equal(read_label_map(tmp_path / "sixteen.png", labels), values // 255)
    # Ambiguous: 1 and 255 both present, or a third class's value.
    for name, ambiguous in (("c.png", [[0, 1], [255, 0]]), ("d.png", [[0, 2], [2, 0]])):
        Image.fromarray(np.array(ambiguous, np.uint8)).save(tmp_path / name)
        with pytest.raises(MedsegError, match=f"{name} holds the value"):
            read_label_map(tmp_path / name, labels)
    # Three classes: 255 is not one of them.
    with pytest.raises(MedsegError, match="holds the value 255"):
        read_label_map(tmp_path / "a.png", ("background", "a", "b"))


def test_a_binary_set_saved_0_255_trains_with_its_dataset_json(
    synthetic_root, tmp_path, capsys, tiny_flags
):
    (synthetic_root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "lesion": 1}})
    )
    argv = ["train", "--data", synthetic_root, "--out", tmp_path / "run", *tiny_flags]
    assert main([str(arg) for arg in [*argv, "--epochs", "1"]]) == 0
    err = capsys.readouterr().err
    assert "so 255 is read as 'lesion' (1)" in err
    assert "foreground pixel" not in err  # the lesions were read


# --- label maps without foreground; a dataset.json that is not a file -----------------------


def test_label_maps_without_foreground_are_warned_of_in_classes(label_map_root, capsys):
    for mask in (label_map_root / "train" / "masks").iterdir():
        Image.new("L", (48, 48), 0).save(mask)
    samples = find_pairs(label_map_root / "train")
    prepare(samples, size=24, channels=1, labels=("background", "disc", "bar"), progress=False)
    (warning,) = capsys.readouterr().err.strip().splitlines()
    masks = label_map_root / "train" / "masks"
    assert warning.startswith(
        f"medseg: warning: none of the 8 masks in {masks} has a pixel of any class but background"
    )
    assert "class values 1..2 that dataset.json declares (disc, bar)" in warning
    assert "lesion" not in warning


def test_a_dataset_json_that_is_a_folder_is_refused(synthetic_root, tmp_path, capsys, tiny_flags):
    (synthetic_root / "dataset.json").mkdir()
    with pytest.raises(MedsegError, match="dataset.json is a folder, not a JSON file"):
        read_dataset_info(synthetic_root / "test")  # found from a split folder too
    argv = ["train", "--data", synthetic_root, "--out", tmp_path / "run", *tiny_flags]
    one_line_failure(capsys, argv, expect=[synthetic_root / "dataset.json", "is a folder"])
    (synthetic_root / "dataset.json").rmdir()
    (synthetic_root / "dataset.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(MedsegError, match="is a broken link"):
        read_dataset_info(synthetic_root)
