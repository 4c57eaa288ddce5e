"""Prediction on files and folders: original resolution, batching, TTA, post-processing.

``Predictor`` turns uint8 images of any size into probability maps of the same size: resize to
the network's size, normalise, run (optionally averaging flipped and rotated views), and resize
the probabilities back. ``predict`` writes one 0/255 PNG mask per image, atomically, skipping
masks already written (so an interrupted folder resumes) and listing images it could not read.
A record of the checkpoint and settings in the output folder (``.medseg-predict.json``) makes
sure that a resumed run only keeps masks made the same way; other earlier results are refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from medseg.config import Config
from medseg.data.folder import list_images
from medseg.data.io import read_image
from medseg.data.transforms import eval_transform, resize_image
from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from medseg.engine.runtime import CompiledOrEager, Precision, select_device, select_precision
from medseg.errors import MedsegError
from medseg.files import atomic_path, check_writable, remove_partial_files, write_text
from medseg.progress import progress_bar
from medseg.visualize import overlay

TTA_MODES = ("none", "flip", "d4")
# Averaging the four flips raised mean Dice by 0.007 and the thresholded Jaccard by 0.019 on
# ISIC 2017 test/ (benchmarks/accuracy.py, README Results) for 4× the inference time.
DEFAULT_TTA = "flip"


def tta_views(mode: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs: 'flip' = 4 flips, 'd4' = all 8 symmetries."""
    if mode == "none":
        return [(0, False)]
    if mode == "flip":
        return [(0, False), (0, True), (2, False), (2, True)]  # id, h-flip, 180° (=h+v), v-flip
    if mode == "d4":
        return [(turns, flip) for turns in range(4) for flip in (False, True)]
    raise MedsegError(f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}")


def check_threshold(threshold: float | None) -> None:
    """Refuse a foreground threshold outside (0, 1); None (the checkpoint's own) passes."""
    if threshold is None:
        return
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise MedsegError(
            f"threshold {threshold!r} is not a probability strictly between 0 and 1; "
            f"pass e.g. --threshold 0.5, or leave it out to use the checkpoint's"
        )


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a bool mask, with its holes filled.

    The ISIC task defines a lesion as one contiguous region without holes.
    """
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(largest)


@dataclass
class Predictor:
    """A trained model ready to segment uint8 RGB images of any size.

    ``threshold`` cuts the foreground probability; None takes the checkpoint's own
    (``config.train.threshold``).
    """

    model: torch.nn.Module
    config: Config
    device: torch.device
    precision: Precision
    tta: str = DEFAULT_TTA
    postprocess: bool = False
    compile: bool = False
    threshold: float | None = None

    def __post_init__(self):
        check_threshold(self.threshold)
        if self.threshold is None:
            self.threshold = self.config.train.threshold
        self.transform = eval_transform(self.config.data.image_size)
        tta_views(self.tta)  # validate early
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
        path: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        tta: str = DEFAULT_TTA,
        postprocess: bool = False,
        compile: bool = False,
        threshold: float | None = None,
    ) -> Predictor:
        """Load ``path`` (a .pt file or a run folder); ``threshold`` None: the checkpoint's."""
        check_threshold(threshold)  # before the seconds spent loading
        state = load_checkpoint(path)
        model, config = model_from_checkpoint(state, path=path)
        torch_device = select_device(device)
        return cls(
            model,
            config,
            torch_device,
            select_precision(precision, torch_device),
            tta=tta,
            postprocess=postprocess,
            compile=compile,
            threshold=threshold,
        )

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Foreground probability maps, float32 (H, W), each at its image's own size."""
        batch = torch.stack([self.transform(image=image)["image"] for image in images])
        batch = batch.to(self.device, memory_format=torch.channels_last)
        views = tta_views(self.tta)
        total = torch.zeros(batch.shape[0], 1, *batch.shape[-2:], device=self.device)
        for turns, flip in views:
            view = _orient(batch, turns, flip)
            with self.precision.autocast(self.device):
                logits = self.network(view)
            total += _unorient(torch.sigmoid(logits.float()), turns, flip)
        maps = (total / len(views))[:, 0].cpu().numpy()
        return [
            resize_image(probability, image.shape[:2])
            for probability, image in zip(maps, images, strict=True)
        ]

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Binary masks (bool, H × W) at each image's size."""
        return [self.binarize(probability) for probability in self.probabilities(images)]

    def binarize(self, probability: np.ndarray) -> np.ndarray:
        mask = probability > self.threshold
        return keep_largest_component(mask) if self.postprocess else mask


