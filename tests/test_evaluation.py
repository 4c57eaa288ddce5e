"""Validation (`medseg.engine.evaluate`) and folder evaluation (`medseg.evaluation`)."""

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medseg
from medseg.cli import main
from medseg.data.folder import find_pairs
from medseg.data.io import read_image, read_mask
from medseg.engine import evaluate as validation
from medseg.engine.evaluate import evaluate_loader
from medseg.engine.runtime import select_precision
from medseg.evaluation import (
    PER_IMAGE_COLUMNS,
    SUMMARY_TABLE,
    evaluate_folder,
    format_summary,
    score_pair,
)
from medseg.inference import Predictor
from medseg.losses import DiceBCELoss
from medseg.metrics import binarize, confusion_counts, dice

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
    "checkpoint",
    "data",
    "tta",
    "postprocess",
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
    above = {"medseg.inference", "medseg.evaluation", "medseg.api", "medseg.cli", "medseg.report"}
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
    assert summary["worst"][0]["dice"] == pytest.approx(min(dices), rel=1e-5, abs=1e-6)
    assert [case["dice"] for case in summary["worst"]] == sorted(
        case["dice"] for case in summary["worst"]
    )


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
