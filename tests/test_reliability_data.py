"""Reading a user's data when it goes wrong: links, permissions, folders, a damaged cache.

Every stat, open and listing of a user's file ends in a one-line MedsegError that names the file
and the reason; the prepared cache survives damage and kills, and serves every share of a folder.
"""

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image
from test_bad_input import write_png_header  # tests/ is on the path: one copy of the helper

import medseg.data.cache as cache_module
from medseg.api import prepare_data
from medseg.cli import main
from medseg.core.errors import MedsegError
from medseg.data.cache import cache_root, prepare
from medseg.data.folder import find_pairs, list_images, train_val_samples
from medseg.data.io import MAX_PIXELS, read_image, read_mask
from medseg.data.plan import BINARY_IMAGE_SIZE

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


def cache_folders():
    return sorted(path.name for path in cache_root().iterdir()) if cache_root().is_dir() else []


def warnings_in(err):
    return [line for line in err.splitlines() if line.startswith("medseg: warning: ")]


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


def test_train_names_a_broken_link(capsys, synthetic_root, tmp_path):
    bad = synthetic_root / "train" / "images" / "SYN_0003.jpg"
    break_link(bad)
    refused(
        capsys,
        *("train", "--data", synthetic_root, "--out", tmp_path / "run", *SHORT),
        expect=[bad, "is a broken symbolic link", "--skip-bad"],
    )


def test_prepare_names_a_link_loop(capsys, synthetic_root):
    bad = synthetic_root / "train" / "masks" / "SYN_0004_segmentation.png"
    loop_link(bad)
    refused(capsys, "prepare", synthetic_root, "--size", "32", expect=[bad, "symbolic link loop"])


