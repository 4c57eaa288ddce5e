"""The one model a server holds, and what it does with an upload: read it, segment it, describe it.

Every request shares one `Predictor` (one network in memory, never copied) under one lock, so
requests wait their turn and each gets its own answer. An upload is written only into the
server's temporary folder and read by medseg's own readers (`medseg.data.io.read_image`:
PNG, JPEG, TIFF, 16-bit, DICOM, .npy), as `medseg predict` reads a file. The network runs once
per upload and TTA mode; the threshold and post-processing are applied to the probabilities
kept from that run, so moving a slider costs no forward pass.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config.choices import DEFAULT_TTA
from medseg.core.errors import MedsegError
from medseg.core.version import __version__
from medseg.data.dicom import is_dicom, require_pydicom
from medseg.data.io import MAX_PIXELS, image_size, read_image
from medseg.formats.source import resolve_source
from medseg.prediction.outputs import (
    mask_pixels,
    npz_bytes,
    output_names,
    png_bytes,
    probability_pixels,
)
from medseg.prediction.predictor import Predictor, check_threshold, resolve_tta

MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # a 120-megapixel 16-bit TIFF or DICOM is 240 MB
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Refused(MedsegError):
    """An upload or option the server will not segment, with the HTTP status that says why."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Segmentation:
    """One upload as the network saw it: the image read, its probabilities, how they were made."""

    name: str  # the upload's file name
    mask_name: str  # what predict names its mask: <id>_segmentation.png (`output_names`)
    probability_name: str  # <id>_probability.png, or <id>_probabilities.npz for K classes
    image: np.ndarray  # uint8 (H, W, C), as read_image returns it for the model's channels
    probability: np.ndarray  # float32 (H, W) foreground, or (K, H, W) per class
    tta: str  # the TTA mode that ran ("auto" resolved)
    spacing: tuple[float, float] | None = None  # mm per pixel (row, column): DICOM PixelSpacing


