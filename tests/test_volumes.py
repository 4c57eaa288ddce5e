"""NIfTI volumes: prediction slice by slice back into a label volume, 3D scores in millimetres."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_nnunet import AFFINE, LABELS, SHAPE, case_volumes, save_nifti, write_nnunet_root

from medseg.cli import main
from medseg.commands.volumes import collect_volumes, score_volume

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def two_channel_checkpoint(tmp_path_factory):
    """An untrained 2-channel, 3-class resnet18 for 64×64 slices: enough to predict and score."""
    from medseg.config import build_config
    from medseg.engine.checkpoint import save_checkpoint
    from medseg.model import DeepLabV3Plus

    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.pretrained": False,
            "model.in_channels": 2,
            "model.num_classes": 3,
            "data.channels": 2,
            "data.labels": list(LABELS),
            "data.image_size": 64,
        }
    )
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    path = tmp_path_factory.mktemp("two-channel") / "best.pt"
    save_checkpoint(
        path, {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    )
    return path


# --- 3D scores ---------------------------------------------------------------------------------


def test_hd95_is_in_millimetres_along_the_anisotropic_axis():
    truth = np.zeros((8, 8, 10), np.uint8)
    predicted = np.zeros_like(truth)
    truth[2:6, 2:6, 3] = 1  # one-voxel-thick slabs two slices apart: every surface voxel is
    predicted[2:6, 2:6, 5] = 1  # 2 slices × 3 mm = 6 mm from the other slab
    [score] = score_volume(predicted, truth, (0.5, 0.5, 3.0), classes=1)
    assert score["dice"] == 0.0
    assert score["hd95_mm"] == pytest.approx(6.0)


def test_hd95_uses_each_axis_own_spacing():
    truth = np.zeros((10, 8, 8), np.uint8)
    predicted = np.zeros_like(truth)
    truth[3, 2:6, 2:6] = 2
    predicted[5, 2:6, 2:6] = 2
    scores = score_volume(predicted, truth, (0.5, 1.0, 3.0), classes=2)
    assert scores[1]["hd95_mm"] == pytest.approx(1.0)  # 2 voxels × 0.5 mm
    assert scores[0] == {"dice": 1.0, "hd95_mm": 0.0, "truth_voxels": 0, "predicted_voxels": 0}


def test_dice_is_three_dimensional():
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:5, 1:5, 1:3] = 1  # 32 voxels
    predicted = np.zeros_like(truth)
    predicted[1:5, 1:5, 1:2] = 1  # 16 of them
    [score] = score_volume(predicted, truth, (1.0, 1.0, 1.0), classes=1)
    assert score["dice"] == pytest.approx(2 * 16 / 48)
    assert score["hd95_mm"] == pytest.approx(1.0)


# --- predict -------------------------------------------------------------------------------------


def test_predict_writes_uint8_label_volumes_on_the_input_grid(tmp_path, two_channel_checkpoint):
    root = write_nnunet_root(tmp_path / "root")
    image = nib.load(root / "imagesTs" / "brain3_0000.nii.gz")
    image.header["descrip"] = b"scanner X"
    nib.save(image, root / "imagesTs" / "brain3_0000.nii.gz")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(two_channel_checkpoint), "--input"]
    assert main([*argv, str(root / "imagesTs"), "--out", str(out), "--quiet"]) == 0
    written = nib.load(out / "brain3.nii.gz")
    assert written.shape == SHAPE
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.header.get_zooms() == pytest.approx((0.8, 0.8, 3.0))
    assert written.header["descrip"].item() == b"scanner X"
    values = np.asarray(written.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2}


def test_predicted_slices_are_the_predictor_masks_of_the_windowed_slices(
    tmp_path, two_channel_checkpoint
):
    from medseg.data.nnunet import read_volume
    from medseg.prediction.predictor import Predictor

    root = write_nnunet_root(tmp_path / "root", test=("brain3",))
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(two_channel_checkpoint), "--tta", "none", "--quiet"]
    assert main([*argv, "--input", str(root / "imagesTs"), "--out", str(out)]) == 0
    paths = sorted((root / "imagesTs").iterdir())
    volume, _ = read_volume(paths, "brain3")
    predictor = Predictor.from_checkpoint(two_channel_checkpoint, tta="none", device="cpu")
    expected = predictor.masks([volume[:, :, 4]])[0]
    np.testing.assert_array_equal(
        np.asarray(nib.load(out / "brain3.nii.gz").dataobj)[:, :, 4], expected
    )


def test_a_single_volume_feeds_a_gray_or_rgb_checkpoint(tmp_path, tiny_checkpoint):
    channels, _ = case_volumes(0)
    save_nifti(tmp_path / "head.nii.gz", channels[0])
    out = tmp_path / "out"
    argv = [
        "predict",
        "--checkpoint",
        str(tiny_checkpoint),
        "--input",
        str(tmp_path / "head.nii.gz"),
    ]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    written = nib.load(out / "head.nii.gz")
    np.testing.assert_allclose(written.affine, AFFINE)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}  # binary: 0/1 labels


def test_an_earlier_volume_not_written_by_predict_is_refused(tmp_path, tiny_checkpoint, capsys):
    channels, _ = case_volumes(0)
    save_nifti(tmp_path / "head.nii.gz", channels[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "head.nii.gz").write_bytes(b"someone's work")
    argv = [
        "predict",
        "--checkpoint",
        str(tiny_checkpoint),
        "--input",
        str(tmp_path / "head.nii.gz"),
    ]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "--overwrite" in message and "head.nii.gz" in message
    assert (out / "head.nii.gz").read_bytes() == b"someone's work"
    assert main([*argv, "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert nib.load(out / "head.nii.gz").shape == SHAPE


def test_a_case_missing_a_channel_is_refused(tmp_path, two_channel_checkpoint, capsys):
    root = write_nnunet_root(tmp_path / "root", test=("brain3", "brain4"))
    (root / "imagesTs" / "brain4_0001.nii.gz").unlink()
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(two_channel_checkpoint), "--quiet"]
    assert main([*argv, "--input", str(root / "imagesTs"), "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert "case brain4" in message and "2 channels" in message and "\n" not in message
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_volumes_are_grouped_by_case_into_channels(tmp_path):
    for name in ("b_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "a_0001.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = collect_volumes(tmp_path, 2)
    assert {case: [p.name for p in paths] for case, paths in cases.items()} == {
        "a": ["a_0000.nii.gz", "a_0001.nii.gz"],
        "b": ["b_0000.nii.gz", "b_0001.nii.gz"],
    }


# --- evaluate ------------------------------------------------------------------------------------


def test_evaluate_scores_each_volume_in_millimetres(tmp_path, two_channel_checkpoint, capsys):
    root = write_nnunet_root(tmp_path / "root", test=("brain3", "brain4"))
    out = tmp_path / "evaluation"
    argv = ["evaluate", "--checkpoint", str(two_channel_checkpoint), "--data", str(root)]
    assert main([*argv, "--out", str(out), "--quiet", "--tta", "none"]) == 0
    rows = (out / "per_volume.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,hd95_mm,truth_voxels,predicted_voxels"
    assert [row.split(",")[:2] for row in rows[1:]] == [
        ["brain3", "necrosis"], ["brain3", "oedema"], ["brain4", "necrosis"], ["brain4", "oedema"],
    ]  # fmt: skip
    assert [int(row.split(",")[4]) for row in rows[1:]] == [32, 18, 32, 18]  # 4×4 and 3×3, 2 slices
    summary = json.loads((out / "summary.json").read_text())
    assert summary["volumes"] == 2 and summary["slices"] == 12
    assert set(summary["per_class"]) == {"necrosis", "oedema"}
    assert 0 <= summary["slice_dice"] <= 1
    assert "per-slice mean Dice" in capsys.readouterr().out


def test_evaluate_refuses_a_checkpoint_of_other_classes(tmp_path, tiny_checkpoint, capsys):
    root = write_nnunet_root(tmp_path / "root")
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(root)]
    assert main([*argv, "--out", str(tmp_path / "evaluation"), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert "declares the classes ['background', 'necrosis', 'oedema']" in message
    assert "\n" not in message and not (tmp_path / "evaluation").exists()


def test_evaluate_without_test_labels_says_there_is_nothing_to_score(
    tmp_path, two_channel_checkpoint, capsys
):
    root = write_nnunet_root(tmp_path / "root")
    shutil.rmtree(root / "labelsTs")
    argv = ["evaluate", "--checkpoint", str(two_channel_checkpoint), "--data", str(root)]
    assert main([*argv, "--out", str(tmp_path / "evaluation"), "--quiet"]) == 2
    assert "no imagesTs/ with labelsTs/: nothing to score" in capsys.readouterr().err
    assert not (tmp_path / "evaluation").exists()


def test_train_accepts_an_nnunet_root(tmp_path, tiny_flags):
    root = write_nnunet_root(tmp_path / "root")
    run = tmp_path / "run"
    assert (
        main(["train", "--data", str(root), "--out", str(run), "--epochs", "1", *tiny_flags]) == 0
    )
    config = (run / "config.yaml").read_text()
    assert "channels: 2" in config and "oedema" in config
