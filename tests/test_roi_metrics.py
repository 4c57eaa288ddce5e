"""Regions of interest (DRIVE's field of view) and the pixel AUC in metrics and evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from medseg.cli import main
from medseg.commands.evaluate import evaluate_folder, format_summary
from medseg.metrics import MetricAccumulator, PixelAUC
from medseg.prediction.predictor import Predictor


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------
# Hand-computed metrics inside an ROI


def _case():
    """A 4×4 image whose left two columns are the ROI (8 pixels).

    Inside: truth holds 2 pixels, the prediction finds 1 of them and adds 1 false positive, so
    tp 1, fp 1, fn 1, tn 5. Outside: a false positive and a missed pixel, which must not count.
    """
    truth = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    roi = np.zeros((4, 4), bool)
    roi[:, :2] = True
    truth[0, 0] = truth[1, 0] = True  # inside
    pred[0, 0] = pred[3, 1] = True  # one hit, one false positive inside
    truth[2, 3] = True  # outside: would be a miss
    pred[0, 3] = pred[1, 3] = True  # outside: would be false positives
    return pred, truth, roi


def test_roi_restricts_counts_and_metrics():
    pred, truth, roi = _case()
    metrics = MetricAccumulator()
    metrics.add("a", pred, truth, roi=roi)
    assert metrics.counts.tolist() == [[1, 1, 1, 5]]
    row = metrics.rows()[0]
    assert row["dice"] == pytest.approx(2 / 4)
    assert row["accuracy"] == pytest.approx(6 / 8)
    assert row["sensitivity"] == pytest.approx(1 / 2)
    assert row["specificity"] == pytest.approx(5 / 6)

    unrestricted = MetricAccumulator()
    unrestricted.add("a", pred, truth)
    # Without the ROI: tp 1, fp 3, fn 2, tn 10: every number differs.
    assert unrestricted.counts.tolist() == [[1, 3, 2, 10]]
    assert unrestricted.rows()[0]["dice"] == pytest.approx(2 / 7)


def test_roi_sets_outside_to_background_for_surface_distances():
    truth = np.zeros((8, 8), bool)
    pred = np.zeros((8, 8), bool)
    truth[2:4, 1:3] = pred[2:4, 1:3] = True  # identical inside the ROI
    pred[6, 7] = True  # a stray pixel outside it: HD95 > 0 without the ROI
    roi = np.zeros((8, 8), bool)
    roi[:, :5] = True
    metrics = MetricAccumulator(surface=True)
    metrics.add("inside", pred, truth, roi=roi)
    metrics.add("whole", pred, truth)
    hd95 = [row["hd95"] for row in metrics.rows()]
    assert hd95[0] == 0.0
    assert hd95[1] > 1.0


def test_roi_of_a_label_map_counts_each_class_inside_only():
    truth = np.array([[1, 2, 0, 1]], np.uint8)
    pred = np.array([[1, 1, 2, 2]], np.uint8)
    roi = np.array([[True, True, True, False]])
    metrics = MetricAccumulator(classes=("a", "b"))
    metrics.add("x", pred, truth, roi=roi)
    # Class 1 inside: pred [1,1,0] truth [1,0,0] -> tp 1 fp 1 fn 0 tn 1.
    # Class 2 inside: pred [0,0,1] truth [0,1,0] -> tp 0 fp 1 fn 1 tn 1.
    assert metrics.counts.tolist() == [[[1, 1, 0, 1], [0, 1, 1, 1]]]


# ----------------------------------------------------------------------------------------------
# Pixel AUC


def test_pixel_auc_matches_sklearn_and_ignores_pixels_outside_the_roi():
    rng = np.random.default_rng(1)
    probabilities = [rng.random((5, 6)).astype(np.float32) for _ in range(2)]
    truths = [rng.random((5, 6)) > 0.6 for _ in range(2)]
    rois = [rng.random((5, 6)) > 0.3 for _ in range(2)]
    auc = PixelAUC()
    for probability, truth, roi in zip(probabilities, truths, rois, strict=True):
        # Outside the ROI, scores that would make the AUC perfect or hopeless if they counted.
        auc.add(np.where(roi, probability, truth.astype(np.float32)), truth, roi=roi)
    expected = roc_auc_score(
        np.concatenate([t[r] for t, r in zip(truths, rois, strict=True)]),
        np.concatenate([p[r] for p, r in zip(probabilities, rois, strict=True)]),
    )
    assert auc.value() == pytest.approx(expected, abs=1e-12)
    assert auc.pixels == sum(int(r.sum()) for r in rois)
    assert 0.3 < auc.value() < 0.8  # the random scores: far from the 1.0 outside would give


def test_pixel_auc_subsamples_deterministically_above_the_cap():
    rng = np.random.default_rng(2)
    truth = rng.random((100, 100)) > 0.5
    probability = np.clip(truth * 0.3 + rng.random((100, 100)) * 0.7, 0, 1)
    full, capped, again = PixelAUC(), PixelAUC(max_pixels=3000), PixelAUC(max_pixels=3000)
    for auc in (full, capped, again):
        for _ in range(2):
            auc.add(probability, truth)
    assert full.pixels == 20_000
    assert capped.pixels <= 3000 and capped.rate == 1 / 8
    assert capped.value() == again.value()
    assert capped.value() == pytest.approx(full.value(), abs=0.03)


def test_pixel_auc_is_none_when_the_truth_holds_one_class():
    auc = PixelAUC()
    auc.add(np.full((3, 3), 0.2), np.zeros((3, 3), bool))
    assert auc.value() is None


# ----------------------------------------------------------------------------------------------
# Through evaluate_folder and the command line


def _write_fov(test: Path, *, size=(64, 64), skip: str | None = None) -> Path:
    fov = test / "fov"
    fov.mkdir()
    inside = np.zeros(size, np.uint8)
    inside[8:-8, 8:-8] = 255
    for image in sorted((test / "images").iterdir()):
        if image.stem != skip:
            Image.fromarray(inside).save(fov / f"{image.stem}.png")
    return fov


def test_fov_folder_is_used_automatically(synthetic_root, tiny_checkpoint, tmp_path):
    test = synthetic_root / "test"
    whole = evaluate_folder(tiny_checkpoint, test, tmp_path / "whole", progress=False)
    assert whole["roi"] is None
    fov = _write_fov(test)
    summary = evaluate_folder(tiny_checkpoint, test, tmp_path / "fov", progress=False)
    assert summary["roi"] == str(fov)
    assert json.loads((tmp_path / "fov" / "summary.json").read_text())["roi"] == str(fov)
    # Each image's counts cover the 48×48 field of view only.
    rows = (tmp_path / "fov" / "per_image.csv").read_text().splitlines()
    header = rows[0].split(",")
    for line in rows[1:]:
        values = dict(zip(header, line.split(","), strict=True))
        assert sum(int(values[k]) for k in ("tp", "fp", "fn", "tn")) == 48 * 48

    # The AUC over the field-of-view pixels, recomputed here from the same predictions.
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    from medseg.data.folder import find_pairs
    from medseg.data.io import read_image, read_mask

    scores, truths = [], []
    for sample in find_pairs(test):
        image = read_image(sample.image)
        probability = predictor.probabilities([image])[0]
        inside = read_mask(fov / f"{sample.image.stem}.png")
        scores.append(probability[inside])
        truths.append(read_mask(sample.mask)[inside])
    expected = roc_auc_score(np.concatenate(truths), np.concatenate(scores))
    assert summary["auc"] == pytest.approx(expected, abs=1e-6)
    assert summary["auc"] != pytest.approx(whole["auc"], abs=1e-9)
    assert "Pixel AUC" in format_summary(summary)
    assert f"inside the ROI masks in {fov}" in format_summary(summary)


def test_roi_flag_on_the_command_line(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    elsewhere = tmp_path / "masks-of-the-fov"
    (elsewhere / "images").mkdir(parents=True)
    for image in (synthetic_root / "test" / "images").iterdir():
        (elsewhere / "images" / image.name).touch()  # only their names matter to _write_fov
    fov = _write_fov(elsewhere)
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_root)]
    out = tmp_path / "evaluation"
    assert main([*args, "--out", str(out), "--roi", str(fov), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"inside the ROI masks in {fov}" in printed
    assert "Pixel AUC" in printed
    assert json.loads((out / "summary.json").read_text())["roi"] == str(fov)


def test_missing_roi_mask_is_one_line(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    test = synthetic_root / "test"
    missing = sorted((test / "images").iterdir())[1].stem
    _write_fov(test, skip=missing)
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(test)]
    assert main([*args, "--out", str(tmp_path / "e"), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "no ROI mask" in err and f"{missing}.png" in err
    assert not (tmp_path / "e" / "summary.json").exists()


def test_roi_of_another_size_is_one_line(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    test = synthetic_root / "test"
    fov = _write_fov(test, size=(32, 64))
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(test)]
    assert main([*args, "--out", str(tmp_path / "e"), "--quiet"]) == 2
    err = _one_line_error(capsys)
    first = sorted(fov.iterdir())[0]
    assert f"ROI {first} is 64×32" in err and "64×64" in err
    assert not (tmp_path / "e" / "summary.json").exists()


def test_roi_folder_not_found_is_one_line(synthetic_root, tiny_checkpoint, tmp_path, capsys):
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_root)]
    assert main([*args, "--out", str(tmp_path / "e"), "--roi", str(tmp_path / "nope")]) == 2
    assert "ROI folder not found" in _one_line_error(capsys)
