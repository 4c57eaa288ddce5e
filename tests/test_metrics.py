"""Metrics against hand-computed counts, values and distances."""

import math

import numpy as np
import pytest
import torch

from medseg.metrics import (
    PER_IMAGE_COLUMNS,
    MetricAccumulator,
    average_surface_distance,
    binarize,
    confusion_counts,
    dice,
    hausdorff95,
    iou,
    mean_interval,
    pixel_accuracy,
    sensitivity,
    specificity,
    surface_distances,
    thresholded_jaccard,
)

# Two 2×2 images. Image 0: pred [[1,1],[0,0]], target [[1,0],[1,0]] -> tp 1, fp 1, fn 1, tn 1.
# Image 1: pred and target all 1 -> tp 4, fp 0, fn 0, tn 0.
PRED = torch.tensor([[[[1, 1], [0, 0]]], [[[1, 1], [1, 1]]]])
TARGET = torch.tensor([[[[1, 0], [1, 0]]], [[[1, 1], [1, 1]]]])


def test_confusion_counts_by_hand():
    expected = torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]])
    counts = confusion_counts(PRED, TARGET)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, expected)
    # Bool, float and (N, H, W) masks give the same counts.
    assert torch.equal(confusion_counts(PRED.bool()[:, 0], TARGET.bool()[:, 0]), expected)
    assert torch.equal(confusion_counts(PRED.float(), TARGET.float()), expected)


def test_confusion_counts_rejects_probabilities_and_bad_shapes():
    with pytest.raises(ValueError, match="threshold"):
        confusion_counts(torch.full((1, 1, 2, 2), 0.7), TARGET[:1])
    with pytest.raises(ValueError, match="differ"):
        confusion_counts(PRED, TARGET[:1])
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(torch.zeros(2, 2), torch.zeros(2, 2))


# Rows: tp, fp, fn, tn -> dice 2tp/(2tp+fp+fn), iou tp/(tp+fp+fn), accuracy (tp+tn)/all,
# sensitivity tp/(tp+fn), specificity tn/(tn+fp); 1.0 where a denominator is 0.
COUNT_TABLE = [
    # counts         dice   iou    acc    sens   spec
    ((1, 1, 1, 1), 2 / 4, 1 / 3, 2 / 4, 1 / 2, 1 / 2),
    ((3, 1, 0, 0), 6 / 7, 3 / 4, 3 / 4, 3 / 3, 0 / 1),
    ((2, 0, 2, 0), 4 / 6, 2 / 4, 2 / 4, 2 / 4, 1.0),  # no negatives: specificity 1
    ((0, 0, 0, 4), 1.0, 1.0, 4 / 4, 1.0, 4 / 4),  # both empty: dice, iou, sensitivity 1
    ((0, 0, 3, 1), 0 / 3, 0 / 3, 1 / 4, 0 / 3, 1 / 1),  # empty prediction
    ((0, 2, 0, 2), 0 / 2, 0 / 2, 2 / 4, 1.0, 2 / 4),  # empty ground truth
]


@pytest.mark.parametrize(("counts", "d", "j", "acc", "sens", "spec"), COUNT_TABLE)
def test_metrics_from_single_counts(counts, d, j, acc, sens, spec):
    counts = torch.tensor(counts)
    for metric, expected in [
        (dice, d),
        (iou, j),
        (pixel_accuracy, acc),
        (sensitivity, sens),
        (specificity, spec),
    ]:
        value = metric(counts)
        assert value.dtype == torch.float64
        assert value.shape == ()
        assert value.item() == pytest.approx(expected)


def test_metrics_from_count_table_are_per_row():
    counts = torch.tensor([row[0] for row in COUNT_TABLE])
    expected_dice = torch.tensor([row[1] for row in COUNT_TABLE], dtype=torch.float64)
    values = dice(counts)
    assert values.shape == (len(COUNT_TABLE),)
    assert torch.allclose(values, expected_dice)
    assert not torch.isnan(specificity(torch.zeros(3, 4, dtype=torch.int64))).any()


