"""Files no one here made: every DICOM file pydicom ships and every NIfTI file nibabel ships go
through ``medseg predict`` with an RGB and a grayscale model; each is segmented or listed with
its reason in one line, the run ends with status 0 or 1 (never 70, never a traceback), and no
raw Python warning reaches the terminal. Then the cases they stand for, made on purpose: DICOM
files sharing a SOP Instance UID, hostile UIDs, compressed syntaxes without their decoder,
pydicom's warnings, NaN and infinite voxels.

The sweep over all of pydicom's files (about 200, two models) takes about half a minute and is
marked slow; the default run sweeps a representative subset (`DICOM_SUBSET`) and every NIfTI
file (eight small ones).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_dicom import synthetic_gray, write_dicom

from medseg.cli import main
from medseg.core.errors import MedsegError
from medseg.data.dicom import is_dicom
from medseg.data.io import read_image
from medseg.data.reading import finite
from medseg.prediction.outputs import ID_BYTES, RECORD_NAME, output_ids

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

PYDICOM_DATA = Path(pydicom.data.__file__).parent
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
# One of each kind: CT with a rescale, big endian, RLE, JPEG-LS, JPEG 2000, 12-bit JPEG,
# a 3×3 RGB, YBR 4:2:2, PALETTE COLOR, MONOCHROME1 without an extension, two files sharing a
# UID; and what cannot be read: a malformed VR, a truncated file, multi-frame, no pixel data,
# no preamble, a JPEG stream no decoder takes.
DICOM_SUBSET = (
    "test_files/CT_small.dcm",
    "test_files/MR_small_bigendian.dcm",
    "test_files/MR_small_RLE.dcm",
    "test_files/MR_small_jpeg_ls_lossless.dcm",
    "test_files/MR_small_jp2klossless.dcm",
    "test_files/JPGExtended.dcm",
    "test_files/SC_rgb_small_odd.dcm",
    "test_files/SC_ybr_full_422_uncompressed.dcm",
    "test_files/examples_palette.dcm",
    "test_files/dicomdirtests/77654033/CR1/6154",
    "charset_files/chrFren.dcm",
    "charset_files/chrFrenMulti.dcm",
    "test_files/badVR.dcm",
    "test_files/MR_truncated.dcm",
    "test_files/SC_rgb_rle_2frame.dcm",
    "test_files/rtplan.dcm",
    "test_files/no_meta.dcm",
    "test_files/JPEG-lossy.dcm",
)
DECODERS = ("pylibjpeg", "libjpeg", "openjpeg")


def have_decoders() -> bool:
    """Whether the dicom extra's decoders (pylibjpeg with libjpeg and openjpeg) are here."""
    import importlib.util

    return all(importlib.util.find_spec(name) for name in DECODERS)


@pytest.fixture(scope="module")
def gray_checkpoint(tmp_path_factory):
    """An untrained one-channel resnet18 for 64×64 inputs (a grayscale model)."""
    from medseg.config import build_config
    from medseg.engine.checkpoint import save_checkpoint
    from medseg.model import DeepLabV3Plus

    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.pretrained": False,
            "model.in_channels": 1,
            "data.channels": 1,
            "data.image_size": 64,
        }
    )
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    path = tmp_path_factory.mktemp("gray-checkpoint") / "best.pt"
    save_checkpoint(
        path, {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    )
    return path


@pytest.fixture(params=["rgb", "gray"])
def checkpoint(request, tiny_checkpoint, gray_checkpoint):
    return tiny_checkpoint if request.param == "rgb" else gray_checkpoint


def pydicom_files() -> list[Path]:
    """Every file pydicom ships as test data, with its palettes and character-set files."""
    files = [Path(name) for name in pydicom.data.get_testdata_files()]
    files += sorted((PYDICOM_DATA / "charset_files").glob("*.dcm"))
    files += sorted((PYDICOM_DATA / "palettes").glob("*.dcm"))
    return sorted({path for path in files if path.is_file()})


def flatten(files: list[Path], folder: Path) -> dict[Path, Path]:
    """Copies of ``files`` side by side in ``folder``, named by their path in pydicom's data
    (``test_files__dicomdirtests__...``): copy -> original."""
    folder.mkdir()
    copies = {}
    for path in files:
        copy = folder / "__".join(path.relative_to(PYDICOM_DATA).parts)
        shutil.copyfile(path, copy)
        copies[copy] = path
    return copies


def run_predict(checkpoint: Path, source: Path, out: Path, capsys) -> tuple[int, list[str]]:
    """``medseg predict`` in this process: its status and its stderr lines; no Python warning
    of pydicom, nibabel or numpy may escape it."""
    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(source)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main([*argv, "--out", str(out), "--quiet"])
    escaped = [
        f"{item.category.__name__}: {item.message}"
        for item in caught
        if issubclass(item.category, RuntimeWarning)
        or any(name in Path(item.filename).parts for name in ("pydicom", "nibabel", "numpy"))
    ]
    assert not escaped, escaped
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("medseg: ") for line in err), err  # one line each, no traceback
    assert not any("internal error" in line for line in err), err
    return status, err


