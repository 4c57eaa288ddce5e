"""Prediction on files and folders: original resolution, batching, TTA, post-processing.

``Predictor`` turns uint8 images of any size into probability maps of the same size: resize to
the network's size, normalise, run (optionally averaging flipped and rotated views), and resize
the probabilities back. A binary model gives one foreground probability per pixel, cut at a
threshold; a K-class model gives K probabilities per pixel, and the mask is their arg-max (a
label map of class indices). The network is a PyTorch module, or an exported model's
onnxruntime session behind the same call (batch in, logits out: `medseg.exports.onnx_runtime`),
so everything around it is the same code for both. ``predict`` writes one PNG mask per image
(0/255, or the class index), atomically, skipping masks already written (so an interrupted
folder resumes) and listing images it could not read.
A record of the checkpoint and settings in the output folder (``.medseg-predict.json``) makes
sure that a resumed run only keeps masks made the same way; other earlier results are refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from medseg.config import Config
from medseg.data.dicom import dicom_id, is_dicom, list_dicom, require_pydicom
from medseg.data.folder import list_images
from medseg.data.io import read_image, to_channels
from medseg.data.plan import augmentation_for
from medseg.data.transforms import FLIPPING_AUGMENTATIONS, eval_transform, resize_image
from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from medseg.engine.runtime import CompiledOrEager, Precision, select_device, select_precision
from medseg.engine.sliding_window import sliding_window, tile_for_image
from medseg.errors import MedsegError
from medseg.exports.onnx_runtime import load_onnx, onnx_paths
from medseg.exports.pretrained import CONFIG_NAME, WEIGHTS_NAME, is_pretrained, load_pretrained
from medseg.files import atomic_path, check_writable, remove_partial_files, write_text
from medseg.metrics import binarize
from medseg.progress import progress_bar
from medseg.visualize import overlay

TTA_MODES = ("auto", "none", "flip", "d4")
# "auto" is resolved per checkpoint (`resolve_tta`): the flips only where the network was trained
# on flipped images (what they are worth: README Results); a network that never saw a flipped
# chest would read a flipped one with its lungs swapped.
DEFAULT_TTA = "auto"


def resolve_tta(mode: str, config: Config) -> str:
    """The TTA mode to run: ``mode`` itself, or for "auto" "flip" when the checkpoint's training
    pipeline (``config.data.augment``) flips images, else "none"."""
    if mode == "auto":
        augment = config.data.augment
        if augment == "auto":  # a config never planned (built by hand): what training plans
            augment = augmentation_for(config.data.labels)
        return "flip" if augment in FLIPPING_AUGMENTATIONS else "none"
    tta_views(mode)  # validate
    return mode


def tta_views(mode: str) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs: 'flip' = 4 flips, 'd4' = all 8 symmetries.

    ``mode`` is a resolved mode (see `resolve_tta`), not "auto".
    """
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
    if not mask.any():
        return mask
    return ndimage.binary_fill_holes(_largest_component(mask))


