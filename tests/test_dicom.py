"""DICOM input: pixels through the modality LUT and windowing, MONOCHROME1, predict by UID."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.cli import main
from medseg.core.errors import MedsegError
from medseg.data.io import read_image

pydicom = pytest.importorskip("pydicom")

JSRT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsrt" / "test" / "images"


def write_dicom(
    path: Path,
    values: np.ndarray,
    *,
    uid: str,
    photometric: str = "MONOCHROME2",
    slope: float = 0.0625,
    intercept: float = 0.0,
    pixels: bool = True,
    frames: int | None = None,
) -> Path:
    """A 12-bit (in 16) gray DICOM whose stored values are ``(values - intercept) / slope``, so
    that the modality LUT gives ``values`` back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.Modality = (
        meta.MediaStorageSOPClassUID,
        uid,
        "CR",
    )
    dataset.Rows, dataset.Columns = values.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = (
        16,
        12,
        11,
        0,
    )
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    if frames is not None:
        dataset.NumberOfFrames = frames
    if pixels:
        stored = np.round((values.astype(np.float64) - intercept) / slope).astype(np.uint16)
        dataset.PixelData = stored.tobytes()
    try:
        dataset.save_as(path, enforce_file_format=True)  # pydicom 3
    except TypeError:
        dataset.save_as(path, write_like_original=False)  # pydicom 2
    return path


def synthetic_gray(shape=(40, 56)) -> np.ndarray:
    """uint8 values 50..200 (a gradient and a bright disc): they fit 8 bits, so windowing keeps
    them as they are, and a skipped rescale (stored values up to 3200) would show."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = 50 + (xx * 100 // shape[1])
    image[(yy - shape[0] // 2) ** 2 + (xx - shape[1] // 2) ** 2 < 64] = 200
    return image.astype(np.uint8)


def test_dicom_monochrome2_with_rescale_reads_as_its_modality_values(tmp_path):
    values = synthetic_gray()
    path = write_dicom(tmp_path / "a.dcm", values, uid="1.2.3.4")
    gray = read_image(path, channels=1)
    assert gray.shape == (40, 56, 1)
    np.testing.assert_array_equal(gray[..., 0], values)
    np.testing.assert_array_equal(read_image(path), np.repeat(values[..., None], 3, axis=2))


def test_dicom_monochrome1_is_inverted(tmp_path):
    values = synthetic_gray()
    path = write_dicom(tmp_path / "b.dcm", values, uid="1.2.3.5", photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_image(path, channels=1)[..., 0], 255 - values)


def test_dicom_beyond_8_bits_is_windowed_per_image(tmp_path):
    # Hounsfield-like values -1000..1000 (intercept -1024): lowest to 0, highest to 255.
    values = np.round(np.linspace(-1000, 1000, 40 * 56)).reshape(40, 56)  # stored as integers
    path = write_dicom(tmp_path / "ct.dcm", values, uid="1.2.3.6", slope=1.0, intercept=-1024)
    expected = np.round((values + 1000) * 255 / 2000).astype(np.uint8)
    np.testing.assert_array_equal(read_image(path, channels=1)[..., 0], expected)


def test_jsrt_radiograph_round_trips_through_dicom(tmp_path):
    if not JSRT_IMAGES.is_dir():
        pytest.skip(f"JSRT data not found at {JSRT_IMAGES}")
    source = sorted(JSRT_IMAGES.glob("*.png"))[0]
    png = np.asarray(Image.open(source).convert("L"))
    path = write_dicom(tmp_path / f"{source.stem}.dcm", png, uid="1.2.826.0.1.3680043.1")
    np.testing.assert_array_equal(read_image(path, channels=1)[..., 0], png)
    inverted = write_dicom(tmp_path / "m1.dcm", png, uid="1.2.3.9", photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_image(inverted, channels=1)[..., 0], 255 - png)


def test_predict_names_masks_by_sop_instance_uid(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "dicom"
    folder.mkdir()
    write_dicom(folder / "IM0001.dcm", synthetic_gray(), uid="1.2.840.99.1")
    # PACS exports often write files without an extension: found by "DICM" at byte 128.
    write_dicom(folder / "IM0002", synthetic_gray((48, 32)), uid="1.2.840.99.2")
    (folder / "notes").write_text("not an image")  # no extension, no DICM marker: left out
    out = tmp_path / "masks"
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(folder)]
    assert main([*args, "--out", str(out), "--quiet", "--probabilities"]) == 0
    assert "2 masks written" in capsys.readouterr().out
    names = sorted(path.name for path in out.glob("*.png"))
    assert names == [
        "1.2.840.99.1_probability.png", "1.2.840.99.1_segmentation.png",
        "1.2.840.99.2_probability.png", "1.2.840.99.2_segmentation.png",
    ]  # fmt: skip
    assert np.asarray(Image.open(out / "1.2.840.99.1_segmentation.png")).shape == (40, 56)
    assert np.asarray(Image.open(out / "1.2.840.99.2_segmentation.png")).shape == (48, 32)


def test_dicom_without_pixel_data_is_one_line(tmp_path, tiny_checkpoint, capsys):
    path = write_dicom(tmp_path / "report.dcm", synthetic_gray(), uid="1.2.3.7", pixels=False)
    with pytest.raises(MedsegError, match="holds no pixel data") as error:
        read_image(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    # predict lists it as it lists any unreadable image, and writes the others.
    write_dicom(tmp_path / "good.dcm", synthetic_gray(), uid="1.2.3.8")
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[0]
        == f"medseg: could not segment: {path} holds no pixel data (a DICOM report, structure set or directory?); remove it from the input folder"
    )  # noqa: E501
    assert len(err) == 2 and "1 images failed" in err[1]
    assert (tmp_path / "out" / "1.2.3.8_segmentation.png").is_file()


def test_multi_frame_and_unreadable_dicom_are_refused(tmp_path):
    frames = write_dicom(tmp_path / "cine.dcm", synthetic_gray(), uid="1.2.3.10", frames=3)
    with pytest.raises(MedsegError, match="multi-frame DICOM \\(3 frames\\)"):
        read_image(frames)
    broken = tmp_path / "broken.dcm"
    broken.write_text("an export log saved as .dcm by mistake")
    with pytest.raises(MedsegError, match="broken.dcm is not a readable DICOM file") as error:
        read_image(broken)
    assert "\n" not in str(error.value)
    truncated = tmp_path / "truncated.dcm"
    write_dicom(truncated, synthetic_gray(), uid="1.2.3.12")
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    with pytest.raises(MedsegError, match="truncated.dcm") as error:
        read_image(truncated)
    assert "\n" not in str(error.value)


def test_missing_pydicom_is_one_line(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    write_dicom(tmp_path / "a.dcm", synthetic_gray(), uid="1.2.3.11")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(MedsegError, match="reading DICOM needs the Python package pydicom"):
        read_image(tmp_path / "a.dcm")
    args = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "medseg: error: reading DICOM needs the Python package pydicom, which is not installed "
        "here; install it with: pip install 'medseg[dicom]'"
    )