def check_each_file_answered(inputs: list[Path], out: Path, status: int, err: list[str]):
    """Every input is either the source of a mask of its own size, or in one "could not
    segment" line; returns (segmented, failed) as sets of inputs."""
    failures = [line for line in err if line.startswith("medseg: could not segment: ")]
    sources = json.loads((out / RECORD_NAME).read_text())["sources"]
    segmented = {Path(source) for name, source in sources.items() if (out / name).is_file()}
    failed = {
        path
        for path in inputs
        if any(f"{path} " in line or f"{path}:" in line for line in failures)
    }
    assert segmented | failed == set(inputs) and not segmented & failed
    assert len(failures) == len(failed)  # one line per file
    assert status == (1 if failed else 0)
    for name, source in sources.items():
        if (out / name).is_file():
            with Image.open(out / name) as mask:
                assert mask.size[::-1] == read_image(source).shape[:2], name
    return segmented, failed


def sweep_dicom(files: list[Path], checkpoint, tmp_path, capsys):
    copies = flatten(files, tmp_path / "dicom")
    inputs = [copy for copy in copies if is_dicom(copy)]
    for left_out in set(copies) - set(inputs):  # README.txt, .json, .icc, a .gz: not DICOM
        with pytest.raises(Exception), warnings.catch_warnings():  # noqa: B017 - pydicom's
            warnings.simplefilter("ignore")
            pydicom.dcmread(left_out)
    status, err = run_predict(checkpoint, tmp_path / "dicom", tmp_path / "out", capsys)
    return check_each_file_answered(inputs, tmp_path / "out", status, err), err


def expected_failures(names) -> set[str]:
    """The files of ``names`` (pydicom's test data) that cannot be read, by their reason."""
    unreadable = {
        "badVR.dcm": "Number of Frames '1A' is not a whole number",
        "MR_truncated.dcm": "less than expected",
        "SC_rgb_rle_2frame.dcm": "multi-frame DICOM (2 frames)",
        "rtplan.dcm": "holds no pixel data",
        "no_meta.dcm": "not a readable DICOM file",
        "JPEG-lossy.dcm": "cannot decode its JPEG Extended",
    }
    return {name for name in names if Path(name).name in unreadable}


def test_a_representative_set_of_pydicom_files_is_segmented_or_listed(checkpoint, tmp_path, capsys):
    if not have_decoders():
        pytest.skip("the dicom extra's decoders (pylibjpeg) are not installed")
    files = [PYDICOM_DATA / name for name in DICOM_SUBSET]
    (segmented, failed), err = sweep_dicom(files, checkpoint, tmp_path, capsys)
    failed_names = {"/".join(path.name.split("__")[1:]) or path.name for path in failed}
    names = {name.split("/", 1)[1] for name in DICOM_SUBSET}
    assert failed_names == expected_failures(names)
    assert len(segmented) == len(DICOM_SUBSET) - 6  # CT, MR, JPEG-LS, J2K, RLE, RGB, palette...
    assert f"{len(failed)} images failed" in err[-1]


