"""Tests for overlays, prediction figures and training curves."""

import csv

import cv2
import numpy as np
import pytest
from PIL import Image

from medseg.core.errors import MedsegError
from medseg.drawing import (
    PALETTE,
    PREDICTION_COLOR,
    class_colour,
    colour_label_map,
    overlay,
    plot_training_curves,
    save_prediction_figure,
)
from medseg.engine.run_folder import RunFolder


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)


@pytest.fixture
def mask():
    mask = np.zeros((64, 80), bool)
    mask[20:40, 30:50] = True
    return mask


def _png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as picture:
        picture.verify()
        assert picture.format == "PNG"
        return picture.size


def test_overlay_keeps_shape_and_type_and_input(image, mask):
    original = image.copy()
    result = overlay(image, mask)
    assert result.shape == image.shape and result.dtype == np.uint8
    np.testing.assert_array_equal(image, original)


def test_overlay_changes_only_pixels_on_or_near_the_mask(image, mask):
    result = overlay(image, mask, color=(0, 255, 0), alpha=0.5, contour_color=(255, 0, 0))
    near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    np.testing.assert_array_equal(result[~near], image[~near])
    inside = mask.copy()
    inside[[20, 39], :] = inside[:, [30, 49]] = False  # leave out the outline
    expected = np.rint(0.5 * image[inside] + 0.5 * np.array([0, 255, 0]))
    np.testing.assert_allclose(result[inside], expected, atol=1)
    assert (result[20, 30:50] == [255, 0, 0]).all()  # the top edge is outlined


def test_overlay_without_contour_or_alpha_is_identity(image, mask):
    np.testing.assert_array_equal(overlay(image, mask, alpha=0.0, contour=False), image)


def test_overlay_accepts_255_and_probability_masks(image, mask):
    expected = overlay(image, mask)
    np.testing.assert_array_equal(overlay(image, mask.astype(np.uint8) * 255), expected)
    np.testing.assert_array_equal(overlay(image, mask * 0.8 + 0.1), expected)


def test_overlay_refuses_a_mask_of_another_size(image):
    with pytest.raises(ValueError, match="resize"):
        overlay(image, np.zeros((10, 10), bool))


def test_prediction_figure_has_four_panels_with_truth_and_three_without(tmp_path, image, mask):
    shifted = np.roll(mask, 5, axis=1)
    four = save_prediction_figure(tmp_path / "four.png", image, mask, shifted, title="case 1")
    three = save_prediction_figure(tmp_path / "three.png", image, None, shifted)
    four_width, four_height = _png_size(four)
    three_width, three_height = _png_size(three)
    assert four_width > three_width and four_height == three_height
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four.png", "three.png"]


def test_prediction_figure_refuses_unknown_suffix(tmp_path, image, mask):
    with pytest.raises(MedsegError, match="suffix"):
        save_prediction_figure(tmp_path / "figure.xyz", image, mask, mask)
    assert not any(tmp_path.iterdir())


def _write_metrics(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_training_curves_from_csv_strings(tmp_path):
    rows = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "val_dice": 1 - 1 / (e + 1),
            "val_iou": "" if e == 2 else 0.9 - 1 / (e + 1),
        }
        for e in range(1, 6)
    ]
    _write_metrics(tmp_path / "metrics.csv", rows)
    read = RunFolder(tmp_path).metric_rows()
    assert read[1] == {
        "epoch": "2",
        "train_loss": "0.5",
        "val_loss": "0.6",
        "val_dice": str(1 - 1 / 3),
        "val_iou": "",
    }
    path = plot_training_curves(read, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert _png_size(path)[0] > 0
    # The strings were parsed: the same rows with every value blank draw a different picture.
    blank = [{key: ("" if key != "epoch" else value) for key, value in row.items()} for row in read]
    empty = plot_training_curves(blank, tmp_path / "empty.png")
    assert not np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(empty)))


def test_training_curves_tolerate_missing_columns(tmp_path):
    rows = [{"epoch": "1", "train_loss": "0.7"}, {"train_loss": "0.5", "note": "x"}]
    assert _png_size(plot_training_curves(rows, tmp_path / "curves.png"))[0] > 0


def test_training_curves_need_rows(tmp_path):
    with pytest.raises(MedsegError, match="at least one epoch"):
        plot_training_curves([], tmp_path / "curves.png")


def test_read_metrics_csv_reports_missing_file(tmp_path):
    with pytest.raises(MedsegError, match="metrics file"):
        RunFolder(tmp_path / "nope").metric_rows()


