"""Reading a user's data when it goes wrong: links, permissions, folders where files should be.

Every stat, open and listing of a user's file ends in a one-line MedsegError that names the file
and the reason.
"""

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import PIL.Image
import pytest
from PIL import Image

from medseg.cli import main
from medseg.data.folder import list_images
from medseg.data.io import MAX_PIXELS, read_image, read_mask
from medseg.errors import MedsegError

TINY = ["--backbone", "resnet18", "--image-size", "64", "--no-pretrained", "--quiet"]
SHORT = [*TINY, "--epochs", "1", "--batch-size", "4"]


def refused(capsys, *argv, expect=()):
    """Run a command that must refuse; check it says so in one line, exit 2; return the line."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # `medseg prepare` draws a progress bar on stderr; the rest is one line
    lines = [line for line in err.strip().splitlines() if "preparing" not in line and line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("medseg: error: ")
    for fragment in expect:
        assert str(fragment) in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# --- broken links and link loops -----------------------------------------------------------


def break_link(path):
    """Replace `path` by a symbolic link to a file that does not exist."""
    path.unlink()
    path.symlink_to(path.parent / "moved-away.jpg")


def loop_link(path):
    """Replace `path` by a symbolic link to itself."""
    path.unlink()
    path.symlink_to(path.name)


@pytest.mark.parametrize(
    ("make", "reason"),
    [(break_link, "is a broken symbolic link"), (loop_link, "symbolic link loop")],
)
def test_read_image_names_a_bad_link(tmp_path, make, reason):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    make(path)
    with pytest.raises(MedsegError, match=f"{path}.*{reason}"):
        read_image(path)


# --- permissions and disk errors -----------------------------------------------------------


def deny_listing(monkeypatch, folder):
    """Make listing `folder` fail as it does without read permission (tests run as root)."""
    for name in ("scandir", "listdir"):
        original = getattr(os, name)

        def refuse(path=".", _original=original):
            if Path(os.fsdecode(path)) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            return _original(path)

        monkeypatch.setattr(os, name, refuse)


def fail_opening(monkeypatch, target, error_number, text):
    """Make PIL's open of `target` fail with the OSError `error_number`."""
    original = PIL.Image.open

    def refuse(path, *args, **kwargs):
        if Path(path) == target:
            raise OSError(error_number, text, str(target))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", refuse)


def test_train_names_an_unreadable_folder(capsys, synthetic_root, tmp_path, monkeypatch):
    folder = synthetic_root / "train" / "images"
    deny_listing(monkeypatch, folder)
    refused(
        capsys,
        *("train", "--data", synthetic_root, "--out", tmp_path / "run", *SHORT),
        expect=[folder, "permission denied", "check its permissions"],
    )


def test_predict_names_an_unreadable_folder(
    capsys, tiny_checkpoint, synthetic_root, tmp_path, monkeypatch
):
    folder = synthetic_root / "test" / "images"
    deny_listing(monkeypatch, folder)
    refused(
        capsys,
        *("predict", "--checkpoint", tiny_checkpoint, "--input", folder),
        *("--output", tmp_path / "masks", "--quiet"),
        expect=[folder, "permission denied"],
    )


@pytest.mark.parametrize(
    ("error_number", "text", "expect"),
    [
        (errno.EACCES, "Permission denied", "permission denied; check its permissions"),
        (errno.EIO, "Input/output error", "Input/output error"),
    ],
)
def test_a_file_that_cannot_be_read_is_not_called_corrupt(
    synthetic_root, monkeypatch, error_number, text, expect
):
    path = synthetic_root / "train" / "images" / "SYN_0002.jpg"
    fail_opening(monkeypatch, path, error_number, text)
    with pytest.raises(MedsegError) as raised:
        read_image(path)
    assert str(path) in str(raised.value)
    assert expect in str(raised.value)
    assert "corrupt" not in str(raised.value)


# --- a folder where a file should be -------------------------------------------------------


def test_a_subfolder_named_like_an_image_is_not_listed(capsys, synthetic_root):
    images = synthetic_root / "train" / "images"
    (images / "scans.jpg").mkdir()
    (synthetic_root / "train" / "masks" / "SYN_0099_segmentation.png").mkdir()
    assert "scans.jpg" not in [path.name for path in list_images(images)]
    assert main(["prepare", str(synthetic_root / "train"), "--size", "32"]) == 0
    assert "12 pairs cached" in capsys.readouterr().out


def test_reading_a_folder_says_it_is_a_folder(tmp_path):
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    with pytest.raises(MedsegError, match=f"{folder} is a folder, not an image file"):
        read_image(folder)
    with pytest.raises(MedsegError, match="is a folder, not an image file"):
        read_mask(folder)


# --- PIL's global limit ------------------------------------------------------------------------


def test_importing_medseg_leaves_pils_limit_alone():
    check = (
        "import PIL.Image as I; d = I.MAX_IMAGE_PIXELS; import medseg; "
        "assert I.MAX_IMAGE_PIXELS == d, (I.MAX_IMAGE_PIXELS, d)"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def write_png_header(path, width, height):
    """A valid PNG of a few bytes whose header claims `width` × `height` grey pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("pil_limit", [None, 10**9])  # PIL checking nothing, or laxer
def test_medsegs_own_pixel_limit_holds_whatever_pils_is(tmp_path, monkeypatch, pil_limit):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", pil_limit)
    path = tmp_path / "big.png"
    write_png_header(path, 11_000, MAX_PIXELS // 11_000 + 1)  # just over medseg's limit
    with pytest.raises(MedsegError, match="too large to decode safely"):
        read_image(path)
    assert pil_limit == PIL.Image.MAX_IMAGE_PIXELS
