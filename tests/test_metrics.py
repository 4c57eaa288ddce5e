"""Metrics against hand-computed counts, values and distances."""

import math

import numpy as np
import pytest
import torch

from medseg.metrics import (
    MetricAccumulator,
    average_surface_distance,
    confusion_counts,
    dice,
    hausdorff95,
    iou,
    pixel_accuracy,
    sensitivity,
    specificity,
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
        "accuracy_pooled": 6 / 8,
        "sensitivity": (1 / 2 + 1) / 2,
        "sensitivity_pooled": 5 / 6,
        "specificity": (1 / 2 + 1) / 2,
        "specificity_pooled": 1 / 2,
    }
    summary = accumulator.summary()
    assert summary.keys() == expected.keys()
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key


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