@pytest.mark.slow
def test_every_dicom_file_pydicom_ships_is_segmented_or_listed(checkpoint, tmp_path, capsys):
    files = pydicom_files()
    (segmented, failed), err = sweep_dicom(files, checkpoint, tmp_path, capsys)
    assert len(segmented) > len(failed) / 2
    # Each reason is specific: no file falls through to the catch-all of an unforeseen error.
    assert not any("cannot read its pixels" in line for line in err)
    if have_decoders():
        assert not any("which needs" in line for line in err)


def test_every_nifti_file_nibabel_ships_is_segmented_or_listed(checkpoint, tmp_path, capsys):
    folder = tmp_path / "nifti"
    folder.mkdir()
    files = sorted([*NIBABEL_DATA.glob("*.nii"), *NIBABEL_DATA.glob("*.nii.gz")])
    assert len(files) >= 5
    for path in files:
        shutil.copyfile(path, folder / path.name)
    out = tmp_path / "out"
    status, err = run_predict(checkpoint, folder, out, capsys)
    sources = json.loads((out / RECORD_NAME).read_text())["sources"]
    for path in files:
        image = nib.load(path)
        case = path.name.removesuffix(".gz").removesuffix(".nii")
        line = [line for line in err if f"case {case}: " in line and "could not segment" in line]
        shape = image.shape
        if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
            written = nib.load(out / f"{case}.nii.gz")
            assert written.shape == shape[:3] and not line
            np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
            assert sources[f"{case}.nii.gz"] == [str(folder / path.name)]
        else:  # 4D files and a 2D CIFTI matrix: one line each, the others still written
            assert len(line) == 1 and f"holds a {len(shape)}D array {shape}" in line[0]
            assert not (out / f"{case}.nii.gz").exists()
    failures = [line for line in err if "could not segment" in line]
    assert status == 1 and f"{len(failures)} volumes failed" in err[-1]
    # resampled_anat_moved.nii holds NaN voxels: said in one note, with their count.
    nan_file = NIBABEL_DATA / "resampled_anat_moved.nii"
    count = int((~np.isfinite(nib.load(nan_file).get_fdata())).sum())
    assert count > 0
    notes = [line for line in err if line.startswith("medseg: note: ")]
    assert len(notes) == 1 and f"holds {count:,} NaN or infinite values" in notes[0]


# --- DICOM files sharing a SOP Instance UID; hostile UIDs ---------------------------------------


def test_dicom_files_sharing_a_uid_are_segmented_under_names_that_trace_them(
    tmp_path, tiny_checkpoint, capsys
):
    folder = tmp_path / "export"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom(folder / "IM0001.dcm", synthetic_gray((40, 56)), uid="1.2.3")
        write_dicom(folder / "IM0002", synthetic_gray((48, 32)), uid="1.2.3")  # no extension
        write_dicom(folder / "IM0003.dcm", synthetic_gray((24, 24)), uid="1.2.4")
    out = tmp_path / "out"
    status, err = run_predict(tiny_checkpoint, folder, out, capsys)
    assert status == 0 and err == []
    sources = json.loads((out / RECORD_NAME).read_text())["sources"]
    assert sources == {
        "1.2.3_IM0001.dcm_segmentation.png": str(folder / "IM0001.dcm"),
        "1.2.3_IM0002_segmentation.png": str(folder / "IM0002"),
        "1.2.4_segmentation.png": str(folder / "IM0003.dcm"),
    }
    for name, size in zip(sorted(sources), [(40, 56), (48, 32), (24, 24)], strict=True):
        assert np.asarray(Image.open(out / name)).shape == size
    # The same command again keeps all three.
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(folder)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    assert "0 masks written" in capsys.readouterr().out
    assert json.loads((out / RECORD_NAME).read_text())["sources"] == sources


HOSTILE_UIDS = {
    "IM1.dcm": "../../x",
    "IM2.dcm": "a/b",
    "IM3.dcm": "1" * 400,
    "IM4": "..",
    "IM5.dcm": ".1.2",
    "IM6.dcm": "1.2.\n3",
    f"{'L' * 240}.dcm": "not a uid",
    "IM7.dcm": "1." + "2" * 62,  # 64 characters: a valid UID, kept
}


