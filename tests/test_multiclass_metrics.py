"""Per-class metrics of label maps against hand-computed counts, values and distances."""

import math

import numpy as np
import pytest
import torch

from medseg.metrics import (
    BINARY_CLASSES,
    MetricAccumulator,
    class_counts,
    confusion_counts,
    dice,
    foreground_classes,
    iou,
    pixel_accuracy,
    sensitivity,
    specificity,
)

CLASSES = ("a", "b")  # labels ["background", "a", "b"]: class values 1 and 2

# Image 1, 4×4 label maps (0 background, 1 a, 2 b):
#   truth          pred
#   0 0 1 1        0 1 1 1
#   0 0 1 1        0 0 1 0
#   2 2 0 0        2 0 0 0
#   2 2 0 0        2 2 2 2
# a: truth (0,2) (0,3) (1,2) (1,3), pred (0,1) (0,2) (0,3) (1,2) -> tp 3, fp 1, fn 1, tn 11.
# b: truth (2,0) (2,1) (3,0) (3,1), pred (2,0) (3,0) (3,1) (3,2) (3,3) -> tp 3, fp 2, fn 1, tn 10.
TRUTH_1 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]], dtype=np.uint8)
PRED_1 = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 0, 0], [2, 2, 2, 2]], dtype=np.uint8)
# Image 2: a in truth at (0,0) (0,1), predicted at (0,0) -> tp 1, fp 0, fn 1, tn 14.
# b is absent from both -> tp 0, fp 0, fn 0, tn 16: Dice = IoU = 1 by the empty-case convention.
TRUTH_2 = np.zeros((4, 4), dtype=np.uint8)
TRUTH_2[0, :2] = 1
PRED_2 = np.zeros((4, 4), dtype=np.uint8)
PRED_2[0, 0] = 1

# (image, class) -> counts, dice, iou, accuracy, sensitivity, specificity
CLASS_TABLE = [
    (1, "a", (3, 1, 1, 11), 6 / 8, 3 / 5, 14 / 16, 3 / 4, 11 / 12),
    (1, "b", (3, 2, 1, 10), 6 / 9, 3 / 6, 13 / 16, 3 / 4, 10 / 12),
    (2, "a", (1, 0, 1, 14), 2 / 3, 1 / 2, 15 / 16, 1 / 2, 1.0),
    (2, "b", (0, 0, 0, 16), 1.0, 1.0, 1.0, 1.0, 1.0),  # absent from both
]


def _two_images() -> MetricAccumulator:
    accumulator = MetricAccumulator(classes=CLASSES)
    accumulator.add("one", PRED_1, TRUTH_1)
    accumulator.add("two", PRED_2, TRUTH_2)
    return accumulator


def test_class_counts_by_hand():
    pred = torch.from_numpy(np.stack([PRED_1, PRED_2]))
    truth = torch.from_numpy(np.stack([TRUTH_1, TRUTH_2]))
    counts = class_counts(pred, truth, classes=2)
    assert counts.dtype == torch.int64
    assert counts.shape == (2, 2, 4)  # images, classes, (tp, fp, fn, tn)
    expected = [
        [list(row[2]) for row in CLASS_TABLE[:2]],
        [list(row[2]) for row in CLASS_TABLE[2:]],
    ]
    assert counts.tolist() == expected
    # (N, 1, H, W) and float class indices (training's masks) give the same counts.
    assert torch.equal(
        class_counts(pred[:, None].float(), truth[:, None].float(), classes=2), counts
    )


@pytest.mark.parametrize(("image", "name", "counts", "d", "j", "acc", "sens", "spec"), CLASS_TABLE)
def test_per_class_metrics_by_hand(image, name, counts, d, j, acc, sens, spec):
    accumulator = _two_images()
    index = CLASSES.index(name)
    assert accumulator.counts[image - 1, index].tolist() == list(counts)
    for metric, expected in [
        (dice, d),
        (iou, j),
        (pixel_accuracy, acc),
        (sensitivity, sens),
        (specificity, spec),
    ]:
        assert metric(accumulator.counts)[image - 1, index].item() == pytest.approx(expected)