def test_accumulator_mean_over_images_differs_from_pooled():
    accumulator = MetricAccumulator()
    accumulator.update(PRED[:1], TARGET[:1])
    accumulator.update(PRED[1:], TARGET[1:])
    assert len(accumulator) == 2
    # Per image (counts (1,1,1,1) and (4,0,0,0)): dice 0.5 and 1, iou 1/3 and 1.
    per_image = accumulator.per_image()
    np.testing.assert_allclose(per_image["dice"], [0.5, 1.0])
    np.testing.assert_allclose(per_image["iou"], [1 / 3, 1.0])
    np.testing.assert_allclose(per_image["specificity"], [0.5, 1.0])  # image 1: no negatives
    # Pooled counts: tp 5, fp 1, fn 1, tn 1.
    expected = {
        "dice": (0.5 + 1) / 2,
        "dice_pooled": 10 / 12,
        "iou": (1 / 3 + 1) / 2,
        "iou_pooled": 5 / 7,
        "accuracy": (2 / 4 + 4 / 4) / 2,
        "sensitivity": (1 / 2 + 1) / 2,
        "specificity": (1 / 2 + 1) / 2,
    }
    summary = accumulator.summary()
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    # Without surface distances there is no hd95/assd; unnamed images are named by position.
    assert "hd95" not in summary and "assd_median" not in summary
    assert summary["worst"] == [{"id": "0", "dice": 0.5}, {"id": "1", "dice": 1.0}]


def test_accumulator_from_counts_and_merge_match_one_pass():
    whole = MetricAccumulator()
    whole.update(PRED, TARGET)
    first, second = MetricAccumulator(), MetricAccumulator()
    first.update(PRED[:1], TARGET[:1])
    second.update(PRED[1:], TARGET[1:])
    merged = MetricAccumulator.from_counts(first.counts).merge(second)
    assert torch.equal(merged.counts, whole.counts)
    assert merged.counts.shape == (2, 4)
    assert merged.summary() == whole.summary()


def test_empty_accumulator():
    accumulator = MetricAccumulator()
    assert len(accumulator) == 0
    assert accumulator.counts.shape == (0, 4)
    with pytest.raises(ValueError, match="update"):
        accumulator.summary()


def test_mean_interval_has_the_width_of_a_normal_mean():
    # 400 draws of N(0.8, 0.1): the mean's 95% interval is ±1.96 × 0.1 / 20 ≈ ±0.0098 around it.
    values = np.random.default_rng(1).normal(0.8, 0.1, 400)
    low, high = mean_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / 20, rel=0.15)
    assert mean_interval(values) == (low, high)  # seeded: the same scores, the same interval
    assert mean_interval(values, confidence=0.5)[1] - mean_interval(values, confidence=0.5)[0] < (
        high - low
    )


def test_mean_interval_reaches_further_towards_the_missed_images():
    # Dice as a model scores a test set: most images near 0.9, a few missed entirely. The mean
    # could fall far if more such images came, and rise only a little: the interval leans low.
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0.85, 0.95, 145), np.zeros(5)])
    low, high = mean_interval(values)
    assert values.mean() - low > high - values.mean()


def test_mean_interval_of_paired_differences_finds_a_small_consistent_gain():
    # B beats A by 0.01 on every image, with noise far smaller than the spread between images:
    # the means' own intervals overlap, the paired differences' interval excludes 0.
    rng = np.random.default_rng(0)
    a = rng.uniform(0.6, 1.0, 150)
    b = a + 0.01 + rng.normal(0, 0.005, 150)
    low, high = mean_interval(b - a)
    assert 0 < low < 0.01 < high
    assert mean_interval(a)[1] > mean_interval(b)[0]


def test_mean_interval_of_one_value_or_equal_values_is_the_value():
    assert mean_interval([0.5]) == (0.5, 0.5)
    assert mean_interval(np.full(10, 0.25)) == (0.25, 0.25)
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_thresholded_jaccard_by_hand():
    # 0.6 and 0.3 fall below 0.65 and count as 0; 0.65 itself is kept: (0.9 + 0.65) / 4
    assert thresholded_jaccard([0.9, 0.6, 0.65, 0.3]) == pytest.approx(1.55 / 4)
    # threshold 0 keeps everything: plain mean (0.9 + 0.6 + 0.65 + 0.3) / 4
    assert thresholded_jaccard(np.array([0.9, 0.6, 0.65, 0.3]), threshold=0) == pytest.approx(
        2.45 / 4
    )


