"""The Predictor: a trained model of any kind segmenting images at their own resolution.

``Predictor`` turns uint8 images of any size into probability maps of the same size: resize to
the network's size, normalise, run (optionally averaging flipped and rotated views), and resize
the probabilities back. A binary model gives one foreground probability per pixel, cut at a
threshold; a K-class model gives K probabilities per pixel, and the mask is their arg-max (a
label map of class indices). The network is a PyTorch module, or an exported model's
onnxruntime session behind the same call (batch in, logits out: `medseg.formats.onnx`),
so everything around it is the same code for both. What a ``--checkpoint`` names is decided
by `medseg.formats.source.resolve_source`; an ensemble of several models is an
`medseg.prediction.ensemble.EnsemblePredictor`, which `Predictor.from_checkpoint` returns for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import Config
from medseg.config.choices import DEFAULT_TTA
from medseg.core.errors import MedsegError
from medseg.data.io import to_channels
from medseg.data.transforms import (
    ImageCorrection,
    eval_transform,
    resize_image,
    resize_probabilities,
)
from medseg.engine.runtime import CompiledOrEager, Precision
from medseg.engine.sliding_window import blend_tiles, tile_for_image
from medseg.formats.source import CHECKPOINT, KFOLD, Checkpoint, ModelSource, resolve_source
from medseg.prediction.ensemble import EnsemblePredictor
from medseg.prediction.loading import Network, load_model
from medseg.prediction.segmenter import (
    Segmenter,
    View,
    check_threshold,
    resolve_tta,
    tta_views,
)

__all__ = ["EnsemblePredictor", "Predictor", "check_threshold", "resolve_tta", "tta_views"]


@dataclass
class Predictor(Segmenter):
    """A trained model ready to segment uint8 images of any size, colour or gray.

    A binary model (``config.model.num_classes`` 1) gives foreground probabilities, cut at
    ``threshold``; None takes the checkpoint's own (``config.train.threshold``). A K-class model
    gives K class probabilities and arg-max label maps; it has no threshold. ``tta`` "auto"
    becomes the checkpoint's mode (`resolve_tta`); ``self.tta`` holds the mode that runs.
    ``model`` is a PyTorch module, or any other `Network` (an ONNX session: run as given, on
    the CPU, never compiled).
    """

    model: torch.nn.Module | Network
    config: Config
    device: torch.device
    precision: Precision
    tta: str = DEFAULT_TTA
    postprocess: bool = False
    compile: bool = False
    threshold: float | None = None
    tile_batch: int = 8  # tiles per network call for a patch-trained model (bounds its memory)

    def __post_init__(self):
        self.settle_threshold(self.config.train.threshold)
        self.tta = resolve_tta(self.tta, self.config)
        # A patch-trained model sees each image at its own size, tile by tile.
        size = None if self.patches else self.config.data.image_size
        self.transform = eval_transform(size, channels=self.config.data.channels)
        if not isinstance(self.model, torch.nn.Module):
            if self.compile:
                raise MedsegError(
                    "--compile applies to PyTorch models; an ONNX model runs as exported "
                    "through onnxruntime, so leave --compile out"
                )
            self.memory_format = torch.contiguous_format  # what onnxruntime reads
            self.network = self.model
            return
        self.memory_format = torch.channels_last
        self.model.eval().to(self.device, memory_format=torch.channels_last)
        # Freezing lets the compiler treat the weights as constants: BatchNorm folds into the
        # convolutions and the weights are laid out once for the CPU's matrix kernels. It
        # costs a compilation per new batch shape, so it pays off on large folders.
        self.network = (
            CompiledOrEager(self.model, options={"freezing": True}) if self.compile else self.model
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: Checkpoint | ModelSource,
        *,
        device: str = "auto",
        precision: str = "auto",
        tta: str = DEFAULT_TTA,
        postprocess: bool = False,
        compile: bool = False,
        threshold: float | None = None,
        folds: Sequence[int] | None = None,
    ) -> Predictor | EnsemblePredictor:
        """Load ``path``; ``threshold`` None: the checkpoint's.

        ``path`` is anything `medseg.formats.source.resolve_source` accepts: a .pt file or a
        run folder, a safetensors export (config.json and model.safetensors), or an ONNX export
        (its folder, or its .onnx file with medseg.json beside it), which runs through
        onnxruntime on the CPU in float32. An ensemble (a k-fold run, of which ``folds``
        chooses folds; an exported ensemble; a list of checkpoints) gives an
        `EnsemblePredictor`: the same calls, its members' probabilities averaged.
        """
        check_threshold(threshold)  # before the seconds spent loading
        source = resolve_source(path, folds=folds)
        if source.is_ensemble:

            def member(leaf: ModelSource, mode: str) -> Predictor:
                return cls.from_checkpoint(
                    leaf, device=device, precision=precision, tta=mode, compile=compile
                )

            return EnsemblePredictor.from_source(
                source, member, tta=tta, postprocess=postprocess, threshold=threshold,
                compile=compile,
            )  # fmt: skip
        loaded = load_model(source, device=device, precision=precision)
        return cls(
            loaded.network, loaded.config, loaded.device, loaded.precision, tta=tta,
            postprocess=postprocess, compile=compile, threshold=threshold,
        )  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> Predictor:
        """A Predictor for an exported folder (safetensors or ONNX); ``options`` as for
        `from_checkpoint`."""
        if resolve_source(path).kind in (CHECKPOINT, KFOLD):
            raise MedsegError(
                f"{path} is not an exported medseg model (config.json and model.safetensors, "
                f"model.onnx and medseg.json, or ensemble.json); export one with medseg export, or load a .pt "
                f"file or run folder with Predictor.from_checkpoint"
            )
        return cls.from_checkpoint(path, **options)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the network's weights in memory (an ONNX session's: its file's size)."""
        if isinstance(self.model, torch.nn.Module):
            return sum(tensor.nbytes for tensor in self.model.state_dict().values())
        path = getattr(self.model, "path", None)
        return path.stat().st_size if path is not None else 0

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """What the network is fed: float32 (N, C, S, S), resized to the checkpoint's size S
        and normalised, on the CPU (a patch-trained model's: at the images' own size, which must
        then be one). ``images`` as for `probabilities`."""
        return torch.stack([self.transform(image=self._pixels(image))["image"] for image in images])

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        """``image`` as training's loader gave it to the augmentation: the checkpoint's
        channels, at the network's scale (resized, or whole for a patch-trained model), its
        colour and contrast corrected (`ImageCorrection`)."""
        data = self.config.data
        pixels = to_channels(image, data.channels)
        if not self.patches:
            pixels = resize_image(pixels, data.image_size)
        return ImageCorrection.of(data)(pixels)

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities at each image's own size: float32 (H, W) of the foreground for a binary
        model; float32 (K, H, W) of each class for a K-class model, summing to 1 per pixel.

        ``images`` are uint8 (H, W, 3) or (H, W[, 1]) gray (`to_channels`). Each TTA view's
        softmax (or sigmoid) is turned back and averaged before the resize to the image's size.
        A patch-trained model predicts each image whole, by sliding window, with no resize.
        """
        if self.patches:
            return [self._whole_image(image) for image in images]
        batch = self.preprocess(images).to(self.device, memory_format=self.memory_format)
        maps = self._scores(batch).cpu().numpy()  # (N, outputs, h, w)
        maps = maps if self.multi_class else maps[:, 0]
        return [
            resize_probabilities(probability, image.shape[:2])
            for probability, image in zip(maps, images, strict=True)
        ]

    def views(self) -> list[View]:
        """The TTA views whose probabilities are averaged: those of the mode that runs."""
        return tta_views(self.tta)

    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, outputs, h, w) probabilities of a network-ready batch, averaged over TTA views
        (each turned, flipped and rescaled back to the batch's own grid first)."""
        views = self.views()
        total = None
        for view in views:
            oriented = _orient(_rescale(batch, view.scale), view.turns, view.flip)
            with self.precision.autocast(self.device):
                logits = self.network(oriented)
            scores = (
                logits.float().softmax(1) if self.multi_class else torch.sigmoid(logits.float())
            )
            scores = _resize(_unorient(scores, view.turns, view.flip), batch.shape[-2:])
            total = scores if total is None else total + scores
        return total / len(views)

    def _whole_image(self, image: np.ndarray) -> np.ndarray:
        """`probabilities` of one image by sliding window over it at its own size.

        Each tile is cut from the uint8 image and normalised as it is run, and the tiles' scores
        are summed in place into the float32 result (`blend_tiles`): a 9000 × 9000 image costs
        its own 243 MB and 324 MB per output, never a float copy of the whole image.
        """
        pixels = self._pixels(image)
        tile = tile_for_image(self.config.data.image_size, *image.shape[:2])

        def cut(index: int, top: int, left: int) -> torch.Tensor:
            return self.transform(image=pixels[top : top + tile, left : left + tile])["image"]

        def run(tiles: torch.Tensor) -> torch.Tensor:
            return self._scores(tiles.contiguous(memory_format=self.memory_format))

        maps = blend_tiles(
            run, cut, count=1, size=image.shape[:2], tile=tile, tile_batch=self.tile_batch,
            device=self.device,
        )[0].cpu().numpy()  # fmt: skip
        return maps if self.multi_class else maps[0]


def _rescale(batch: torch.Tensor, scale: float) -> torch.Tensor:
    """``batch`` resized by ``scale`` to sides that are multiples of 16 (the network's stride)."""
    if scale == 1.0:
        return batch
    size = [max(16, round(side * scale / 16) * 16) for side in batch.shape[-2:]]
    return _resize(batch, size)  # interpolate keeps the batch's memory layout (channels_last)


def _resize(batch: torch.Tensor, size) -> torch.Tensor:
    """``batch`` bilinearly resized to ``size`` (antialiased when it shrinks); as it is if equal."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    shrinks = size[0] < batch.shape[-2] or size[1] < batch.shape[-1]
    return F.interpolate(batch, size=list(size), mode="bilinear", antialias=shrinks)


def _orient(batch: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if flip:
        batch = batch.flip(-1)
    return torch.rot90(batch, turns, dims=(-2, -1)) if turns else batch


def _unorient(batch: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if turns:
        batch = torch.rot90(batch, -turns, dims=(-2, -1))
    return batch.flip(-1) if flip else batch