class ServedModel:
    """A trained model loaded once (`Predictor.from_checkpoint`: any kind of ``--checkpoint``)
    and shared by every request of a server under one lock."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        max_pixels: int = MAX_PIXELS,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ):
        self.checkpoint = str(checkpoint)
        self.source = resolve_source(checkpoint)
        self.predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision)
        self.max_pixels = min(max_pixels, MAX_PIXELS)
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()

    @property
    def multi_class(self) -> bool:
        return self.predictor.multi_class

    @property
    def class_names(self) -> list[str]:
        """Names by label value, background first: the data's, or "background", "foreground"."""
        return self.predictor.labels or ["background", "foreground"]

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers: the model, its input and the server's defaults."""
        config = self.predictor.config
        return {
            "medseg_version": __version__,
            "checkpoint": self.checkpoint,
            "kind": self.source.kind,
            "classes": self.class_names,
            "num_classes": config.model.num_classes,
            "output": "label map (class indices)" if self.multi_class else "binary mask (0/255)",
            "channels": config.data.channels,
            "image_size": config.data.image_size,
            "mode": config.data.mode,  # "patch": whole images by sliding window
            "backbone": config.model.backbone,
            "threshold": self.predictor.threshold,
            "tta": self.predictor.tta,  # what tta=auto runs for this model
            "device": str(self.predictor.device),
            "precision": self.predictor.precision.name,
            "max_pixels": self.max_pixels,
            "max_upload_bytes": self.max_upload_bytes,
        }

    def check_options(self, *, tta: str = DEFAULT_TTA, threshold: float | None = None) -> None:
        """Refuse (400) a TTA mode or a threshold this model cannot take."""
        try:
            resolve_tta(tta, self.predictor.config)
            check_threshold(threshold)
        except MedsegError as error:
            raise Refused(str(error).replace("--threshold", "threshold"), 400) from None
        if threshold is not None and self.multi_class:
            raise Refused(
                f"threshold applies to binary models; this one predicts "
                f"{len(self.class_names)} classes by arg-max, so leave threshold out",
                400,
            )

    def predictor_for(
        self, *, tta: str = DEFAULT_TTA, threshold: float | None = None, postprocess: bool = False
    ) -> Predictor:
        """The shared predictor with a request's options (`check_options`): the same network,
        never a copy. Call it holding ``self.lock``: it touches the network's placement."""
        self.check_options(tta=tta, threshold=threshold)
        if threshold is None:
            threshold = self.predictor.threshold  # the checkpoint's (None for K classes)
        return dataclasses.replace(
            self.predictor, tta=tta, threshold=threshold, postprocess=postprocess
        )

    def read(self, path: Path) -> np.ndarray:
        """An upload read as `medseg predict` reads a file, within the server's pixel limit
        (413 past it, checked from the header before decoding where the format allows)."""
        if not is_dicom(path):
            try:
                self._check_pixels(path.name, *image_size(path))
            except Refused:
                raise
            except MedsegError:
                pass  # not an image PIL opens: read_image says why, below
        image = read_image(path, channels=self.predictor.config.data.channels)
        self._check_pixels(path.name, *image.shape[:2])
        return image

    def _check_pixels(self, name: str, height: int, width: int) -> None:
        if height * width > self.max_pixels:
            raise Refused(
                f"{name} is {width}×{height} = {height * width:,} pixels, more than this server "
                f"takes ({self.max_pixels:,}); downscale it first",
                413,
            )

    def segment(self, path: Path, *, tta: str = DEFAULT_TTA) -> Segmentation:
        """Read the upload ``path`` and run the network on it (one request at a time)."""
        with self.lock:
            predictor = self.predictor_for(tta=tta)
            image = self.read(path)
            probability = predictor.probabilities([image])[0]
        # Named while the file exists: a DICOM file's id is its SOP Instance UID.
        probability_name, mask_name = output_names(
            path, probabilities=True, overlays=False, multi_class=self.multi_class
        )
        spacing = pixel_spacing(path) if is_dicom(path) else None
        return Segmentation(
            path.name, mask_name, probability_name, image, probability, predictor.tta, spacing
        )

    def mask(
        self, segmentation: Segmentation, *, threshold: float | None = None, postprocess=False
    ) -> np.ndarray:
        """The mask of ``segmentation``'s probabilities: bool (H, W), or a uint8 label map."""
        with self.lock:  # the view touches the shared network's placement
            predictor = self.predictor_for(
                tta=segmentation.tta, threshold=threshold, postprocess=postprocess
            )
        return predictor.to_mask(segmentation.probability)

    def mask_png(self, mask: np.ndarray) -> bytes:
        """The mask PNG exactly as `medseg predict` writes it (`mask_pixels`, `png_bytes`)."""
        return png_bytes(mask_pixels(mask, multi_class=self.multi_class))

    def probability_file(self, segmentation: Segmentation) -> bytes:
        """The probabilities as ``predict --probabilities`` writes them (``probability_name``):
        a PNG (× 255) of the foreground for a binary model, an .npz of every class for K."""
        if self.multi_class:
            return npz_bytes(segmentation.probability, self.predictor.labels)
        return png_bytes(probability_pixels(segmentation.probability))

    def areas(self, segmentation: Segmentation, mask: np.ndarray) -> list[dict[str, Any]]:
        """Each foreground class's area: pixels, and mm² where the file gives a pixel spacing."""
        label_map = mask.astype(np.uint8)
        counts = np.bincount(label_map.ravel(), minlength=len(self.class_names))
        pixel_area = float(np.prod(segmentation.spacing)) if segmentation.spacing else None
        return [
            {
                "class": name,
                "value": value,
                "pixels": int(counts[value]),
                "mm2": None if pixel_area is None else float(counts[value]) * pixel_area,
            }
            for value, name in enumerate(self.class_names)
            if value > 0
        ]


def pixel_spacing(path: Path) -> tuple[float, float] | None:
    """(row, column) spacing in mm from a DICOM file's PixelSpacing (its header only); None
    where it has none, or not two positive numbers: areas are then given in pixels only."""
    pydicom = require_pydicom()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PixelSpacing"])
        spacing = [float(value) for value in header.get("PixelSpacing", None) or []]
    except Exception:  # a malformed header: the pixels were read, the areas stay in pixels
        return None
    if len(spacing) != 2 or not all(0 < value < float("inf") for value in spacing):
        return None
    return spacing[0], spacing[1]


def upload_name(filename: str | None) -> str:
    """A safe file name for an upload in the server's temporary folder, keeping its extension
    (which says how it is read); "upload" where the client sent none."""
    name = _UNSAFE.sub("_", Path(filename or "").name).strip("._")
    return name[-120:] or "upload"