def mask(shape, *pixels):
    """Bool mask of `shape` with the listed (row, col) pixels set."""
    out = np.zeros(shape, dtype=bool)
    for row, col in pixels:
        out[row, col] = True
    return out


def test_surface_distance_single_pixels_3_4_5():
    # Each boundary is one pixel; their distance is sqrt(3² + 4²) = 5 both ways.
    pred, target = mask((6, 6), (0, 0)), mask((6, 6), (3, 4))
    assert hausdorff95(pred, target) == pytest.approx(5.0)
    assert average_surface_distance(pred, target) == pytest.approx(5.0)


def test_surface_distance_vertical_lines_offset_by_3():
    # One-pixel-wide lines are all boundary; each pixel is 3 columns from the other line.
    pred = np.zeros((8, 10), dtype=bool)
    target = np.zeros((8, 10), dtype=bool)
    pred[1:7, 2] = True
    target[1:7, 5] = True
    assert hausdorff95(pred, target) == pytest.approx(3.0)
    assert average_surface_distance(pred, target) == pytest.approx(3.0)


def test_surface_distance_asymmetric():
    # pred boundary {(0,0)}, target boundary {(0,0), (0,4)}.
    # pred -> target: [0]; target -> pred: [0, 4]. All distances [0, 0, 4].
    # HD95 (linear interpolation): position 0.95 · 2 = 1.9 -> 0 + 0.9 · (4 - 0) = 3.6
    # ASSD: (0 + 0 + 4) / 3
    pred, target = mask((3, 6), (0, 0)), mask((3, 6), (0, 0), (0, 4))
    assert hausdorff95(pred, target) == pytest.approx(3.6)
    assert average_surface_distance(pred, target) == pytest.approx(4 / 3)
    assert hausdorff95(target, pred) == pytest.approx(3.6)


def test_hausdorff95_of_squares_offset_by_3_is_3():
    # 8×8 squares (rows 2..9), the first at cols 2..9, the second at cols 5..12; 28 boundary
    # pixels each. Distances from the first boundary to the second:
    #   left column (8 px): 3 each                               -> 24
    #   top row cols 3, 4 -> 2, 1; cols 5..9 lie on the other    -> 3, bottom row likewise 3
    #   right column rows 3..8: min(r - 2, 9 - r, 3) = 1,2,3,3,2,1 -> 12
    # Sum 42, and 42 again the other way by symmetry: ASSD = 84 / 56 = 1.5.
    # The maximum is 3 and 20 of the 56 distances are 3, so the 95th percentile is 3.
    pred = np.zeros((12, 16), dtype=bool)
    target = np.zeros((12, 16), dtype=bool)
    pred[2:10, 2:10] = True
    target[2:10, 5:13] = True
    assert hausdorff95(pred, target) == pytest.approx(3.0)
    assert average_surface_distance(pred, target) == pytest.approx(1.5)


def test_surface_distance_identical_masks_is_0():
    square = np.zeros((7, 7), dtype=bool)
    square[2:5, 2:5] = True
    assert hausdorff95(square, square) == 0.0
    assert average_surface_distance(square, square) == 0.0


def test_surface_distance_empty_conventions():
    empty = np.zeros((3, 4), dtype=bool)
    full = np.ones((3, 4), dtype=bool)
    assert hausdorff95(empty, empty) == 0.0
    assert average_surface_distance(empty, empty) == 0.0
    # Exactly one empty: the diagonal sqrt(3² + 4²) = 5.
    assert hausdorff95(empty, full) == pytest.approx(5.0)
    assert hausdorff95(full, empty) == pytest.approx(5.0)
    assert average_surface_distance(full, empty) == pytest.approx(5.0)
    assert math.isfinite(average_surface_distance(empty, full))


