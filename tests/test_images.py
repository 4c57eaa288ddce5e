"""Images from the real world: EXIF orientation, predict writing into its own input folder,
odd shapes on both backends, and the memory of a large image at its own resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.cli import main
from medseg.core.errors import MedsegError
from medseg.data.folder import Sample, check_pair
from medseg.data.io import image_size, read_image, read_mask
from medseg.prediction.outputs import (
    OUTPUT_SUFFIXES,
    RECORD_NAME,
    collect_inputs,
    output_names,
)

# -- EXIF orientation --------------------------------------------------------------------------

ROTATED = 6  # EXIF orientation 6: stored sideways, shown turned 90° clockwise


def sideways_jpeg(path, array: np.ndarray, orientation: int = ROTATED):
    """Save ``array`` (stored H × W) as a JPEG that a viewer shows turned by ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=100, subsampling=0)
    return path


def corner_block(height: int, width: int, channels: int = 0) -> np.ndarray:
    """A black picture with a white 8 × 12 block in its top-left corner, as stored."""
    array = np.zeros((height, width, channels) if channels else (height, width), np.uint8)
    array[:8, :12] = 255
    return array


def test_an_exif_turned_jpeg_is_read_as_it_is_shown_image_and_mask(tmp_path):
    stored = corner_block(40, 64, channels=3)  # landscape as stored
    image = read_image(sideways_jpeg(tmp_path / "photo.jpg", stored))
    mask = read_mask(sideways_jpeg(tmp_path / "mask.jpg", corner_block(40, 64)))
    # Shown turned clockwise: portrait, and the top-left block now at the top right.
    assert image.shape == (64, 40, 3) and mask.shape == (64, 40)
    assert image_size(tmp_path / "photo.jpg") == (64, 40)
    np.testing.assert_array_equal(mask, np.rot90(corner_block(40, 64) > 127, k=-1))
    assert image[:12, -8:].min() > 200 and image[12:, :].max() < 60
    # Orientation 1 (as stored) and no EXIF at all read as stored.
    assert read_image(sideways_jpeg(tmp_path / "upright.jpg", stored, 1)).shape == (40, 64, 3)


def test_a_mask_drawn_on_the_shown_photo_pairs_with_it(tmp_path):
    photo = sideways_jpeg(tmp_path / "photo.jpg", corner_block(40, 64, channels=3))
    shown = tmp_path / "shown_segmentation.png"
    Image.fromarray(np.rot90(corner_block(40, 64), k=-1).copy()).save(shown)
    check_pair(Sample(image=photo, mask=shown, id="photo"))  # 40 × 64 both, as shown
    stored = tmp_path / "stored_segmentation.png"
    Image.fromarray(corner_block(40, 64)).save(stored)
    with pytest.raises(MedsegError, match="is 64×40 but image photo.jpg is 40×64"):
        check_pair(Sample(image=photo, mask=stored, id="photo"))


def test_predict_writes_masks_and_overlays_of_the_shown_size(tiny_checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    sideways_jpeg(images / "photo.jpg", corner_block(40, 64, channels=3))
    out = tmp_path / "out"
    flags = ["--tta", "none", "--overlay", "--quiet"]
    command = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(images)]
    assert main([*command, "--out", str(out), *flags]) == 0
    for name in ("photo_segmentation.png", "photo_overlay.png"):
        with Image.open(out / name) as written:
            assert written.size == (40, 64), name  # PIL: (width, height) as shown


# -- predict with --out equal to --input -------------------------------------------------------


def test_predict_into_its_own_input_folder_never_segments_its_outputs(tiny_checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    command = [
        *("predict", "--checkpoint", str(tiny_checkpoint), "--input", str(folder)),
        *("--out", str(folder), "--tta", "none", "--overlay", "--probabilities", "--quiet"),
    ]
    assert main(command) == 0
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert main(command) == 0
    after = sorted(path.name for path in folder.iterdir())
    assert after == sorted(
        [RECORD_NAME, "a.png", "b.png"]
        + [
            f"{name}_{kind}.png"
            for name in "ab"
            for kind in ("overlay", "probability", "segmentation")
        ]
    )
    assert not any("_segmentation_" in name for name in after)
    # The second run found every mask done: nothing was written again.
    assert {name: written[name] for name in after if name != RECORD_NAME} == {
        path.name: path.stat().st_mtime_ns for path in folder.iterdir() if path.name != RECORD_NAME
    }
    assert [path.name for path in collect_inputs(folder)] == ["a.png", "b.png"]


def test_files_named_like_outputs_are_inputs_where_predict_never_wrote(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    for name in ("case_segmentation.png", "case_overlay.png", "case.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)
    everything = ["case.png", "case_overlay.png", "case_segmentation.png"]
    assert [path.name for path in collect_inputs(folder)] == everything
    assert collect_inputs(folder / "case_segmentation.png") == [folder / "case_segmentation.png"]
    (folder / RECORD_NAME).write_text("{}")  # predict wrote here: its outputs are not inputs
    assert [path.name for path in collect_inputs(folder)] == ["case.png"]
    (folder / "case.png").unlink()
    with pytest.raises(MedsegError, match="holds only medseg predict's own outputs"):
        collect_inputs(folder)


@pytest.mark.parametrize("multi_class", [False, True])
def test_every_name_predict_writes_ends_as_collect_inputs_expects(multi_class):
    names = output_names(Path("x.png"), probabilities=True, overlays=True, multi_class=multi_class)
    assert all(name.endswith(OUTPUT_SUFFIXES) for name in names), names
