"""nnU-Net v2 raw roots read as medseg roots of 2D slices (medseg.data.nnunet), and the pieces
that let C-channel slices through medseg (.npy images, to_channels, normalisation, the stem)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.cli import main
from medseg.core.errors import MedsegError
from medseg.data import nnunet
from medseg.data.cache import cache_root
from medseg.data.dataset import read_dataset_info
from medseg.data.folder import find_pairs
from medseg.data.io import image_size, read_image, to_channels
from medseg.data.transforms import normalisation

nib = pytest.importorskip("nibabel")

AFFINE = np.array(
    [[0.8, 0, 0, -6.0], [0, 0.8, 0, -6.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]], dtype=np.float64
)
LABELS = {"background": 0, "necrosis": 1, "oedema": 2}
SHAPE = (16, 16, 6)
FOREGROUND_SLICES = (2, 3)  # the other 4 slices of each case hold only background


def save_nifti(path: Path, data: np.ndarray, affine=AFFINE) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def case_volumes(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Two float channels (zero outside a 'head') and a 3-label map on `FOREGROUND_SLICES`."""
    rng = np.random.default_rng(seed)
    channels = [rng.normal(100 * (c + 1), 20, SHAPE).astype(np.float32) for c in range(2)]
    for channel in channels:
        channel[:2] = 0  # background air, left out of the windowing percentiles
    labels = np.zeros(SHAPE, np.uint8)
    for k in FOREGROUND_SLICES:
        labels[4:8, 4:8, k] = 1
        labels[9:12, 9:12, k] = 2
    return channels, labels


def write_nnunet_root(root: Path, *, train=("brain1", "brain2"), test=("brain3",)) -> Path:
    spec = {
        "channel_names": {"0": "FLAIR", "1": "T1c"},
        "labels": LABELS,
        "file_ending": ".nii.gz",
        "numTraining": len(train),
    }
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(spec))
    for split, cases in (("Tr", train), ("Ts", test)):
        (root / f"images{split}").mkdir()
        (root / f"labels{split}").mkdir()
        for index, case in enumerate(cases):
            channels, labels = case_volumes(index + (10 if split == "Ts" else 0))
            for c, channel in enumerate(channels):
                save_nifti(root / f"images{split}" / f"{case}_{c:04d}.nii.gz", channel)
            save_nifti(root / f"labels{split}" / f"{case}.nii.gz", labels)
    return root


@pytest.fixture
def nnunet_root(tmp_path):
    return write_nnunet_root(tmp_path / "Dataset001_Brain")


@pytest.fixture
def png_root(tmp_path):
    root = tmp_path / "Dataset002_Xray"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    spec = {"channel_names": {"0": "X-ray"}, "labels": LABELS, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(spec))
    for index, case in enumerate(("chest1", "chest2")):
        image = np.full((20, 24), 40 * (index + 1), np.uint8)
        labels = np.zeros((20, 24), np.uint8)
        labels[5:9, 5:9] = 1
        labels[12:15, 3:20] = 2
        Image.fromarray(image).save(root / "imagesTr" / f"{case}_0000.png")
        Image.fromarray(labels).save(root / "labelsTr" / f"{case}.png")
    return root


def test_a_root_without_images_tr_is_not_nnunet(tmp_path, synthetic_root):
    assert nnunet.slice_root(synthetic_root) is None


def test_nifti_root_becomes_two_channel_slices_with_the_labels(nnunet_root):
    sliced = nnunet.slice_root(nnunet_root)
    assert sliced.parent == cache_root() / "nnunet"
    info = read_dataset_info(sliced)
    assert info.labels == ("background", "necrosis", "oedema")
    assert info.channels == 2
    train = find_pairs(sliced / "train")
    # Per case: the 2 slices with foreground and ceil(4 / 4) = 1 of the 4 empty ones.
    assert len(train) == 6
    ids = sorted(sample.id for sample in train)
    for case in ("brain1", "brain2"):
        assert {f"{case}_z{k}" for k in FOREGROUND_SLICES} <= set(ids)
    image = read_image(sliced / "train" / "images" / "brain1_z2.npy", channels=2)
    assert image.shape == (16, 16, 2) and image.dtype == np.uint8
    assert image[:2].max() == 0 and image[2:].max() == 255  # air stays black; windowed to 255
    mask = np.asarray(Image.open(sliced / "train" / "masks" / "brain1_z2_segmentation.png"))
    assert mask[5, 5] == 1 and mask[10, 10] == 2 and mask[0, 0] == 0
    assert len(find_pairs(sliced / "test")) == 6  # a test split is scored on every slice


