"""Whole images through a network trained on patches: overlapping tiles, Gaussian blending.

A network trained on S × S patches sees an image of any size as tiles placed with a given
overlap (half a tile by default), run in batches of tiles. The tiles are larger than the patch
(`inference_tile`): the network is fully convolutional and its image pooling keeps the patch's
scale (`medseg.model.aspp.ImagePooling`), so a larger tile only adds the context that the
whole image would give the tile's centre. Each tile's output is weighted by a Gaussian
centred on the tile (sigma an eighth of the tile), highest where the network saw the most
context, and every pixel gets the weighted mean of the tiles that cover it: no seams where
tiles meet.
This is MONAI's ``sliding_window_inference`` with ``mode="gaussian"`` and nnU-Net's prediction.

Memory is bounded by the tile batch and the output: the image's tiles are cut and run a batch at
a time, so a 4096 × 4096 image needs its input, its (K, H, W) sum and weights, and one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIGMA_SCALE = 0.125  # of the tile side, as MONAI's and nnU-Net's defaults
DEFAULT_OVERLAP = 0.5
# Tile side over patch side. With half-tile overlap every pixel is computed about four times
# whatever the tile, so a larger tile costs memory (the tile batch's area), not time.
TILE_SCALE = 1.5


def inference_tile(patch: int, scale: float = TILE_SCALE) -> int:
    """The tile side of a network trained on ``patch`` × ``patch`` patches: ``scale`` × the
    patch, a multiple of 32."""
    return 32 * round(scale * patch / 32)


def tile_for_image(patch: int, height: int, width: int) -> int:
    """`inference_tile` for a ``height`` × ``width`` image: no more than its shorter side (no
    zero padding where the image has pixels), no less than the patch."""
    return max(patch, min(inference_tile(patch), height, width))


def gaussian_weights(tile: int, *, sigma_scale: float = SIGMA_SCALE) -> Tensor:
    """(tile, tile) float32 weights: a Gaussian with peak 1 at the centre, never 0 at the edge
    (a pixel covered only by tile edges still gets a defined mean)."""
    coordinates = torch.arange(tile, dtype=torch.float32) - (tile - 1) / 2
    profile = torch.exp(-0.5 * (coordinates / (sigma_scale * tile)) ** 2)
    weights = profile[:, None] * profile[None, :]
    return weights.clamp_min(weights[weights > 0].min())


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering ``length`` pixels: evenly spread, first at 0 and last
    at ``length - tile``, each at most ``tile × (1 - overlap)`` after the one before."""
    if length <= tile:
        return [0]
    stride = max(1, round(tile * (1 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    spacing = (length - tile) / (count - 1)
    return [round(index * spacing) for index in range(count)]


def sliding_window(
    run: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    tile: int,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = 8,
) -> Tensor:
    """``run``'s output for whole ``images`` (N, C, H, W), assembled from tiles of ``tile``.

    ``run`` maps a batch of tiles (B, C, tile, tile) to (B, K, tile, tile) scores (logits or
    probabilities); the result is (N, K, H, W) float32 on the images' device. An image smaller
    than a tile is padded with zeros (the mean colour once normalised) and cropped back.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    count, _, height, width = images.shape
    padded = _pad_to(images, tile)
    weights = gaussian_weights(tile).to(images.device)
    total: Tensor | None = None
    coverage = torch.zeros(padded.shape[-2:], device=images.device)
    for batch, places in _tile_batches(padded, tile, overlap, tile_batch):
        scores = run(batch).float()
        if total is None:
            total = torch.zeros(count, scores.shape[1], *padded.shape[-2:], device=images.device)
        for (index, top, left), score in zip(places, scores, strict=True):
            total[index, :, top : top + tile, left : left + tile] += score * weights
            if index == 0:  # every image has the same tiles: count their weights once
                coverage[top : top + tile, left : left + tile] += weights
    return (total / coverage)[..., :height, :width]


def _pad_to(images: Tensor, tile: int) -> Tensor:
    height, width = images.shape[-2:]
    bottom, right = max(0, tile - height), max(0, tile - width)
    return F.pad(images, (0, right, 0, bottom)) if bottom or right else images


def _tile_batches(
    images: Tensor, tile: int, overlap: float, tile_batch: int
) -> Iterator[tuple[Tensor, list[tuple[int, int, int]]]]:
    """Batches of tiles and where each came from: (image index, top, left)."""
    places = [
        (index, top, left)
        for index in range(images.shape[0])
        for top in tile_starts(images.shape[-2], tile, overlap)
        for left in tile_starts(images.shape[-1], tile, overlap)
    ]
    for first in range(0, len(places), tile_batch):
        chunk = places[first : first + tile_batch]
        tiles = [
            images[index, :, top : top + tile, left : left + tile] for index, top, left in chunk
        ]
        yield torch.stack(tiles), chunk


class SlidingWindow(nn.Module):
    """A network trained on ``patch`` × ``patch`` patches, run over whole images by
    `sliding_window` in tiles of `tile_for_image`: for validation during training, where the
    loss and metrics take the blended logits."""

    def __init__(self, network: nn.Module, *, patch: int, tile_batch: int = 8):
        super().__init__()
        self.network = network
        self.patch = patch
        self.tile_batch = tile_batch

    def forward(self, images: Tensor) -> Tensor:
        tile = tile_for_image(self.patch, *images.shape[-2:])
        return sliding_window(self.network, images, tile=tile, tile_batch=self.tile_batch)