def test_hostile_uids_give_readable_names_inside_out(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, uid in HOSTILE_UIDS.items():
            write_dicom(folder / name, synthetic_gray(), uid=uid)
    out = tmp_path / "nested" / "out"
    status, err = run_predict(tiny_checkpoint, folder, out, capsys)
    assert status == 0 and err == []
    written = sorted(path.name for path in out.iterdir())
    long_name = next(name for name in written if name.startswith("LLL"))
    assert len(long_name.encode()) == ID_BYTES + len("_segmentation.png")
    assert written == sorted(
        [
            RECORD_NAME, "IM1_segmentation.png", "IM2_segmentation.png", "IM3_segmentation.png",
            "IM4_segmentation.png", "IM5_segmentation.png", "IM6_segmentation.png",
            f"1.{'2' * 62}_segmentation.png", long_name,
        ]
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "nested"]  # nothing outside
    assert list((tmp_path / "nested").iterdir()) == [out]
    sources = json.loads((out / RECORD_NAME).read_text())["sources"]
    assert sources[long_name] == str(folder / f"{'L' * 240}.dcm")


def test_a_dicom_file_named_only_dots_is_not_hidden(tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / "..dcm"  # its stem is "."; its UID is no UID either
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom(path, synthetic_gray(), uid="..")
    status, err = run_predict(tiny_checkpoint, path, tmp_path / "out", capsys)
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        RECORD_NAME,
        "unnamed_segmentation.png",
    ]


def test_output_ids_keep_every_input_apart():
    paths = [Path(name) for name in ("A.tif", "a.jpg", "a.png", "a_a.png.png", "b")]
    assert output_ids(paths) == {
        Path("A.tif"): "A_A.tif",  # apart from "a" on a case-insensitive disk too
        Path("a.jpg"): "a_a.jpg",
        Path("a.png"): "a_a.png",
        Path("a_a.png.png"): "a_a.png_2",  # its own stem is taken by a.png's new id
        Path("b"): "b",
    }


# --- channels, compressed syntaxes, warnings ----------------------------------------------------


def test_an_rgb_dicom_feeds_a_gray_model_and_a_gray_dicom_an_rgb_model():
    rgb = read_image(PYDICOM_DATA / "test_files" / "SC_rgb_small_odd.dcm", channels=3)
    gray = read_image(PYDICOM_DATA / "test_files" / "SC_rgb_small_odd.dcm", channels=1)
    luma = np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    np.testing.assert_array_equal(gray[..., 0], luma.astype(np.uint8))
    ct = read_image(PYDICOM_DATA / "test_files" / "CT_small.dcm", channels=3)
    assert ct.shape == (128, 128, 3) and (ct[..., 0] == ct[..., 2]).all()


def test_a_palette_dicom_is_read_through_its_palette():
    from pydicom.pixels import apply_color_lut

    path = PYDICOM_DATA / "test_files" / "examples_palette.dcm"
    dataset = pydicom.dcmread(path)
    colour = apply_color_lut(dataset.pixel_array, dataset).astype(np.float64)  # 16-bit entries
    expected = np.round((colour - colour.min()) * 255 / (colour.max() - colour.min()))
    image = read_image(path)
    np.testing.assert_array_equal(image, expected.astype(np.uint8))
    assert (image[..., 0] != image[..., 2]).any()  # colour, not the indices as gray


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_compressed_dicom_reads_as_its_uncompressed_original(name):
    if not have_decoders():
        pytest.skip("the dicom extra's decoders (pylibjpeg) are not installed")
    original = read_image(PYDICOM_DATA / "test_files" / "MR_small.dcm", channels=1)
    np.testing.assert_array_equal(
        read_image(PYDICOM_DATA / "test_files" / name, channels=1), original
    )


@pytest.mark.parametrize(
    ("name", "syntax", "package"),
    [
        (
            "MR_small_jpeg_ls_lossless.dcm",
            "JPEG-LS Lossless Image Compression",
            "pylibjpeg-libjpeg",
        ),
        ("JPGExtended.dcm", "JPEG Extended (Process 2 and 4)", "pylibjpeg-libjpeg"),
    ],
)
def test_a_compressed_dicom_without_its_decoder_names_the_syntax_and_package(name, syntax, package):
    # A fresh interpreter where the pylibjpeg packages cannot be imported.
    blocked = "; ".join(f"sys.modules[{module!r}] = None" for module in DECODERS)
    code = (
        f"import sys; {blocked}\n"
        "from medseg.data.io import read_image\n"
        "from medseg.core.errors import MedsegError\n"
        f"try:\n    read_image({str(PYDICOM_DATA / 'test_files' / name)!r})\n"
        "except MedsegError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, timeout=60
    )
    message = result.stdout.strip()
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "\n" not in message and name in message
    assert f"compressed as {syntax}" in message and package in message
    assert "pip install 'medseg[dicom]'" in message


def test_header_warnings_are_silenced_and_decoder_warnings_become_one_note(tmp_path, capsys):
    # pydicom's SC_rgb_jpeg.dcm warns "Expected explicit VR, but found implicit VR": silenced.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(PYDICOM_DATA / "test_files" / "SC_rgb_jpeg.dcm")
    assert image.shape == (256, 256, 3) and caught == []
    assert capsys.readouterr().err == ""
    # A VOI LUT applied to rescaled (float) values: pydicom warns that it may be wrong. A note.
    path = write_dicom(tmp_path / "voi.dcm", synthetic_gray(), uid="1.2.3.12")
    dataset = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUT Descriptor: 256 entries from 0, 8 bits
    item.add_new(0x00283006, "US", list(range(256)))  # LUT Data: the identity
    dataset.VOILUTSequence = pydicom.Sequence([item])
    dataset.save_as(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image(path)
    assert caught == []
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"medseg: note: {path}: pydicom says: Applying a VOI LUT on a float input array may "
        f"give incorrect results"
    ]


def test_a_malformed_header_value_is_one_line_not_a_bug():
    with pytest.raises(MedsegError) as error:
        read_image(PYDICOM_DATA / "test_files" / "badVR.dcm")
    assert str(error.value).endswith(
        "badVR.dcm: its Number of Frames '1A' is not a whole number (a malformed header); fix "
        "it or remove the file"
    )


# --- NaN and infinite voxels ----------------------------------------------------------------------


def test_nan_and_infinite_voxels_are_made_finite_with_one_note(tmp_path, tiny_checkpoint, capsys):
    rng = np.random.default_rng(0)
    volume = rng.normal(500, 100, (16, 16, 4)).astype(np.float32)
    volume[0, 0, :] = np.nan
    volume[1, 1, 0] = -np.inf
    volume[2, 2, 0] = np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "head.nii.gz")
    out = tmp_path / "out"
    status, err = run_predict(tiny_checkpoint, tmp_path / "head.nii.gz", out, capsys)
    assert status == 0 and len(err) == 1
    finite_values = volume[np.isfinite(volume)]
    assert err[0] == (
        f"medseg: note: case head: {tmp_path / 'head.nii.gz'} holds 6 NaN or infinite values of "
        f"1,024; NaN and -Inf are read as its lowest finite value "
        f"({finite_values.min():g}), +Inf as its highest ({finite_values.max():g})"
    )
    assert nib.load(out / "head.nii.gz").shape == (16, 16, 4)


def test_finite_sets_nan_to_the_lowest_and_inf_to_the_highest(capsys):
    values = np.array([[3.0, np.nan], [-np.inf, np.inf], [7.0, 5.0]])
    fixed = finite(values, "here")
    np.testing.assert_array_equal(fixed, [[3.0, 3.0], [3.0, 7.0], [7.0, 5.0]])
    assert capsys.readouterr().err.startswith("medseg: note: here holds 3 NaN or infinite")
    whole = np.arange(4.0)
    assert finite(whole, "there") is whole  # finite input: as it is, no note
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(finite(np.full(3, np.nan), "all"), np.zeros(3))