def test_surface_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="2-D"):
        hausdorff95(np.zeros((3, 4), dtype=bool), np.zeros((4, 3), dtype=bool))


def test_binarize_is_strictly_above_the_threshold_for_tensors_and_arrays():
    probabilities = [0.0, 0.3, 0.5, 0.5001, 1.0]
    assert binarize(torch.tensor(probabilities)).tolist() == [False, False, False, True, True]
    assert binarize(np.array(probabilities), 0.3).tolist() == [False, False, True, True, True]
    assert binarize(torch.tensor(probabilities), 1.0).sum() == 0  # nothing is above 1
    soft_target = torch.tensor([[[[0.0, 0.49], [0.51, 1.0]]]])  # e.g. an interpolated mask
    assert binarize(soft_target).dtype == torch.bool
    assert binarize(soft_target).shape == soft_target.shape
    assert binarize(soft_target).flatten().tolist() == [False, False, True, True]


# Three 4×4 images (diagonal sqrt(32)), added in the order a, c, b:
#   a: pred = target = the 2×2 square at rows 0-1, cols 0-1 -> counts (4, 0, 0, 12);
#      dice, iou, accuracy, sensitivity, specificity all 1; hd95 = assd = 0.
#   c: target the 2×2 square at rows 2-3, cols 2-3, pred empty -> counts (0, 0, 4, 12);
#      dice 0, iou 0, accuracy 12/16, sensitivity 0, specificity 1; hd95 = assd = sqrt(32).
#   b: target the square of a, pred rows 0-1 across all 4 columns -> counts (4, 4, 0, 8);
#      dice 8/12, iou 4/8, accuracy 12/16, sensitivity 1, specificity 8/12.
#      Every pixel of both masks is boundary (2 rows tall). pred -> target: cols 0-1 at 0
#      (4 px), col 2 at 1 (2 px), col 3 at 2 (2 px); target -> pred: 0 (4 px). 12 distances:
#      ASSD (2·1 + 2·2) / 12 = 0.5; HD95 at position 0.95·11 = 10.45 of [0×8, 1, 1, 2, 2] = 2.
# Pooled counts (8, 4, 4, 32): dice 16/24, iou 8/16. Thresholded Jaccard: IoUs 1, 0, 0.5;
# 0.5 < 0.65 counts as 0 -> 1/3.
def _three_images():
    square = mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
    far_square = mask((4, 4), (2, 2), (2, 3), (3, 2), (3, 3))
    band = np.zeros((4, 4), dtype=bool)
    band[:2] = True
    return [
        ("a", square, square),
        ("c", np.zeros((4, 4), dtype=bool), far_square),
        ("b", band, square),
    ]


def test_accumulator_summary_by_hand():
    accumulator = MetricAccumulator(surface=True)
    for image_id, pred, target in _three_images():
        accumulator.add(image_id, pred, target)
    diagonal = math.sqrt(32)
    expected = {
        "images": 3,
        "dice": (1 + 0 + 2 / 3) / 3,
        "dice_median": 2 / 3,
        "iou": (1 + 0 + 0.5) / 3,
        "iou_median": 0.5,
        "accuracy": (1 + 0.75 + 0.75) / 3,
        "accuracy_median": 0.75,
        "sensitivity": (1 + 0 + 1) / 3,
        "sensitivity_median": 1.0,
        "specificity": (1 + 1 + 2 / 3) / 3,
        "specificity_median": 1.0,
        "hd95": (0 + diagonal + 2) / 3,
        "hd95_median": 2.0,
        "assd": (0 + diagonal + 0.5) / 3,
        "assd_median": 0.5,
        "dice_pooled": 16 / 24,
        "iou_pooled": 8 / 16,
        "thresholded_jaccard": 1 / 3,
    }
    summary = accumulator.summary()
    assert list(summary) == [*expected, "worst"]  # summary.json keeps this order
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    assert summary["worst"] == [
        {"id": "c", "dice": 0.0},
        {"id": "b", "dice": pytest.approx(2 / 3)},
        {"id": "a", "dice": 1.0},
    ]
    assert [case["id"] for case in accumulator.summary(worst=1)["worst"]] == ["c"]


