"""Validation (`medseg.engine.validation`) and folder evaluation (`medseg.commands.evaluate`)."""

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRECISIONS
from PIL import Image

import medseg
from medseg.cli import main
from medseg.commands.evaluate import (
    BINARY_ONLY,
    PER_CLASS_TABLE,
    PER_IMAGE_COLUMNS,
    SUMMARY_TABLE,
    evaluate_folder,
    format_summary,
    score_pair,
)
from medseg.config import build_config
from medseg.data.folder import find_pairs
from medseg.data.io import read_image, read_mask, read_target
from medseg.engine import validation
from medseg.engine.checkpoint import save_checkpoint
from medseg.engine.runtime import select_precision
from medseg.engine.validation import evaluate_loader
from medseg.losses import DiceBCELoss
from medseg.metrics import (
    MetricAccumulator,
    binarize,
    class_counts,
    confusion_counts,
    dice,
    mean_interval,
)
from medseg.model import DeepLabV3Plus
from medseg.prediction.predictor import Predictor

CPU = torch.device("cpu")

# summary.json's keys, in order: README, benchmarks/accuracy.py and users' scripts read them.
SUMMARY_KEYS = [
    "images",
    *(f"{name}{suffix}" for name in ("dice", "iou", "accuracy", "sensitivity", "specificity",
                                     "hd95", "assd") for suffix in ("", "_median")),
    "dice_pooled",
    "iou_pooled",
    "thresholded_jaccard",
    "worst",
    "dice_ci95",
    "auc",  # binary checkpoints only
    "checkpoint",
    "data",
    "tta",
    "postprocess",
    "roi",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Validation during training


@pytest.fixture(scope="module")
def five_images():
    """An untrained resnet18 in eval mode and 5 random 64×64 images with masks, one empty."""
    torch.manual_seed(0)
    model = medseg.DeepLabV3Plus(num_classes=1, backbone="resnet18").eval()
    images = torch.randn(5, 3, 64, 64)
    masks = (torch.rand(5, 1, 64, 64) > 0.7).float()
    masks[3] = 0.0
    return model, images, masks


def _validate(model, images, masks, batch_size):
    loader = [
        {"image": images[start : start + batch_size], "mask": masks[start : start + batch_size]}
        for start in range(0, len(images), batch_size)
    ]
    return evaluate_loader(
        model,
        loader,
        loss_fn=DiceBCELoss(),  # pools its soft Dice over the batch it is given
        device=CPU,
        precision=select_precision("fp32", CPU),
    )


def test_validation_does_not_depend_on_the_batch_split(five_images):
    model, images, masks = five_images
    loss_of_2, metrics_of_2 = _validate(model, images, masks, batch_size=2)
    loss_of_5, metrics_of_5 = _validate(model, images, masks, batch_size=5)
    # The mean over images of each image's own loss, whatever the batches were.
    with torch.no_grad():
        logits = model(images)
    per_image = [float(DiceBCELoss()(logits[i : i + 1], masks[i : i + 1])) for i in range(5)]
    assert loss_of_2 == pytest.approx(sum(per_image) / 5, rel=1e-5)
    assert loss_of_5 == pytest.approx(sum(per_image) / 5, rel=1e-5)
    assert len(metrics_of_2) == len(metrics_of_5) == 5
    assert torch.equal(metrics_of_2.counts, metrics_of_5.counts)
    # val_dice is the mean over images of each image's Dice at threshold 0.5.
    counts = confusion_counts(binarize(torch.sigmoid(logits)), binarize(masks))
    expected_dice = float(dice(counts).mean())
    assert metrics_of_2.summary()["dice"] == pytest.approx(expected_dice)
    assert metrics_of_5.summary()["dice"] == pytest.approx(expected_dice)


def test_validation_threshold_moves_the_masks(five_images):
    model, images, masks = five_images
    loader = [{"image": images, "mask": masks}]
    options = {"loss_fn": DiceBCELoss(), "device": CPU, "precision": select_precision("fp32", CPU)}
    _, everything = evaluate_loader(model, loader, threshold=0.0, **options)
    _, nothing = evaluate_loader(model, loader, threshold=1.0, **options)
    tp, fp, _, _ = everything.counts.sum(0).tolist()
    assert tp + fp == 5 * 64 * 64  # every pixel is above probability 0
    assert nothing.counts[:, :2].sum() == 0  # none above probability 1


def test_validation_of_a_multi_class_model_counts_each_class():
    torch.manual_seed(0)
    model = medseg.DeepLabV3Plus(num_classes=3, backbone="resnet18").eval()
    images = torch.randn(5, 3, 64, 64)
    masks = torch.randint(0, 3, (5, 1, 64, 64)).float()  # class indices, as training's batches
    labels = ["background", "a", "b"]
    options = {"loss_fn": DiceBCELoss(), "device": CPU, "precision": select_precision("fp32", CPU)}
    by_2 = [{"image": images[i : i + 2], "mask": masks[i : i + 2]} for i in range(0, 5, 2)]
    loss_of_2, metrics_of_2 = evaluate_loader(model, by_2, labels=labels, **options)
    loss_of_5, metrics_of_5 = evaluate_loader(
        model, [{"image": images, "mask": masks}], labels=labels, **options
    )
    with torch.no_grad():
        logits = model(images)
    # Counts of the arg-max label maps, per class; the loss is each image's own, averaged.
    expected = class_counts(logits.argmax(1), masks[:, 0], classes=2)
    assert expected[:, :, 0].sum() > 0  # the untrained network gets some pixels right
    assert metrics_of_2.classes == ("a", "b")
    assert torch.equal(metrics_of_2.counts, expected)
    assert torch.equal(metrics_of_5.counts, expected)
    per_image = [float(DiceBCELoss()(logits[i : i + 1], masks[i : i + 1])) for i in range(5)]
    assert loss_of_2 == pytest.approx(sum(per_image) / 5, rel=1e-5)
    assert loss_of_5 == pytest.approx(sum(per_image) / 5, rel=1e-5)
    summary = metrics_of_2.summary()
    assert summary["per_class"]["b"]["dice"] == pytest.approx(float(dice(expected[:, 1]).mean()))
    assert summary["dice"] == pytest.approx(float(dice(expected).mean()))
    # As training gathers them from several processes: counts concatenated, names given.
    gathered = torch.cat([metrics_of_2.counts[:3], metrics_of_5.counts[3:]])
    rebuilt = MetricAccumulator.from_counts(gathered, classes=metrics_of_2.classes)
    assert rebuilt.summary() == summary
    with pytest.raises(ValueError, match="labels=config.data.labels"):
        evaluate_loader(model, by_2, **options)  # 3 outputs but no class names


def test_validation_imports_nothing_above_the_engine():
    # Layering: cli -> api -> evaluation -> inference -> engine; never back up.
    source = Path(validation.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    above = {
        "medseg.prediction.predictor",
        "medseg.commands.evaluate",
        "medseg.api",
        "medseg.cli",
        "medseg.commands.report",
    }
    assert imported & above == set()


# ----------------------------------------------------------------------------------------------
# Folder evaluation


def test_evaluate_folder_writes_consistent_summary_and_rows(
    tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "eval"
    summary = evaluate_folder(tiny_checkpoint, synthetic_root, out, progress=False)

    assert list(summary) == SUMMARY_KEYS
    assert summary["data"] == str(synthetic_root / "test")  # a root is scored on its test/
    assert summary["images"] == 4
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "per_image.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == PER_IMAGE_COLUMNS
        rows = list(reader)
    assert [row["id"] for row in rows] == ["SYN_0012", "SYN_0013", "SYN_0014", "SYN_0015"]

    # Each row is that pair's own score; the summary is their mean and their lowest Dice.
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    for sample, row in zip(find_pairs(synthetic_root / "test"), rows, strict=True):
        prediction = predictor.masks([read_image(sample.image)])[0]
        expected = score_pair(sample.id, prediction, read_mask(sample.mask))
        for column in ("tp", "fp", "fn", "tn"):
            assert int(row[column]) == expected[column], (sample.id, column)
        for column in ("dice", "iou", "hd95", "assd"):
            assert float(row[column]) == pytest.approx(expected[column], rel=1e-5, abs=1e-6)
    dices = [float(row["dice"]) for row in rows]
    assert summary["dice"] == pytest.approx(sum(dices) / 4, rel=1e-5)
    low, high = summary["dice_ci95"]
    assert min(dices) <= low < summary["dice"] < high <= max(dices)
    assert summary["worst"][0]["dice"] == pytest.approx(min(dices), rel=1e-5, abs=1e-6)
    assert [case["dice"] for case in summary["worst"]] == sorted(
        case["dice"] for case in summary["worst"]
    )


# What the tiny checkpoint scored on synthetic_root's test/ before label maps existed (commit
# 3a1e4c8): binary checkpoints keep these files, values and keys. The untrained network calls
# every pixel foreground, far from the threshold, so no pixel sits on a rounding edge.
PINNED_PER_IMAGE_CSV = """\
id,dice,iou,accuracy,sensitivity,specificity,hd95,assd,tp,fp,fn,tn
SYN_0012,0.327139,0.195557,0.195557,1,0,39.1278,19.4352,801,3295,0,0
SYN_0013,0.200747,0.111572,0.111572,1,0,46.0402,23.6126,457,3639,0,0
SYN_0014,0.515673,0.347412,0.347412,1,0,24.0987,14.0855,1423,2673,0,0
SYN_0015,0.342036,0.206299,0.206299,1,0,32.5798,19.1176,845,3251,0,0
"""
PINNED_SUMMARY = {
    "images": 4,
    "dice": 0.34639874484937205,
    "dice_median": 0.33458754491482234,
    "iou": 0.2152099609375,
    "iou_median": 0.200927734375,
    "accuracy": 0.2152099609375,
    "accuracy_median": 0.200927734375,
    "sensitivity": 1.0,
    "sensitivity_median": 1.0,
    "specificity": 0.0,
    "specificity_median": 0.0,
    "hd95": 35.4616142384717,
    "hd95_median": 35.853765697738886,
    "assd": 19.062729002362172,
    "assd_median": 19.276424629005895,
    "dice_pooled": 0.3541938724259166,
    "iou_pooled": 0.2152099609375,
    "thresholded_jaccard": 0.0,
    "worst": [
        {"id": "SYN_0013", "dice": 0.2007467603777729},
        {"id": "SYN_0012", "dice": 0.3271390647335103},
        {"id": "SYN_0015", "dice": 0.3420360250961344},
        {"id": "SYN_0014", "dice": 0.5156731291900707},
    ],
    "auc": 0.7290695998094991,
    "tta": "flip",
    "postprocess": False,
    "roi": None,
}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_binary_evaluation_is_pinned_to_before_label_maps(
    tiny_checkpoint, synthetic_root, tmp_path, precision
):
    summary = evaluate_folder(
        tiny_checkpoint, synthetic_root, tmp_path, progress=False, precision=precision
    )
    # Every pixel is far from the threshold, so the masks and their metrics hold in bf16 too;
    # the AUC ranks probabilities, which each CPU rounds in its own way (pinned in fp32).
    assert (tmp_path / "per_image.csv").read_text() == PINNED_PER_IMAGE_CSV
    del summary["checkpoint"], summary["data"]
    # The interval came later, beside the pinned keys: the bootstrap of the pinned Dice values,
    # in the images' order (the resamples pick images by position).
    by_id = sorted(PINNED_SUMMARY["worst"], key=lambda case: case["id"])
    interval = mean_interval([case["dice"] for case in by_id])
    assert summary.pop("dice_ci95") == pytest.approx(list(interval), abs=1e-6)
    tolerance = {"fp32": 1e-6, "bf16": 0.01}[precision]  # fp32 kernels differ by CPU too
    assert summary["auc"] == pytest.approx(PINNED_SUMMARY["auc"], abs=tolerance)
    assert {**summary, "auc": None} == {**PINNED_SUMMARY, "auc": None}
    assert list(summary) == list(PINNED_SUMMARY)


def _probabilities(checkpoint, folder):
    """The predictor's (H, W) probability maps for the images of `folder`, in pair order."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    return predictor.probabilities([read_image(sample.image) for sample in find_pairs(folder)])


def _predicted_pixels(out):
    with open(out / "per_image.csv", newline="") as handle:
        return [int(row["tp"]) + int(row["fp"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("quantile", [0.25, 0.75])
def test_evaluate_folder_threshold_reaches_the_predictor(
    tiny_checkpoint, synthetic_root, tmp_path, quantile
):
    test = synthetic_root / "test"
    probabilities = _probabilities(tiny_checkpoint, test)
    # A cut inside the untrained network's range, so it moves pixels from one side to the other.
    threshold = float(np.quantile(np.concatenate([p.ravel() for p in probabilities]), quantile))
    expected = [int(binarize(probability, threshold).sum()) for probability in probabilities]
    assert 0 < sum(expected) < 4 * 64 * 64

    evaluate_folder(tiny_checkpoint, test, tmp_path / "api", threshold=threshold, progress=False)
    assert _predicted_pixels(tmp_path / "api") == expected
    code = main(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(test),
         "--out", str(tmp_path / "cli"), "--threshold", repr(threshold), "--quiet"]
    )  # fmt: skip
    assert code == 0
    assert _predicted_pixels(tmp_path / "cli") == expected


def test_evaluate_folder_refuses_to_replace_an_evaluation(
    tiny_checkpoint, synthetic_root, tmp_path
):
    out = tmp_path / "eval"
    evaluate_folder(tiny_checkpoint, synthetic_root, out, progress=False)
    with pytest.raises(medseg.MedsegError, match="--overwrite"):
        evaluate_folder(tiny_checkpoint, synthetic_root, out, progress=False)
    assert evaluate_folder(tiny_checkpoint, synthetic_root, out, progress=False, overwrite=True)


def test_cli_evaluate_says_which_folder_it_scored(
    tiny_checkpoint, synthetic_root, tmp_path, capsys
):
    code = main(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_root),
         "--out", str(tmp_path / "eval"), "--quiet"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"scored {synthetic_root / 'test'} (4 pairs)" in printed


def test_format_summary_prints_every_table_row_and_the_worst():
    summary = {key: 0.0 for _, key in SUMMARY_TABLE}
    summary.update(
        dice=0.8125, hd95=12.5, images=3, worst=[{"id": "ISIC_1", "dice": 0.25}, {"id": "ISIC_2", "dice": 0.5}]
    )  # fmt: skip
    lines = format_summary(summary).splitlines()
    assert len(lines) == 2 + len(SUMMARY_TABLE) + 1
    assert lines[2].startswith("Dice (mean over images)") and lines[2].endswith("0.8125")
    assert lines[-2].startswith("ASSD") and lines[-2].endswith("0.0000")
    assert any(line.startswith("HD95") and line.endswith("12.5000") for line in lines)
    assert lines[-1] == "3 images; lowest Dice: ISIC_1 (0.250), ISIC_2 (0.500)"


def test_format_summary_gives_the_mean_dice_interval_under_the_table():
    summary = {key: 0.0 for _, key in SUMMARY_TABLE}
    summary.update(
        dice=0.8577, dice_ci95=[0.8260, 0.8823], images=150, worst=[{"id": "a", "dice": 0.0}]
    )
    assert format_summary(summary).splitlines()[-1] == (
        "150 images (mean Dice 0.858, 95% bootstrap interval 0.826-0.882); lowest Dice: a (0.000)"
    )


# ----------------------------------------------------------------------------------------------
# Folder evaluation of label maps

LABELS = ["background", "a", "b"]


@pytest.fixture(scope="module")
def three_class_checkpoint(tmp_path_factory):
    """An untrained resnet18 for 64×64 inputs that tells background, a and b apart."""
    config = build_config(
        overrides={"model.backbone": "resnet18", "model.pretrained": False,
                   "data.image_size": 64, "data.labels": LABELS, "model.num_classes": 3}
    )  # fmt: skip
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    path = tmp_path_factory.mktemp("three-class") / "best.pt"
    save_checkpoint(
        path, {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    )
    return path


def _label_map_root(root, labels, *, values=3):
    """root/test with 3 random images of two sizes and label maps of ``values`` classes, and
    root/dataset.json declaring ``labels``."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / "test" / folder).mkdir(parents=True)
    for index, (height, width) in enumerate([(40, 48), (56, 36), (40, 48)]):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label_map = np.zeros((height, width), np.uint8)
        label_map[4:20, 4:20] = 1
        if index != 2:  # the last image holds no b
            label_map[24:36, 8:30] = values - 1
        Image.fromarray(image).save(root / "test" / "images" / f"mc_{index}.png")
        Image.fromarray(label_map).save(root / "test" / "masks" / f"mc_{index}_segmentation.png")
    names = {name: value for value, name in enumerate(labels)}
    (root / "dataset.json").write_text(json.dumps({"labels": names}))
    return root


def test_evaluate_folder_scores_each_class(three_class_checkpoint, tmp_path):
    root = _label_map_root(tmp_path / "data", LABELS)
    out, report = tmp_path / "eval", tmp_path / "report"
    summary = evaluate_folder(three_class_checkpoint, root, out, progress=False, report=report)

    assert list(summary) == [
        *SUMMARY_KEYS[: SUMMARY_KEYS.index("worst") + 1],
        "mean_foreground_dice", "per_class", "dice_ci95", "checkpoint", "data", "tta",
        "postprocess", "roi", "labels",
    ]  # fmt: skip
    assert summary["labels"] == LABELS
    assert list(summary["per_class"]) == ["a", "b"]
    assert summary["per_class"]["b"]["images_present"] == 2
    assert json.loads((out / "summary.json").read_text()) == summary
    per_class = [
        f"{name}_{label}" for name in ("dice", "iou", "sensitivity", "specificity", "hd95", "assd")
        for label in ("a", "b")
    ]  # fmt: skip
    with open(out / "per_image.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == (*PER_IMAGE_COLUMNS, *per_class)
        rows = list(reader)

    # Each row is the pair's own score: the checkpoint's label map against the mask read exactly.
    predictor = Predictor.from_checkpoint(three_class_checkpoint, device="cpu")
    for sample, row in zip(find_pairs(root / "test"), rows, strict=True):
        prediction = predictor.masks([read_image(sample.image)])[0]
        assert (
            prediction.dtype == np.uint8 and prediction.shape == Image.open(sample.image).size[::-1]
        )
        expected = score_pair(
            sample.id, prediction, read_target(sample.mask, LABELS), labels=LABELS
        )
        assert list(row) == list(expected)
        for column in ("tp", "fp", "fn", "tn"):
            assert int(row[column]) == expected[column], (sample.id, column)
        for column in ("dice", "iou", "hd95", *per_class):
            assert float(row[column]) == pytest.approx(expected[column], rel=1e-5, abs=1e-6)
    for label in ("a", "b"):
        dices = [float(row[f"dice_{label}"]) for row in rows]
        assert summary["per_class"][label]["dice"] == pytest.approx(np.mean(dices), rel=1e-5)
    assert summary["dice"] == pytest.approx(np.mean([float(row["dice"]) for row in rows]), rel=1e-5)

    lines = format_summary(summary).splitlines()
    for label in ("a", "b", "mean"):
        scores = summary["per_class"].get(label, summary)
        line = next(line for line in lines if line.split()[:1] == [label])
        assert [float(cell) for cell in line.split()[1:]] == pytest.approx(
            [round(scores[key], 4) for _, key in PER_CLASS_TABLE], abs=1e-4
        )
    page = (report / "index.html").read_text()
    assert "<h2>Per class</h2>" in page
    assert f"<tr><td>b</td><td>{summary['per_class']['b']['dice']:.4f}</td>" in page


def test_evaluate_folder_refuses_data_of_other_classes(
    three_class_checkpoint, tiny_checkpoint, tmp_path
):
    other = _label_map_root(tmp_path / "other", ["background", "a", "c"])
    with pytest.raises(medseg.MedsegError) as refused:
        evaluate_folder(three_class_checkpoint, other, tmp_path / "eval", progress=False)
    message = str(refused.value)
    assert "\n" not in message
    assert "['background', 'a', 'c']" in message and "['background', 'a', 'b']" in message
    # A binary checkpoint on label maps of three classes.
    three = _label_map_root(tmp_path / "three", LABELS)
    with pytest.raises(medseg.MedsegError, match=r"\['background', 'a', 'b'\].*binary masks"):
        evaluate_folder(tiny_checkpoint, three, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()  # refused before anything was written


def test_binary_label_maps_score_as_binary_masks(tiny_checkpoint, synthetic_root, tmp_path):
    # The same masks as 0/255 (half-range rule) and as 0/1 declared by a two-class dataset.json.
    summary = evaluate_folder(tiny_checkpoint, synthetic_root, tmp_path / "masks", progress=False)
    for path in (synthetic_root / "test" / "masks").iterdir():
        Image.fromarray(read_mask(path).astype(np.uint8)).save(path)
    (synthetic_root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "lesion": 1}})
    )
    labelled = evaluate_folder(tiny_checkpoint, synthetic_root, tmp_path / "maps", progress=False)
    assert labelled == summary
    assert (tmp_path / "maps" / "per_image.csv").read_text() == (
        tmp_path / "masks" / "per_image.csv"
    ).read_text()


def test_score_pair_of_label_maps_by_hand():
    # a: tp 3, fp 1, fn 1 (Dice 6/8); b: tp 3, fp 2, fn 1 (Dice 6/9).
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 0], [2, 2, 0, 0]], dtype=np.uint8)
    prediction = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 0, 0], [2, 2, 2, 2]], dtype=np.uint8)
    row = score_pair("x", prediction, truth, labels=LABELS)
    assert row["dice"] == pytest.approx((6 / 8 + 6 / 9) / 2)
    assert row["iou"] == pytest.approx((3 / 5 + 3 / 6) / 2)
    assert (row["dice_a"], row["dice_b"]) == pytest.approx((6 / 8, 6 / 9))
    binary = score_pair("x", prediction == 1, truth == 1)  # no labels: a binary mask
    assert binary["dice"] == pytest.approx(6 / 8) and "dice_a" not in binary