def test_prepare_caches_the_slices_of_an_nnunet_root(nnunet_root, capsys):
    assert main(["prepare", str(nnunet_root), "--size", "32"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "cached" in line]
    assert [line.split(": ")[1] for line in lines] == ["6 pairs cached at 32×32"] * 2  # train, test
    assert all(line.startswith(str(cache_root() / "nnunet")) for line in lines)


def test_slices_match_the_volume_windowed_per_channel(nnunet_root):
    sliced = nnunet.slice_root(nnunet_root)
    channels, _ = case_volumes(0)
    expected = nnunet.window(channels[1])[:, :, 3]
    stored = np.load(sliced / "train" / "images" / "brain1_z3.npy")
    np.testing.assert_array_equal(stored[..., 1], expected)


def test_the_slice_root_is_reused_until_a_source_changes(nnunet_root):
    first = nnunet.slice_root(nnunet_root)
    stamp = (first / "dataset.json").stat().st_mtime_ns
    assert nnunet.slice_root(nnunet_root) == first
    assert (first / "dataset.json").stat().st_mtime_ns == stamp
    channels, labels = case_volumes(0)
    labels[:, :, 5] = 1  # a 3rd foreground slice for brain1
    save_nifti(nnunet_root / "labelsTr" / "brain1.nii.gz", labels)
    second = nnunet.slice_root(nnunet_root)
    assert second != first
    assert (second / "train" / "masks" / "brain1_z5_segmentation.png").is_file()


def test_empty_slices_are_sampled_one_in_four_by_a_seed():
    labels = np.zeros((4, 4, 41), np.uint8)
    labels[1, 1, 10] = 1
    kept = nnunet.kept_slices(labels, "case")
    assert 10 in kept and len(kept) == 1 + 10  # ceil(40 / 4) empty slices
    assert kept == nnunet.kept_slices(labels, "case")
    assert kept != nnunet.kept_slices(labels, "other")


def test_window_clips_to_the_nonzero_percentiles():
    volume = np.zeros((10, 10, 10), np.float32)
    volume[5:] = np.arange(500, dtype=np.float32).reshape(5, 10, 10) + 1  # 1..500
    volume[9, 9, 9] = 1e6  # one bright outlier must not squash the rest
    windowed = nnunet.window(volume)
    assert windowed[:5].max() == 0
    assert windowed[9, 9, 9] == 255
    # 250.5 lies mid-way between the 0.5 % and 99.5 % points of 1..500 (and the outlier).
    middle = volume == 250
    assert abs(int(windowed[middle][0]) - 127) <= 1


def test_png_root_keeps_each_case_as_one_slice(png_root):
    sliced = nnunet.slice_root(png_root)
    pairs = find_pairs(sliced / "train")
    assert sorted(sample.id for sample in pairs) == ["chest1_z0", "chest2_z0"]
    assert read_dataset_info(sliced).channels == 1
    image = read_image(sliced / "train" / "images" / "chest2_z0.png", channels=1)
    assert image.shape == (20, 24, 1) and image[0, 0, 0] == 80
    assert not (sliced / "test").exists()


# --- refusals: one line naming the case, nothing written ---------------------------------------


def refused(root: Path, capsys) -> str:
    assert main(["prepare", str(root), "--size", "32"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert not (cache_root() / "nnunet").exists() or not list((cache_root() / "nnunet").iterdir())
    return message


def test_a_label_volume_on_another_grid_is_refused(nnunet_root, capsys):
    _, labels = case_volumes(0)
    save_nifti(nnunet_root / "labelsTr" / "brain2.nii.gz", labels[:, :, :5])
    message = refused(nnunet_root, capsys)
    assert "case brain2" in message and "shape" in message and "(16, 16, 5)" in message


def test_a_label_volume_with_another_affine_is_refused(nnunet_root, capsys):
    _, labels = case_volumes(1)
    save_nifti(nnunet_root / "labelsTr" / "brain2.nii.gz", labels, affine=np.eye(4))
    message = refused(nnunet_root, capsys)
    assert "case brain2" in message and "another affine" in message


def test_a_missing_modality_is_refused(nnunet_root, capsys):
    (nnunet_root / "imagesTr" / "brain2_0001.nii.gz").unlink()
    message = refused(nnunet_root, capsys)
    assert "case brain2 lacks" in message and "brain2_0001.nii.gz" in message and "T1c" in message


def test_an_undeclared_channel_file_is_refused(nnunet_root, capsys):
    channels, _ = case_volumes(0)
    save_nifti(nnunet_root / "imagesTr" / "brain1_0002.nii.gz", channels[0])
    message = refused(nnunet_root, capsys)
    assert "case brain1 has" in message and "brain1_0002.nii.gz" in message
    assert "declare 2 channels" in message


def test_a_file_with_another_ending_is_refused(nnunet_root, capsys):
    (nnunet_root / "imagesTr" / "brain1_0000.nii").write_bytes(b"x")
    message = refused(nnunet_root, capsys)
    assert "brain1_0000.nii does not end in .nii.gz" in message


def test_a_truncated_volume_is_refused(nnunet_root, capsys):
    path = nnunet_root / "imagesTr" / "brain2_0001.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    message = refused(nnunet_root, capsys)
    assert "case brain2" in message and "brain2_0001.nii.gz" in message
    assert "truncated" in message


def test_a_dataset_json_without_file_ending_is_refused(nnunet_root, capsys):
    spec = json.loads((nnunet_root / "dataset.json").read_text())
    del spec["file_ending"]
    (nnunet_root / "dataset.json").write_text(json.dumps(spec))
    assert "lacks 'file_ending'" in refused(nnunet_root, capsys)


def test_labels_outside_the_declared_classes_are_refused(nnunet_root, capsys):
    _, labels = case_volumes(0)
    labels[0, 0, 0] = 7
    save_nifti(nnunet_root / "labelsTr" / "brain1.nii.gz", labels)
    message = refused(nnunet_root, capsys)
    assert "case brain1" in message and "value 7" in message


def test_nibabel_missing_is_said_in_one_line(nnunet_root, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    with pytest.raises(
        MedsegError,
        match=r"reading NIfTI needs the Python package nibabel.*pip install 'medseg\[nifti\]'",
    ):
        nnunet.slice_root(nnunet_root)


# --- C channels through medseg ------------------------------------------------------------------


def test_npy_images_are_read_as_they_are(tmp_path):
    array = np.arange(4 * 5 * 2, dtype=np.uint8).reshape(4, 5, 2)
    np.save(tmp_path / "slice.npy", array)
    np.testing.assert_array_equal(read_image(tmp_path / "slice.npy", channels=2), array)
    assert image_size(tmp_path / "slice.npy") == (4, 5)
    np.save(tmp_path / "gray.npy", array[..., 0])
    assert read_image(tmp_path / "gray.npy", channels=3).shape == (4, 5, 3)


def test_npy_images_of_another_dtype_or_a_broken_file_are_refused(tmp_path):
    np.save(tmp_path / "float.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(MedsegError, match="float32.*must be uint8"):
        read_image(tmp_path / "float.npy")
    (tmp_path / "broken.npy").write_bytes(gzip.compress(b"not an array"))
    with pytest.raises(MedsegError, match="broken.npy is not a readable .npy array"):
        read_image(tmp_path / "broken.npy")


def test_to_channels_passes_two_channels_and_refuses_a_mismatch():
    image = np.zeros((3, 3, 2), np.uint8)
    assert to_channels(image, 2) is image
    with pytest.raises(MedsegError, match=r"uint8 \(3, 3, 2\)"):
        to_channels(image, 3)


def test_normalisation_and_stem_take_two_channels():
    mean, std = normalisation(2)
    assert len(mean) == len(std) == 2 and mean[0] == pytest.approx(0.449, abs=1e-3)
    from medseg.config import build_config
    from medseg.model import DeepLabV3Plus

    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.pretrained": False,
            "model.in_channels": 2,
            "data.channels": 2,
            "data.image_size": 64,
        }
    )
    model = DeepLabV3Plus.from_config(config.model).eval()
    assert model(torch.zeros(1, 2, 64, 64)).shape == (1, 1, 64, 64)