def keep_largest_components(label_map: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) label map keeping the largest 8-connected region of each foreground class.

    The other regions become background 0, as nnU-Net's "remove all but the largest
    component". A kept region's holes are filled with its class only where they are background
    after that (a region of another class inside it stays); a hole inside several regions goes
    to the innermost one, whose filled area is the smallest.
    """
    kept = np.zeros_like(label_map)
    filled = []
    for value in np.unique(label_map):
        if value == 0:
            continue
        largest = _largest_component(label_map == value)
        kept[largest] = value
        region = ndimage.binary_fill_holes(largest)
        filled.append((int(region.sum()), int(value), region & ~largest))
    for _, value, holes in sorted(filled, key=lambda item: item[0]):
        kept[holes & (kept == 0)] = value
    return kept


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


# What a Predictor runs: a float (N, C, H, W) batch, normalised, to logits (N, K, H, W).
Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Predictor:
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
        check_threshold(self.threshold)
        if self.multi_class and self.threshold is not None:
            raise MedsegError(
                f"threshold {self.threshold!r} applies to binary masks only; this checkpoint "
                f"predicts {self.config.model.num_classes} classes by arg-max, so leave "
                f"--threshold out"
            )
        if self.threshold is None and not self.multi_class:
            self.threshold = self.config.train.threshold
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
        path: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        tta: str = DEFAULT_TTA,
        postprocess: bool = False,
        compile: bool = False,
        threshold: float | None = None,
    ) -> Predictor:
        """Load ``path``; ``threshold`` None: the checkpoint's.

        ``path`` is a .pt file or a run folder, a pretrained folder (config.json and
        model.safetensors: `from_pretrained`), or an ONNX export (its folder, or its .onnx file
        with medseg.json beside it), which runs through onnxruntime on the CPU in float32.
        """
        check_threshold(threshold)  # before the seconds spent loading
        options = dict(tta=tta, postprocess=postprocess, compile=compile, threshold=threshold)
        if is_pretrained(path):
            model, config = load_pretrained(path)
            if config.data.image_size == 0:
                raise MedsegError(
                    f"{path}/{CONFIG_NAME} holds the model's arguments but no input size (it "
                    f"was saved without the run's config); save it with save_pretrained(folder, "
                    f"config=the run's config), or export the checkpoint with medseg export"
                )
        elif onnx_paths(path) is not None:
            return cls._from_onnx(path, device=device, precision=precision, **options)
        else:
            state = load_checkpoint(path)
            model, config = model_from_checkpoint(state, path=path)
        torch_device = select_device(device)
        return cls(
            model, config, torch_device, select_precision(precision, torch_device), **options
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> Predictor:
        """A Predictor for an exported folder: `save_pretrained`'s (config.json and
        model.safetensors) or an ONNX export; ``options`` as for `from_checkpoint`."""
        if not (is_pretrained(path) or onnx_paths(path)):
            raise MedsegError(
                f"{path} is not an exported medseg model ({CONFIG_NAME} and {WEIGHTS_NAME}, or "
                f"model.onnx and medseg.json); export one with medseg export, or load a .pt "
                f"file or run folder with Predictor.from_checkpoint"
            )
        return cls.from_checkpoint(path, **options)

    @classmethod
    def _from_onnx(cls, path, *, device: str, precision: str, **options) -> Predictor:
        if device not in ("auto", "cpu"):
            raise MedsegError(
                f"{path} is an ONNX model, which runs on the CPU through onnxruntime; leave "
                f"--device out (or pass cpu), or use the PyTorch checkpoint on {device}"
            )
        if precision not in ("auto", "fp32"):
            raise MedsegError(
                f"{path} is an ONNX model, which runs at the precision it was exported in; "
                f"leave the precision out (or pass fp32)"
            )
        network, config, _ = load_onnx(path)
        return cls(network, config, torch.device("cpu"), Precision("fp32", None), **options)

    @property
    def multi_class(self) -> bool:
        """True for a K-class model (softmax, label maps), False for a binary one (sigmoid)."""
        return self.config.model.num_classes > 1

    @property
    def patches(self) -> bool:
        """True for a model trained on patches (``data.mode=patch``): it predicts whole images
        at their own size by `medseg.engine.sliding_window`, with TTA on each tile."""
        return self.config.data.mode == "patch"

    @property
    def labels(self) -> list[str]:
        """Class names by label value (``config.data.labels``); empty for binary masks."""
        return list(self.config.data.labels)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """What the network is fed: float32 (N, C, S, S), resized to the checkpoint's size S
        and normalised, on the CPU (a patch-trained model's: at the images' own size, which must
        then be one). ``images`` as for `probabilities`."""
        channels = self.config.data.channels
        return torch.stack(
            [self.transform(image=to_channels(image, channels))["image"] for image in images]
        )

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
        if not self.multi_class:
            return [
                resize_image(probability, image.shape[:2])
                for probability, image in zip(maps[:, 0], images, strict=True)
            ]
        # Resized as (h, w, K): every class by the same interpolation, so each pixel's
        # probabilities still sum to 1 at the image's size.
        return [
            np.ascontiguousarray(
                resize_image(probability.transpose(1, 2, 0), image.shape[:2]).transpose(2, 0, 1),
                dtype=np.float32,
            )
            for probability, image in zip(maps, images, strict=True)
        ]

    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, outputs, h, w) probabilities of a network-ready batch, averaged over TTA views."""
        views = tta_views(self.tta)
        total = None
        for turns, flip in views:
            view = _orient(batch, turns, flip)
            with self.precision.autocast(self.device):
                logits = self.network(view)
            scores = (
                logits.float().softmax(1) if self.multi_class else torch.sigmoid(logits.float())
            )
            scores = _unorient(scores, turns, flip)
            total = scores if total is None else total + scores
        return total / len(views)

    def _whole_image(self, image: np.ndarray) -> np.ndarray:
        """`probabilities` of one image by sliding window over it at its own size."""
        batch = self.preprocess([image]).to(self.device)

        def run(tiles: torch.Tensor) -> torch.Tensor:
            return self._scores(tiles.contiguous(memory_format=self.memory_format))

        tile = tile_for_image(self.config.data.image_size, *image.shape[:2])
        maps = sliding_window(run, batch, tile=tile, tile_batch=self.tile_batch)[0]
        maps = maps.cpu().numpy()
        return maps if self.multi_class else maps[0]

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Masks at each image's size: bool (H, W) for binary, uint8 (H, W) label maps for K
        classes (see `to_mask`)."""
        return [self.to_mask(probability) for probability in self.probabilities(images)]

    def to_mask(self, probability: np.ndarray) -> np.ndarray:
        """One output of `probabilities` as a mask: `binarize` or `label_map`."""
        return self.label_map(probability) if self.multi_class else self.binarize(probability)

    def binarize(self, probability: np.ndarray) -> np.ndarray:
        """A bool (H, W) mask: foreground above the threshold; its largest region if postprocess."""
        mask = binarize(probability, self.threshold)
        return keep_largest_component(mask) if self.postprocess else mask

    def label_map(self, probabilities: np.ndarray) -> np.ndarray:
        """A uint8 (H, W) label map: the arg-max of (K, H, W) probabilities, taken at the image's
        own size (never a resized label map); with postprocess, each class's largest region."""
        labels = probabilities.argmax(0).astype(np.uint8)
        return keep_largest_components(labels) if self.postprocess else labels


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