def test_per_image_rows_hold_class_means_then_each_class():
    rows = _two_images().rows()
    assert tuple(rows[0]) == (
        "id", "dice", "iou", "accuracy", "sensitivity", "specificity", "tp", "fp", "fn", "tn",
        "dice_a", "dice_b", "iou_a", "iou_b", "sensitivity_a", "sensitivity_b",
        "specificity_a", "specificity_b",
    )  # fmt: skip
    assert rows[0] == {
        "id": "one",
        "dice": pytest.approx((6 / 8 + 6 / 9) / 2),  # 17/24
        "iou": pytest.approx((3 / 5 + 3 / 6) / 2),
        "accuracy": pytest.approx((14 / 16 + 13 / 16) / 2),
        "sensitivity": pytest.approx(3 / 4),
        "specificity": pytest.approx((11 / 12 + 10 / 12) / 2),
        "tp": 6,  # counts are summed over the classes
        "fp": 3,
        "fn": 2,
        "tn": 21,
        "dice_a": pytest.approx(6 / 8),
        "dice_b": pytest.approx(6 / 9),
        "iou_a": pytest.approx(3 / 5),
        "iou_b": pytest.approx(3 / 6),
        "sensitivity_a": pytest.approx(3 / 4),
        "sensitivity_b": pytest.approx(3 / 4),
        "specificity_a": pytest.approx(11 / 12),
        "specificity_b": pytest.approx(10 / 12),
    }
    # Image 2: b absent from truth and prediction counts as Dice = IoU = 1.
    assert rows[1]["dice_b"] == rows[1]["iou_b"] == 1.0
    assert rows[1]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert type(rows[0]["tp"]) is int and type(rows[0]["dice_a"]) is float  # CSV-ready


