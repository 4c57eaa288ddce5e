"""Sliding-window inference: tiles cover the image, Gaussian blending reassembles what the
network computes, and memory follows the tile batch rather than the image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.engine.sliding_window import (
    SlidingWindow,
    gaussian_weights,
    inference_tile,
    sliding_window,
    tile_for_image,
    tile_starts,
)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(565, 256, 0.5), (584, 256, 0.5), (256, 256, 0.5), (1000, 128, 0.25), (300, 256, 0.0)],
)
def test_tiles_cover_every_pixel_with_at_least_the_asked_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    steps = [after - before for before, after in zip(starts, starts[1:], strict=False)]
    assert all(0 < step <= round(tile * (1 - overlap)) for step in steps)


def test_tile_starts_of_a_short_side_is_one_tile():
    assert tile_starts(100, 256, 0.5) == [0]
    assert tile_starts(565, 256, 0.5) == [0, 103, 206, 309]


def test_gaussian_weights_peak_in_the_middle_and_never_vanish():
    weights = gaussian_weights(64)
    assert weights.shape == (64, 64)
    assert float(weights[31:33, 31:33].min()) == pytest.approx(float(weights.max()))
    assert weights.min() > 0 and weights[0, 0] < 1e-3 * weights.max()


def test_blending_reassembles_a_position_free_function_exactly():
    images = torch.randn(2, 3, 150, 211)

    def run(tiles):  # a pointwise "network": what blending gives back must equal it everywhere
        return torch.stack([tiles[:, 0] * 2 + tiles[:, 1], tiles[:, 2].exp()], 1)

    blended = sliding_window(run, images, tile=64, overlap=0.5, tile_batch=5)
    torch.testing.assert_close(blended, run(images), rtol=1e-5, atol=1e-5)


def test_blending_weights_each_tile_by_its_gaussian():
    # A "network" that answers each tile with its own index: where two tiles overlap the result
    # is their Gaussian-weighted mean, so it changes smoothly from one to the next.
    calls = []

    def run(tiles):
        out = torch.stack(
            [
                torch.full(tiles.shape[-2:], float(len(calls) * len(tiles) + i))
                for i in range(len(tiles))
            ]
        )
        calls.append(1)
        return out[:, None]

    blended = sliding_window(run, torch.zeros(1, 1, 32, 96), tile=32, overlap=0.5, tile_batch=1)[
        0, 0
    ]
    weights = gaussian_weights(32)
    # Column 20 is covered by tile 0 (its column 20) and tile 1 (starting at 16: its column 4).
    expected = (0 * weights[:, 20] + 1 * weights[:, 4]) / (weights[:, 20] + weights[:, 4])
    torch.testing.assert_close(blended[:, 20], expected)
    assert torch.all(blended[:, 1:] >= blended[:, :-1] - 1e-6)  # monotone: no seams


def test_an_image_smaller_than_a_tile_is_padded_and_cropped_back():
    images = torch.randn(1, 3, 40, 50)
    out = sliding_window(lambda tiles: tiles[:, :1] * 3, images, tile=64)
    assert out.shape == (1, 1, 40, 50)
    torch.testing.assert_close(out, images[:, :1] * 3)


def test_the_module_form_runs_a_network_over_whole_images():
    network = torch.nn.Conv2d(3, 2, 1)
    images = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(
            SlidingWindow(network, patch=32)(images), network(images), rtol=1e-5, atol=1e-5
        )


PEAK_MEMORY = """
import sys, torch
from medseg.engine.sliding_window import sliding_window
side = int(sys.argv[1])
network = torch.nn.Conv2d(3, 1, 3, padding=1)
images = torch.randn(1, 3, side, side)
with torch.no_grad():
    sliding_window(network, images, tile=256, tile_batch=8)
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's VmHWM")
def test_memory_follows_the_tiles_not_the_image():
    # VmHWM, the child's own peak: getrusage's ru_maxrss carries pytest's size across exec.
    peaks = {
        side: int(
            subprocess.run(
                [sys.executable, "-c", PEAK_MEMORY, str(side)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for side in (512, 4096)
    }
    # The 4096² image's input (192 MiB) and its sum, divided in place into the result (64 MiB;
    # 269 MiB measured in all on an AMD EPYC): nothing that grows with the number of tiles (961
    # here, 9 for 512²). That no other whole-image buffer is made is checked exactly, op by op,
    # in tests/test_images.py.
    assert peaks[4096] - peaks[512] < 400, peaks


def test_tiles_are_half_again_the_patch_within_the_image():
    assert inference_tile(256) == 384 and inference_tile(64) == 96
    assert tile_for_image(256, 584, 565) == 384  # a DRIVE image
    assert tile_for_image(256, 300, 500) == 300  # no zero padding where the image has pixels
    assert tile_for_image(256, 200, 900) == 256  # never below the patch (padded, as before)


def test_the_module_form_tiles_by_the_patch_it_was_given():
    seen = []

    def network(tiles):
        seen.append(tuple(tiles.shape[-2:]))
        return tiles[:, :1]

    SlidingWindow(network, patch=64, tile_batch=64)(torch.zeros(1, 3, 100, 120))
    assert seen == [(96, 96)]