def image_id(image_path: Path) -> str:
    """The id an image's outputs are named by: its file's stem, never its folders; for a DICOM
    file its SOP Instance UID (`medseg.data.dicom.dicom_id`), as exports reuse file names."""
    if is_dicom(image_path):
        return dicom_id(Path(image_path))
    return Path(image_path.name).stem


def mask_name(image_path: Path) -> str:
    """``<id>_segmentation.png``: the ISIC name, ``<id>`` being `image_id`."""
    return f"{image_id(image_path)}_segmentation.png"


def output_names(
    image_path: Path, *, probabilities: bool, overlays: bool, multi_class: bool = False
) -> list[str]:
    """Every file predict writes for one image, the mask last (its presence means: done).

    Probabilities are ``<stem>_probability.png`` (0..255) for binary, ``<stem>_probabilities.npz``
    (every class) for a K-class model.
    """
    stem = image_id(image_path)
    probability = f"{stem}_probabilities.npz" if multi_class else f"{stem}_probability.png"
    extras = [probability] * probabilities + [f"{stem}_overlay.png"] * overlays
    return [*extras, mask_name(image_path)]


RECORD_NAME = ".medseg-predict.json"


def collect_inputs(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        folder = source / "images" if (source / "images").is_dir() else source
        images = list_images(folder)  # first: it names an unreadable folder
        dicom = list_dicom(folder)
        if dicom:
            require_pydicom()  # once, before any work, rather than once per file
        images = sorted([*images, *dicom])
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
    precision: str = "auto",
    progress: bool = True,
    compile: bool = False,
    threshold: float | None = None,
) -> PredictionReport:
    """Segment an image file or a folder of images into ``output/<id>_segmentation.png``.

    A binary model writes 0/255 masks (with ``probabilities``, ``<id>_probability.png``: the
    foreground probability × 255); a K-class model writes 8-bit label maps whose values are
    class indices (with ``probabilities``, ``<id>_probabilities.npz``: float16 "probabilities"
    (K, H, W) and the class names "labels"). ``overlays`` adds ``<id>_overlay.png``.
    Masks already in ``output`` are kept and skipped unless ``overwrite``: an interrupted run
    resumes where it stopped. Unreadable images are listed in the report; the others are written.
    ``threshold`` cuts the foreground probability (None: the checkpoint's; binary models only).
    ``tta`` "auto" is resolved per checkpoint (`resolve_tta`); the record holds the mode run.
    """
    check_threshold(threshold)
    output = Path(output)
    inputs = collect_inputs(source)
    _check_unique_names(inputs)
    check_writable(output)
    predictor = Predictor.from_checkpoint(
        checkpoint,
        device=device,
        precision=precision,
        tta=tta,
        postprocess=postprocess,
        compile=compile,
        threshold=threshold,
    )
    record = {
        "checkpoint_sha256": file_sha256(model_file(checkpoint)),
        "tta": predictor.tta,  # resolved: "auto" is recorded as the mode it ran
        "postprocess": postprocess,
        "threshold": predictor.threshold,  # resolved: the checkpoint's unless one was given
    }
    names = {
        path: output_names(
            path,
            probabilities=probabilities,
            overlays=overlays,
            multi_class=predictor.multi_class,
        )
        for path in inputs
    }
    report = PredictionReport()
    pending = _claim_output(output, names, record, overwrite=overwrite, report=report)
    bar = progress_bar(total=len(pending), desc="predicting", enabled=progress)
    channels = predictor.config.data.channels
    for paths, images in _readable_batches(pending, batch_size, report, channels=channels):
        for path, image, probability in zip(
            paths, images, predictor.probabilities(images), strict=True
        ):
            _write_outputs(output, path, image, probability, predictor, names[path])
            report.written.append(output / mask_name(path))
        bar.update(len(paths))
    bar.close()
    return report