@pytest.fixture
def label_map():
    labels = np.zeros((64, 80), np.uint8)
    labels[5:25, 5:30] = 1
    labels[30:60, 40:75] = 2
    labels[40:55, 5:20] = 3
    return labels


def test_class_colours_are_distinct_with_class_one_green_and_background_black():
    colours = [class_colour(index) for index in range(1, len(PALETTE) + 1)]
    assert class_colour(1) == PREDICTION_COLOR and class_colour(0) == (0, 0, 0)
    assert len(set(colours)) == len(colours) and (0, 0, 0) not in colours
    assert class_colour(len(PALETTE) + 1) == class_colour(1)  # the palette repeats
    with pytest.raises(ValueError, match="negative"):
        class_colour(-1)


def test_colour_label_map_paints_each_class(label_map):
    picture = colour_label_map(label_map)
    assert picture.shape == (64, 80, 3) and picture.dtype == np.uint8
    for value in range(4):
        assert (picture[label_map == value] == class_colour(value)).all()


def test_overlay_of_a_label_map_fills_and_outlines_each_class_in_its_colour(image, label_map):
    result = overlay(image, label_map, alpha=0.5)
    background = cv2.dilate((label_map > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    np.testing.assert_array_equal(result[background], image[background])
    for value, (top, left) in [(1, (5, 5)), (2, (30, 40)), (3, (40, 5))]:
        inside = cv2.erode((label_map == value).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        expected = np.rint(0.5 * image[inside] + 0.5 * np.array(class_colour(value)))
        np.testing.assert_allclose(result[inside], expected, atol=1)
        assert (result[top, left] == class_colour(value)).all()  # the outline's corner


def test_overlay_with_labels_adds_a_legend_strip_below(image, label_map):
    names = ["background", "left lung", "heart", "clavicle"]
    plain = overlay(image, label_map)
    legend = overlay(image, label_map, names)
    assert legend.shape[0] > image.shape[0] and legend.shape[2] == 3
    np.testing.assert_array_equal(legend[:64, :80], plain)
    strip = legend[64:]
    for value in (1, 2, 3):  # a square of each foreground class's colour
        assert (strip == class_colour(value)).all(axis=-1).sum() >= 9
    # More than two names make even a 0/1 map a label map: class 1's outline is green, not red.
    only_ones = (label_map == 1).astype(np.uint8)
    assert (overlay(image, only_ones, names)[5, 5] == class_colour(1)).all()
    assert (overlay(image, only_ones)[5, 5] == [255, 0, 0]).all()
    # Names OpenCV cannot draw do not stop the picture.
    assert overlay(image, label_map, ["fond", "poumon gauche é", "心臓", "x"]).shape[0] > 64


def test_overlay_of_a_0_1_mask_without_labels_looks_binary(image, mask):
    np.testing.assert_array_equal(overlay(image, mask.astype(np.uint8)), overlay(image, mask))


def test_overlay_and_figures_take_gray_images(tmp_path, image, mask, label_map):
    gray = image[..., :1]
    rgb = np.repeat(gray, 3, axis=2)
    np.testing.assert_array_equal(overlay(gray, mask), overlay(rgb, mask))
    np.testing.assert_array_equal(overlay(gray[..., 0], label_map), overlay(rgb, label_map))
    gray_figure = save_prediction_figure(tmp_path / "gray.png", gray, mask, mask)
    rgb_figure = save_prediction_figure(tmp_path / "rgb.png", rgb, mask, mask)
    assert np.array_equal(np.asarray(Image.open(gray_figure)), np.asarray(Image.open(rgb_figure)))


def test_label_map_figure_shows_class_colours_and_panels(tmp_path, image, label_map):
    names = ["background", "left lung", "heart", "clavicle"]
    shifted = np.roll(label_map, 3, axis=1)
    four = save_prediction_figure(tmp_path / "four.png", image, label_map, shifted, labels=names)
    three = save_prediction_figure(tmp_path / "three.png", image, None, shifted, labels=names)
    four_width, four_height = _png_size(four)
    three_width, three_height = _png_size(three)
    assert four_width > three_width and four_height == three_height
    pixels = np.asarray(Image.open(four).convert("RGB"))
    # Azure (class 3) is in no binary figure: the label maps were painted in class colours.
    assert (pixels == class_colour(3)).all(axis=-1).sum() > 100
    binary = np.asarray(
        Image.open(save_prediction_figure(tmp_path / "b.png", image, None, shifted > 0)).convert(
            "RGB"
        )
    )
    assert not (binary == class_colour(3)).all(axis=-1).any()
    with pytest.raises(ValueError, match="resize"):
        save_prediction_figure(tmp_path / "bad.png", image, None, label_map[:10], labels=names)