def test_summary_by_hand():
    summary = _two_images().summary()
    assert list(summary) == [
        "images", "dice", "dice_median", "iou", "iou_median", "accuracy", "accuracy_median",
        "sensitivity", "sensitivity_median", "specificity", "specificity_median",
        "dice_pooled", "iou_pooled", "thresholded_jaccard", "worst",
        "mean_foreground_dice", "per_class",
    ]  # fmt: skip
    image_dice = [17 / 24, 5 / 6]
    expected = {
        "images": 2,
        "dice": sum(image_dice) / 2,  # 37/48
        "dice_median": sum(image_dice) / 2,
        "iou": (11 / 20 + 3 / 4) / 2,
        # Pooled per class (a: tp 4, fp 1, fn 2; b: tp 3, fp 2, fn 1), then the mean.
        "dice_pooled": (8 / 11 + 6 / 9) / 2,
        "iou_pooled": (4 / 7 + 3 / 6) / 2,
        # Image IoUs 0.55 and 0.75: 0.55 < 0.65 counts as 0.
        "thresholded_jaccard": 0.75 / 2,
        "mean_foreground_dice": (17 / 24 + 5 / 6) / 2,
    }
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    assert summary["worst"] == [
        {"id": "one", "dice": pytest.approx(17 / 24)},
        {"id": "two", "dice": pytest.approx(5 / 6)},
    ]
    a, b = summary["per_class"]["a"], summary["per_class"]["b"]
    assert list(summary["per_class"]) == ["a", "b"]
    assert list(a) == [
        "images_present", "dice", "dice_median", "iou", "iou_median", "accuracy",
        "accuracy_median", "sensitivity", "sensitivity_median", "specificity",
        "specificity_median", "dice_pooled", "iou_pooled",
    ]  # fmt: skip
    assert a["images_present"] == 2 and b["images_present"] == 1
    assert a["dice"] == pytest.approx((6 / 8 + 2 / 3) / 2)
    assert b["dice"] == pytest.approx((6 / 9 + 1) / 2)  # the absent image counts 1
    assert b["dice_pooled"] == pytest.approx(6 / 9)  # ...but adds nothing to the pooled Dice
    assert a["iou_pooled"] == pytest.approx(4 / 7)
    assert a["sensitivity"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert b["specificity_median"] == pytest.approx((10 / 12 + 1) / 2)
    # The summary's Dice is the mean over classes of the classes' Dice.
    assert summary["mean_foreground_dice"] == pytest.approx(summary["dice"])


# Surface distances per class on 8×10 label maps (diagonal sqrt(8² + 10²) = sqrt(164)).
# Image "far": a single pixels (0,0) in pred and (3,4) in truth: 5 both ways (3-4-5);
#   b one-pixel lines, pred col 6 and truth col 9, rows 2-7: every distance 3.
# Image "extra": a the same 2×2 square in both (0); b predicted at (7,9) only, absent from
#   the truth: exactly one empty -> the diagonal.
def _surface_images():
    far_pred, far_truth = np.zeros((8, 10), np.uint8), np.zeros((8, 10), np.uint8)
    far_pred[0, 0], far_truth[3, 4] = 1, 1
    far_pred[2:8, 6], far_truth[2:8, 9] = 2, 2
    extra_pred, extra_truth = np.zeros((8, 10), np.uint8), np.zeros((8, 10), np.uint8)
    extra_pred[:2, :2] = extra_truth[:2, :2] = 1
    extra_pred[7, 9] = 2
    return [("far", far_pred, far_truth), ("extra", extra_pred, extra_truth)]


def test_hd95_and_assd_per_class_by_hand():
    accumulator = MetricAccumulator(classes=CLASSES, surface=True)
    for image_id, pred, truth in _surface_images():
        accumulator.add(image_id, pred, truth)
    diagonal = math.sqrt(164)
    far, extra = accumulator.rows()
    assert (far["hd95_a"], far["assd_a"]) == pytest.approx((5.0, 5.0))
    assert (far["hd95_b"], far["assd_b"]) == pytest.approx((3.0, 3.0))
    assert (far["hd95"], far["assd"]) == pytest.approx((4.0, 4.0))  # the mean of a and b
    assert (extra["hd95_a"], extra["assd_a"]) == (0.0, 0.0)
    assert (extra["hd95_b"], extra["assd_b"]) == pytest.approx((diagonal, diagonal))
    assert list(far)[-4:] == ["hd95_a", "hd95_b", "assd_a", "assd_b"]
    per_class = accumulator.summary()["per_class"]
    assert per_class["a"]["hd95"] == pytest.approx((5 + 0) / 2)
    assert per_class["b"]["assd"] == pytest.approx((3 + diagonal) / 2)
    assert per_class["b"]["hd95_median"] == pytest.approx((3 + diagonal) / 2)


def test_class_absent_from_both_has_distance_0():
    truth = np.zeros((5, 5), np.uint8)
    truth[1:3, 1:3] = 1  # class a only; b appears nowhere
    accumulator = MetricAccumulator(classes=CLASSES, surface=True)
    accumulator.add("only a", truth, truth)
    row = accumulator.rows()[0]
    assert row["dice_b"] == row["iou_b"] == row["sensitivity_b"] == row["specificity_b"] == 1.0
    assert row["hd95_b"] == row["assd_b"] == 0.0
    summary = accumulator.summary()
    assert summary["per_class"]["b"]["images_present"] == 0
    assert summary["per_class"]["b"]["dice_pooled"] == 1.0  # no pixel of b anywhere
    assert not any(math.isnan(value) for value in row.values() if isinstance(value, float))


def test_binary_masks_are_the_one_class_case():
    # Class 1 of a label map and a bool mask of it give one count row, in the binary layout.
    binary = MetricAccumulator()
    binary.add("x", PRED_1 == 1, TRUTH_1 == 1)
    assert binary.classes == BINARY_CLASSES and not binary.multi_class
    assert binary.counts.tolist() == [[3, 1, 1, 11]]  # (M, 4), as before label maps
    pred, truth = torch.from_numpy(PRED_1 == 1)[None], torch.from_numpy(TRUTH_1 == 1)[None]
    assert torch.equal(binary.counts, confusion_counts(pred, truth))
    assert "per_class" not in binary.summary() and "dice_a" not in binary.rows()[0]
    named = MetricAccumulator(classes=foreground_classes(["background", "lesion"]))
    named.add("x", (PRED_1 == 1).astype(np.uint8), (TRUTH_1 == 1).astype(np.uint8))
    assert named.summary() == binary.summary()  # a binary label map scores as a binary mask


def test_foreground_classes():
    assert foreground_classes([]) == BINARY_CLASSES
    assert foreground_classes(["background", "lesion"]) == ("lesion",)
    assert foreground_classes(("background", "a", "b")) == ("a", "b")


def test_counts_gathered_from_processes_give_the_same_summary():
    whole = _two_images()
    first, second = MetricAccumulator(classes=CLASSES), MetricAccumulator(classes=CLASSES)
    first.add("one", PRED_1, TRUTH_1)
    second.add("two", PRED_2, TRUTH_2)
    # What medseg.engine.runtime.all_gather_counts does: concatenate along the images.
    gathered = torch.cat([first.counts, second.counts])
    assert gathered.shape == (2, 2, 4)
    rebuilt = MetricAccumulator.from_counts(gathered, classes=CLASSES, ids=["one", "two"])
    assert rebuilt.summary() == whole.summary()
    assert MetricAccumulator.from_counts(gathered[:, :1], classes=["a"]).counts.shape == (2, 4)
    with pytest.raises(ValueError, match="classes=foreground_classes"):
        MetricAccumulator.from_counts(gathered)  # names are needed for 2 classes
    with pytest.raises(ValueError, match="3 class names"):
        MetricAccumulator.from_counts(gathered, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="merge"):
        first.merge(MetricAccumulator(classes=("b", "a")))
    assert MetricAccumulator(classes=CLASSES).counts.shape == (0, 2, 4)  # a rank without images


def test_label_maps_outside_the_classes_are_refused():
    accumulator = MetricAccumulator(classes=CLASSES)
    with pytest.raises(ValueError, match="0..2"):
        accumulator.add("x", np.full((2, 2), 3, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="arg-max"):
        accumulator.add("x", np.full((2, 2), 0.5), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="threshold"):  # binary: probabilities, not masks
        MetricAccumulator().add("x", np.full((2, 2), 0.5), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="threshold"):  # a label map given to a binary scorer
        MetricAccumulator().add("x", PRED_1, TRUTH_1)
    with pytest.raises(ValueError, match="each once"):
        MetricAccumulator(classes=("a", "a"))
    assert len(accumulator) == 0  # nothing half added