def test_accumulator_rows_by_hand():
    accumulator = MetricAccumulator(surface=True)
    for image_id, pred, target in _three_images():
        accumulator.add(image_id, pred, target)
    rows = accumulator.rows()
    assert [tuple(row) for row in rows] == [PER_IMAGE_COLUMNS] * 3
    assert [row["id"] for row in rows] == ["a", "c", "b"]
    assert rows[2] == {
        "id": "b",
        "dice": pytest.approx(2 / 3),
        "iou": 0.5,
        "accuracy": 0.75,
        "sensitivity": 1.0,
        "specificity": pytest.approx(2 / 3),
        "hd95": pytest.approx(2.0),
        "assd": pytest.approx(0.5),
        "tp": 4,
        "fp": 4,
        "fn": 0,
        "tn": 8,
    }
    assert type(rows[2]["tp"]) is int and type(rows[2]["dice"]) is float  # CSV-ready numbers
    assert rows[1]["hd95"] == rows[1]["assd"] == pytest.approx(math.sqrt(32))


def test_accumulator_takes_images_of_different_sizes_and_batches():
    accumulator = MetricAccumulator(surface=True)
    accumulator.add("small", mask((3, 4), (0, 0)), mask((3, 4), (0, 0)))
    # A batch of two 6×6 images: single pixels 5 apart (3-4-5), then two empty masks.
    pred = np.stack([mask((6, 6), (0, 0)), np.zeros((6, 6), dtype=bool)])
    target = np.stack([mask((6, 6), (3, 4)), np.zeros((6, 6), dtype=bool)])
    accumulator.update(torch.from_numpy(pred), torch.from_numpy(target), ids=["far", "empty"])
    assert accumulator.ids == ["small", "far", "empty"]
    assert accumulator.counts.tolist() == [[1, 0, 0, 11], [0, 1, 1, 34], [0, 0, 0, 36]]
    columns = accumulator.per_image()
    np.testing.assert_allclose(columns["hd95"], [0.0, 5.0, 0.0])
    np.testing.assert_allclose(columns["dice"], [1.0, 0.0, 1.0])  # both empty: 1
    with pytest.raises(ValueError, match="ids"):
        accumulator.update(pred, target, ids=["only one"])


def test_accumulator_merge_keeps_ids_and_distances_and_refuses_a_mix():
    first, second = MetricAccumulator(surface=True), MetricAccumulator(surface=True)
    images = _three_images()
    first.add(*images[0])
    for image in images[1:]:
        second.add(*image)
    merged = first.merge(second)
    assert merged.ids == ["a", "c", "b"]
    np.testing.assert_allclose(merged.per_image()["assd"], [0.0, math.sqrt(32), 0.5])
    with pytest.raises(ValueError, match="surface"):
        MetricAccumulator().merge(second)
    # Unnamed images are named by their position after the merge, so names stay unique.
    unnamed = MetricAccumulator.from_counts(torch.tensor([[1, 0, 0, 0]])).merge(
        MetricAccumulator.from_counts(torch.tensor([[0, 1, 0, 0]]))
    )
    assert unnamed.ids == ["0", "1"]


def test_surface_distances_gives_hd95_and_assd_together():
    pred, target = mask((3, 6), (0, 0)), mask((3, 6), (0, 0), (0, 4))
    assert surface_distances(pred, target) == pytest.approx((3.6, 4 / 3))
    assert surface_distances(np.zeros((3, 4), bool), np.ones((3, 4), bool)) == (5.0, 5.0)


def test_surface_distances_take_a_spacing_per_axis_in_3d():
    pred = np.zeros((4, 6, 6), dtype=bool)
    target = np.zeros_like(pred)
    pred[1, 1:5, 1:5] = True
    target[3, 1:5, 1:5] = True  # two slices away, 2.5 mm apart: every surface voxel at 5 mm
    assert surface_distances(pred, target, spacing=(2.5, 0.7, 0.7)) == pytest.approx((5.0, 5.0))
    assert hausdorff95(pred[1], target[1]) == math.hypot(6, 6)  # 2-D without spacing: unchanged