def test_format_summary_prints_one_row_per_class_and_their_mean():
    summary = {key: 0.0 for _, key in SUMMARY_TABLE}
    summary.update(dice=0.625, iou=0.5, hd95=7.25, assd=3.0, sensitivity=0.75, specificity=0.875)
    summary.update(images=2, worst=[{"id": "x", "dice": 0.5}])
    summary["per_class"] = {
        "left lung": {"dice": 0.75, "iou": 0.625, "hd95": 2.5, "assd": 1.0,
                      "sensitivity": 1.0, "specificity": 0.75},
        "heart": {"dice": 0.5, "iou": 0.375, "hd95": 12.0, "assd": 5.0,
                  "sensitivity": 0.5, "specificity": 1.0},
    }  # fmt: skip
    lines = format_summary(summary).splitlines()
    # The summary table without the binary task's rows (ISIC's thresholded Jaccard, the AUC),
    # then a blank line.
    start = 2 + len(SUMMARY_TABLE) - len(BINARY_ONLY) + 1
    assert lines[start - 1] == ""
    assert lines[start].split() == [
        "class",
        "Dice",
        "IoU",
        "HD95",
        "ASSD",
        "Sensitivity",
        "Specificity",
    ]
    assert lines[start + 2].startswith("left lung ")
    assert lines[start + 2].split()[2:] == [
        "0.7500",
        "0.6250",
        "2.5000",
        "1.0000",
        "1.0000",
        "0.7500",
    ]
    assert lines[start + 3].split() == [
        "heart",
        "0.5000",
        "0.3750",
        "12.0000",
        "5.0000",
        "0.5000",
        "1.0000",
    ]
    assert lines[start + 4].split() == [
        "mean",
        "0.6250",
        "0.5000",
        "7.2500",
        "3.0000",
        "0.7500",
        "0.8750",
    ]
    assert lines[-1] == "2 images; lowest Dice: x (0.500)"