def _orient(batch: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if flip:
        batch = batch.flip(-1)
    return torch.rot90(batch, turns, dims=(-2, -1)) if turns else batch


def _unorient(batch: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if turns:
        batch = torch.rot90(batch, -turns, dims=(-2, -1))
    return batch.flip(-1) if flip else batch


@dataclass
class PredictionReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already present from an earlier run
    failed: list[str] = field(default_factory=list)  # "file: reason"


def mask_name(image_path: Path) -> str:
    """``<stem>_segmentation.png``: the ISIC name; only the file's stem is used, never its folders."""
    return f"{Path(image_path.name).stem}_segmentation.png"


def output_names(image_path: Path, *, probabilities: bool, overlays: bool) -> list[str]:
    """Every file predict writes for one image, the mask last (its presence means: done)."""
    stem = Path(image_path.name).stem
    extras = [f"{stem}_probability.png"] * probabilities + [f"{stem}_overlay.png"] * overlays
    return [*extras, mask_name(image_path)]


RECORD_NAME = ".medseg-predict.json"


def collect_inputs(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        folder = source / "images" if (source / "images").is_dir() else source
        images = list_images(folder)
        if not images:
            raise MedsegError(f"no images found in {folder}")
        return images
    raise MedsegError(f"input not found: {source}")


def predict(
    checkpoint: str | Path,
    source: str | Path,
    output: str | Path,
    *,
    batch_size: int = 16,
    tta: str = DEFAULT_TTA,
    postprocess: bool = False,
    probabilities: bool = False,
    overlays: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    compile: bool = False,
    threshold: float | None = None,
) -> PredictionReport:
    """Segment an image file or a folder of images into ``output/<id>_segmentation.png`` (0/255).

    Masks already in ``output`` are kept and skipped unless ``overwrite``: an interrupted run
    resumes where it stopped. Unreadable images are listed in the report; the others are written.
    ``threshold`` cuts the foreground probability (None: the checkpoint's).
    """
    check_threshold(threshold)
    output = Path(output)
    inputs = collect_inputs(source)
    _check_unique_names(inputs)
    check_writable(output)
    predictor = Predictor.from_checkpoint(
        checkpoint,
        device=device,
        tta=tta,
        postprocess=postprocess,
        compile=compile,
        threshold=threshold,
    )
    record = {
        "checkpoint_sha256": _sha256(resolve_checkpoint(checkpoint)),
        "tta": tta,
        "postprocess": postprocess,
        "threshold": predictor.threshold,  # resolved: the checkpoint's unless one was given
    }
    names = {
        path: output_names(path, probabilities=probabilities, overlays=overlays) for path in inputs
    }
    if overwrite:  # replaced up front, so a resumed --overwrite run cannot keep an old mask
        for path in inputs:
            for name in names[path]:
                (output / name).unlink(missing_ok=True)
    else:
        _check_earlier_results(output, record, [output / names[path][-1] for path in inputs])
    remove_partial_files(output)  # left by a kill in the middle of a write
    write_text(output / RECORD_NAME, json.dumps(record, indent=2))
    report = PredictionReport()
    pending = []
    for path in inputs:
        if all((output / name).exists() for name in names[path]):
            report.skipped.append(output / mask_name(path))
        else:
            pending.append(path)
    bar = progress_bar(total=len(pending), desc="predicting", enabled=progress)
    for paths, images in _readable_batches(pending, batch_size, report):
        for path, image, probability in zip(
            paths, images, predictor.probabilities(images), strict=True
        ):
            mask = predictor.binarize(probability)
            stem = Path(path.name).stem
            if probabilities:
                _save_png(
                    output / f"{stem}_probability.png",
                    np.round(probability * 255).astype(np.uint8),
                )
            if overlays:
                _save_png(output / f"{stem}_overlay.png", overlay(image, mask))
            _save_png(output / mask_name(path), (mask * 255).astype(np.uint8))  # last: done
            report.written.append(output / mask_name(path))
        bar.update(len(paths))
    bar.close()
    return report


def _check_earlier_results(output: Path, record: dict, masks: list[Path]) -> None:
    """Refuse to mix in masks made by another checkpoint or settings, or not by predict at all."""
    earlier = [mask for mask in masks if mask.exists()]
    record_path = output / RECORD_NAME
    if record_path.is_file():
        try:
            previous = json.loads(record_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            previous = {}
        changed = [key for key in record if previous.get(key) != record[key]]
        if changed and earlier:
            what = "another checkpoint" if "checkpoint_sha256" in changed else ", ".join(changed)
            raise MedsegError(
                f"{output} holds {len(earlier)} masks predicted with {what} (see {RECORD_NAME}); "
                f"choose another --output, or pass --overwrite to replace them"
            )
    elif earlier:
        raise MedsegError(
            f"{output} already holds {len(earlier)} masks that medseg predict did not write "
            f"(first: {earlier[0].name}); choose another --output, or pass --overwrite to "
            f"replace them"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _readable_batches(
    paths: list[Path], batch_size: int, report: PredictionReport
) -> Iterator[tuple[list[Path], list[np.ndarray]]]:
    batch_paths, batch_images = [], []
    for path in paths:
        try:
            image = read_image(path)
        except MedsegError as error:
            report.failed.append(str(error))
            continue
        batch_paths.append(path)
        batch_images.append(image)
        if len(batch_paths) == batch_size:
            yield batch_paths, batch_images
            batch_paths, batch_images = [], []
    if batch_paths:
        yield batch_paths, batch_images


def _check_unique_names(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        name = mask_name(path)
        if name in seen:
            raise MedsegError(
                f"{seen[name].name} and {path.name} would both be written as {name}; rename one"
            )
        seen[name] = path


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")