def test_prepare_skip_bad_lists_bad_links_and_corrupt_files(capsys, synthetic_root):
    broken = synthetic_root / "train" / "images" / "SYN_0003.jpg"
    looping = synthetic_root / "train" / "masks" / "SYN_0004_segmentation.png"
    corrupt = synthetic_root / "train" / "images" / "SYN_0007.jpg"
    break_link(broken)
    loop_link(looping)
    corrupt.write_bytes(b"not a jpeg")
    assert main(["prepare", str(synthetic_root), "--size", "32", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 3, out
    assert any(f"skipped: {broken} is a broken symbolic link" in line for line in skipped)
    assert any(f"skipped: {looping} is a symbolic link loop" in line for line in skipped)
    assert any(f"skipped: {corrupt} is not an image" in line for line in skipped)
    assert f"{synthetic_root / 'train'}: 9 pairs cached at 32×32, 3 skipped" in out


def test_train_skip_bad_goes_on_without_a_broken_link(capsys, synthetic_root, tmp_path):
    bad = synthetic_root / "train" / "images" / "SYN_0003.jpg"
    break_link(bad)
    out = tmp_path / "run"
    code = main(["train", "--data", str(synthetic_root), "--out", str(out), *SHORT, "--skip-bad"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"skipped: {bad} is a broken symbolic link" in captured.out
    assert "Traceback" not in captured.err


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


def test_prepare_skip_bad_goes_on_without_an_unreadable_file(capsys, synthetic_root, monkeypatch):
    path = synthetic_root / "train" / "masks" / "SYN_0002_segmentation.png"
    fail_opening(monkeypatch, path, errno.EACCES, "Permission denied")
    cache = prepare(find_pairs(synthetic_root / "train"), size=32, skip_bad=True, progress=False)
    assert len(cache.samples) == 11
    assert cache.bad == [f"cannot read the file {path}: permission denied; check its permissions"]


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


# --- a damaged cache ------------------------------------------------------------------------


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "manifest not JSON": lambda folder: (folder / "manifest.json").write_text("{not json"),
    "manifest without keys": lambda folder: (folder / "manifest.json").write_text("{}"),
    "manifest a list": lambda folder: (folder / "manifest.json").write_text("[1, 2]"),
    "truncated images": lambda folder: cut_in_half(folder / "images.npy"),
    "missing masks": lambda folder: (folder / "masks.npy").unlink(),
    "images of another shape": lambda folder: np.save(
        folder / "images.npy", np.zeros((12, 16, 16, 3), np.uint8)
    ),
    "masks not an array": lambda folder: (folder / "masks.npy").write_text("hello"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_cache_is_rebuilt_with_one_warning(capsys, synthetic_root, monkeypatch, damage):
    samples = find_pairs(synthetic_root / "train")
    first = prepare(samples, size=32, progress=False)
    expected_images, expected_masks = np.array(first.images), np.array(first.masks)
    del first  # release the memory map before damaging the file under it
    (folder,) = [cache_root() / name for name in cache_folders()]
    damage(folder)
    capsys.readouterr()

    rebuilt = prepare(samples, size=32, progress=False)
    np.testing.assert_array_equal(rebuilt.images, expected_images)
    np.testing.assert_array_equal(rebuilt.masks, expected_masks)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"the cache {folder} was damaged (" in warning
    assert warning.endswith("; rebuilding it")

    def fail(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(cache_module, "read_image", fail)
    again = prepare(samples, size=32, progress=False)
    np.testing.assert_array_equal(again.images, expected_images)
    assert warnings_in(capsys.readouterr().err) == []


# --- leftovers of a killed build -----------------------------------------------------------

# Named as files.atomic_path names its temporary files (see _PARTIAL there).
PARTIAL_NAME = ".images.npy.0a1b2c3d.tmp.npy"


@pytest.mark.parametrize("finished", [False, True], ids=["killed-build", "finished-build"])
def test_prepare_removes_what_a_killed_build_left(synthetic_root, finished):
    root = synthetic_root / "train"
    prepare_data(root, size=32)
    (folder,) = [cache_root() / name for name in cache_folders()]
    if not finished:  # killed before its manifest: the cache is incomplete
        (folder / "manifest.json").unlink()
    partial = folder / PARTIAL_NAME
    partial.write_bytes(b"\0" * 4096)
    ((_, count, _),) = prepare_data(root, size=32)
    assert count == 12
    assert not partial.exists()
    assert (folder / "manifest.json").is_file()


def test_a_run_starting_during_a_build_waits_for_it(capsys, synthetic_root, monkeypatch):
    """Two runs started together on the same data: the second must neither remove the files the
    first is writing (taking them for a killed build's) nor decode the data a second time."""
    samples = find_pairs(synthetic_root / "train")
    write_native = cache_module._write_native
    second = {}

    def prepare_again():
        second["cache"] = prepare(samples, size=0, progress=False)

    def first_build(*args, **kwargs):  # runs while the first build's files are open
        if not second:
            second["thread"] = threading.Thread(target=prepare_again)
            second["thread"].start()
            second["thread"].join(timeout=1.0)
            assert second["thread"].is_alive(), "the second run did not wait for the build"
        return write_native(*args, **kwargs)

    decoded = []
    read = cache_module.read_image
    monkeypatch.setattr(cache_module, "_write_native", first_build)
    monkeypatch.setattr(
        cache_module, "read_image", lambda path, **kw: decoded.append(path) or read(path, **kw)
    )
    first = prepare(samples, size=0, progress=False)
    second["thread"].join(timeout=30)
    assert len(decoded) == len(samples)  # one build, read by both runs
    for image in range(len(samples)):
        np.testing.assert_array_equal(second["cache"].get(image)[0], first.get(image)[0])
    assert "waiting for another medseg process to finish preparing" in capsys.readouterr().err


# --- masks without a foreground pixel ---------------------------------------------------------


def blank_masks(root):
    for mask in (root / "train" / "masks").iterdir():
        Image.new("L", (64, 64), 0).save(mask)


def test_masks_without_foreground_are_warned_about_when_built_and_opened(
    capsys, synthetic_root, monkeypatch
):
    blank_masks(synthetic_root)
    prepare_data(synthetic_root, size=32)
    masks = synthetic_root / "train" / "masks"
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"none of the 12 masks in {masks} has a foreground pixel" in warning

    def fail(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(cache_module, "read_target", fail)
    monkeypatch.setattr(cache_module, "_warned_folders", set())  # a new process, as it were
    prepare_data(synthetic_root, size=32)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"none of the 12 masks in {masks}" in warning


def test_training_on_masks_without_foreground_warns_once(capsys, synthetic_root, tmp_path):
    blank_masks(synthetic_root)
    out = tmp_path / "run"
    assert main(["train", "--data", str(synthetic_root), "--out", str(out), *SHORT]) == 0
    warnings = warnings_in(capsys.readouterr().err)
    masks = synthetic_root / "train" / "masks"
    assert warnings == [
        line for line in warnings if f"none of the 12 masks in {masks} has a foreground" in line
    ]
    assert len(warnings) == 1


def test_a_validation_share_without_foreground_is_warned_about(capsys, synthetic_root):
    train, val = train_val_samples(
        synthetic_root, mask_suffix="_segmentation", val_fraction=0.25, seed=0
    )
    for sample in val:
        Image.new("L", (64, 64), 0).save(sample.mask)
    prepare(train, size=32, progress=False)
    assert warnings_in(capsys.readouterr().err) == []
    prepare(val, size=32, progress=False)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"none of the {len(val)} masks used here (of 12)" in warning


# --- PIL's global limit ------------------------------------------------------------------------


def test_importing_medseg_leaves_pils_limit_alone():
    check = (
        "import PIL.Image as I; d = I.MAX_IMAGE_PIXELS; import medseg; "
        "assert I.MAX_IMAGE_PIXELS == d, (I.MAX_IMAGE_PIXELS, d)"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("pil_limit", [None, 10**9])  # PIL checking nothing, or laxer
def test_medsegs_own_pixel_limit_holds_whatever_pils_is(tmp_path, monkeypatch, pil_limit):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", pil_limit)
    path = tmp_path / "big.png"
    write_png_header(path, 11_000, MAX_PIXELS // 11_000 + 1)  # just over medseg's limit
    with pytest.raises(MedsegError, match="too large to decode safely"):
        read_image(path)
    assert pil_limit == PIL.Image.MAX_IMAGE_PIXELS


# --- one cache per split folder ----------------------------------------------------------------


def test_training_reuses_the_cache_medseg_prepare_filled(capsys, synthetic_root, tmp_path):
    (synthetic_root / "test").rename(tmp_path / "elsewhere")  # only train/: no val/, no test/
    prepare_data(synthetic_root, size=64)
    before = cache_folders()
    assert len(before) == 1
    out = tmp_path / "run"
    assert main(["train", "--data", str(synthetic_root), "--out", str(out), *SHORT]) == 0
    assert cache_folders() == before


def test_a_share_of_a_folder_reads_its_rows_from_the_folders_cache(synthetic_root, monkeypatch):
    train, val = train_val_samples(
        synthetic_root, mask_suffix="_segmentation", val_fraction=0.25, seed=0
    )
    whole = prepare(find_pairs(synthetic_root / "train"), size=32, progress=False)
    monkeypatch.setattr(cache_module, "read_image", None)  # nothing is decoded again
    share = prepare(val, size=32, progress=False)
    assert [s.id for s in share.samples] == [s.id for s in val]
    assert share.images.shape == (len(val), 32, 32, 3)
    assert share.masks.shape == (len(val), 32, 32)
    rows = [[s.id for s in whole.samples].index(s.id) for s in val]
    for index, row in enumerate(rows):
        image, mask = share.get(index)
        np.testing.assert_array_equal(image, whole.images[row])
        np.testing.assert_array_equal(mask, whole.masks[row].astype(bool))
    assert isinstance(share.images[0], np.memmap)  # read from the disk, not copied
    np.testing.assert_array_equal(np.array(share.images), np.array(whole.images)[rows])
    assert len(prepare(train, size=32, progress=False).samples) == len(train)
    assert len(cache_folders()) == 1


def test_prepare_data_defaults_to_the_recipes_size(synthetic_root, monkeypatch):
    prepare_data(synthetic_root / "train")
    size = BINARY_IMAGE_SIZE  # what training plans for binary masks
    monkeypatch.setattr(cache_module, "read_image", None)  # built at that size: nothing to decode
    cache = prepare(find_pairs(synthetic_root / "train"), size=size, progress=False)
    assert cache.images.shape == (12, size, size, 3)
