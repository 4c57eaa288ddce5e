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

Memory is bounded by the tile batch and the output: the image's tiles are cut (and, by the
predictor, normalised) a batch at a time from the image as it is, and summed in place into the
float32 (K, H, W) result; the weights that cover each pixel are a row's sum times a column's sum,
so a 9000 × 9000 image needs its uint8 input (243 MB), its sum (324 MB per class) and one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def gaussian_profile(tile: int, *, sigma_scale: float = SIGMA_SCALE) -> Tensor:
    """(tile,) float32: a Gaussian with peak 1 at the centre; about exp(-8) at the edges, so the
    (tile, tile) weights, its outer product, never vanish (a pixel covered only by tile edges
    still gets a defined mean)."""
    coordinates = torch.arange(tile, dtype=torch.float32) - (tile - 1) / 2
    return torch.exp(-0.5 * (coordinates / (sigma_scale * tile)) ** 2)


def gaussian_weights(tile: int, *, sigma_scale: float = SIGMA_SCALE) -> Tensor:
    """(tile, tile) float32 weights of each tile's pixels: `gaussian_profile` down × across."""
    profile = gaussian_profile(tile, sigma_scale=sigma_scale)
    return profile[:, None] * profile[None, :]


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
    count, _, height, width = images.shape

    def cut(index: int, top: int, left: int) -> Tensor:
        return images[index, :, top : top + tile, left : left + tile]

    return blend_tiles(
        run, cut, count=count, size=(height, width), tile=tile, overlap=overlap,
        tile_batch=tile_batch, device=images.device,
    )  # fmt: skip


def blend_tiles(
    run: Callable[[Tensor], Tensor],
    cut: Callable[[int, int, int], Tensor],
    *,
    count: int,
    size: tuple[int, int],
    tile: int,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = 8,
    device: torch.device | str = "cpu",
) -> Tensor:
    """`sliding_window` over ``count`` images of ``size`` (H, W) that ``cut(index, top, left)``
    hands out tile by tile, as (C, h, w) network-ready tensors (h, w ≤ ``tile``: an image's edge
    when it is smaller than a tile; padded here with zeros).

    Memory: one float32 (count, K, H, W) sum, which becomes the result in place, and one batch
    of tiles: no whole-image copy of the input (the caller keeps it as it is, uint8 say) and no
    whole-image weights. The weights of the tiles covering a pixel add up to the product of a
    row's sum and a column's sum (the weights are a Gaussian down × across, the tiles a grid),
    so two vectors of H and W hold them.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    height, width = max(size[0], tile), max(size[1], tile)  # padded up to one tile
    tops, lefts = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    profile = gaussian_profile(tile).to(device)
    weights = profile[:, None] * profile[None, :]
    places = [(index, top, left) for index in range(count) for top in tops for left in lefts]
    total: Tensor | None = None
    for first in range(0, len(places), tile_batch):
        chunk = places[first : first + tile_batch]
        batch = torch.stack([_pad_to(cut(*place), tile) for place in chunk]).to(device)
        scores = run(batch)  # (B, K, tile, tile)
        if total is None:
            total = torch.zeros(count, scores.shape[1], height, width, device=device)
        for (index, top, left), score in zip(chunk, scores, strict=True):
            total[index, :, top : top + tile, left : left + tile].addcmul_(score.float(), weights)
    _divide_by_coverage(total, _coverage(height, tops, profile), _coverage(width, lefts, profile))
    return total[..., : size[0], : size[1]]


def _coverage(length: int, starts: list[int], profile: Tensor) -> Tensor:
    """(length,) the sum over tiles along one axis of the profile each places there."""
    coverage = torch.zeros(length, device=profile.device)
    for start in starts:
        coverage[start : start + len(profile)] += profile
    return coverage


def _divide_by_coverage(total: Tensor, rows: Tensor, columns: Tensor) -> None:
    """``total`` (N, K, H, W) /= rows (H,) × columns (W,), in place, a band of rows at a time
    (the band's weights are the only temporary: about 4 MiB)."""
    band = max(1, (1 << 20) // total.shape[-1])
    for top in range(0, total.shape[-2], band):
        total[..., top : top + band, :] /= rows[top : top + band, None] * columns[None, :]


def _pad_to(tile_or_images: Tensor, tile: int) -> Tensor:
    height, width = tile_or_images.shape[-2:]
    bottom, right = max(0, tile - height), max(0, tile - width)
    return F.pad(tile_or_images, (0, right, 0, bottom)) if bottom or right else tile_or_images


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