def _claim_output(
    output: Path,
    names: dict[Path, list[str]],
    record: dict,
    *,
    overwrite: bool,
    report: PredictionReport,
) -> list[Path]:
    """Make ``output`` this run's: refuse or replace earlier results, record the settings,
    and return the inputs still to segment (those whose files are all there are skipped)."""
    if overwrite:  # replaced up front, so a resumed --overwrite run cannot keep an old mask
        for files in names.values():
            for name in files:
                (output / name).unlink(missing_ok=True)
    else:
        _check_earlier_results(output, record, [output / files[-1] for files in names.values()])
    remove_partial_files(output)  # left by a kill in the middle of a write
    write_text(output / RECORD_NAME, json.dumps(record, indent=2))
    pending = []
    for path, files in names.items():
        if all((output / name).exists() for name in files):
            report.skipped.append(output / mask_name(path))
        else:
            pending.append(path)
    return pending


def _write_outputs(
    output: Path,
    path: Path,
    image: np.ndarray,
    probability: np.ndarray,
    predictor: Predictor,
    files: list[str],
) -> None:
    """Every file of one image (`output_names`), the mask last: its presence means done."""
    mask = predictor.to_mask(probability)
    labels = predictor.labels if predictor.multi_class else None
    stem = image_id(path)
    if f"{stem}_probabilities.npz" in files:
        _save_npz(output / f"{stem}_probabilities.npz", probability, predictor.labels)
    if f"{stem}_probability.png" in files:
        _save_png(output / f"{stem}_probability.png", np.round(probability * 255).astype(np.uint8))
    if f"{stem}_overlay.png" in files:
        _save_png(output / f"{stem}_overlay.png", overlay(image, mask, labels))
    # A label map is saved as its class indices; a binary mask as 0/255.
    written = mask if predictor.multi_class else (mask * 255).astype(np.uint8)
    _save_png(output / mask_name(path), written)


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


def model_file(checkpoint: str | Path) -> Path:
    """The file holding the weights ``checkpoint`` names (see `Predictor.from_checkpoint`)."""
    if is_pretrained(checkpoint):
        return Path(checkpoint) / WEIGHTS_NAME
    onnx = onnx_paths(checkpoint)
    return onnx[0] if onnx is not None else resolve_checkpoint(checkpoint)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (checkpoints are hundreds of megabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _readable_batches(
    paths: list[Path], batch_size: int, report: PredictionReport, *, channels: int = 3
) -> Iterator[tuple[list[Path], list[np.ndarray]]]:
    batch_paths, batch_images = [], []
    for path in paths:
        try:
            image = read_image(path, channels=channels)
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


def _save_npz(path: Path, probabilities: np.ndarray, labels: list[str]) -> None:
    """(K, H, W) class probabilities as float16 (half the size, within 0.00025 of float32),
    with the class names, in a compressed ``.npz``."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        # A file handle, not a name: np.savez would add ".npz" to the temporary name.
        np.savez_compressed(
            handle, probabilities=probabilities.astype(np.float16), labels=np.array(labels)
        )
