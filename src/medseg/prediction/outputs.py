"""The files `medseg predict` writes for each image, and the output folder's bookkeeping.

Outputs are named by the image's id (`image_id`), written atomically, the mask last (its
presence means the image is done), so an interrupted folder resumes. A record of the model and
settings (``.medseg-predict.json``) makes sure that a resumed run only keeps masks made the
same way; other earlier results are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medseg.core.errors import MedsegError
from medseg.core.files import remove_partial_files, write_bytes, write_text
from medseg.data.dicom import dicom_uid, is_dicom, list_dicom, require_pydicom
from medseg.data.folder import list_images
from medseg.data.io import read_image
from medseg.drawing import overlay
from medseg.formats.source import ModelSource
from medseg.prediction.predictor import Predictor


@dataclass
class PredictionReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already present from an earlier run
    failed: list[str] = field(default_factory=list)  # "file: reason"


def image_id(image_path: Path) -> str:
    """The id an image's outputs are named by, the image alone (`output_ids` keeps the ids of a
    folder apart): its file's stem, never its folders; for a DICOM file its SOP Instance UID
    (`medseg.data.dicom.dicom_uid`), as exports reuse file names, or where it has no valid
    one its file's stem made `readable`. An id over `ID_BYTES` is cut, with a hash of the
    whole, so that every name predict writes fits a file system's 255 bytes."""
    path = Path(image_path)
    if is_dicom(path):
        return dicom_uid(path) or shortened(readable(Path(path.name).stem))
    return shortened(Path(path.name).stem)


# Room in a name's 255 bytes for the longest suffix ("_probabilities.npz") and for
# atomic_path's temporary name (".<name>.<8 hex>.tmp.npz").
ID_BYTES = 150


def readable(text: str) -> str:
    """``text`` as a name that is neither hidden nor odd: control characters and slashes
    become "_", leading dots and spaces go; "unnamed" when nothing is left."""
    return re.sub(r"[\x00-\x1f\x7f/\\]+", "_", text).lstrip(". ") or "unnamed"


def shortened(name: str) -> str:
    """``name`` itself up to `ID_BYTES` bytes (UTF-8), else its start and 8 hex digits of its
    SHA-256 (longer names stay apart)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= ID_BYTES:
        return name
    start = encoded[: ID_BYTES - 9].decode("utf-8", "ignore")
    return f"{start}-{hashlib.sha256(encoded).hexdigest()[:8]}"


def output_ids(paths: list[Path]) -> dict[Path, str]:
    """`image_id` of each input, kept unique, so that no folder is refused for its names.

    Inputs that would share an id (two DICOM files with one SOP Instance UID, ``a.png`` beside
    ``a.jpg``) are each named ``<id>_<file name>``: apart, and traceable to their file (the
    record names every output's source, `claim_output`). Ids are compared regardless of case,
    as a case-insensitive disk would; a clash left after that (a file already named so) gets
    "_2", "_3"... in the order of ``paths``.
    """
    ids = {path: image_id(path) for path in paths}
    counts = Counter(value.casefold() for value in ids.values())
    for path, value in ids.items():
        if counts[value.casefold()] > 1:
            ids[path] = shortened(f"{value}_{readable(path.name)}")
    taken: set[str] = set()
    for path, value in ids.items():
        unique, number = value, 1
        while unique.casefold() in taken:
            number += 1
            unique = f"{value}_{number}"
        taken.add(unique.casefold())
        ids[path] = unique
    return ids


def mask_name(image_path: Path) -> str:
    """``<id>_segmentation.png``: the ISIC name, ``<id>`` being `image_id`."""
    return f"{image_id(image_path)}_segmentation.png"


def output_names(
    image_path: Path,
    *,
    probabilities: bool,
    overlays: bool,
    multi_class: bool = False,
    stem: str | None = None,
) -> list[str]:
    """Every file predict writes for one image, the mask last (its presence means: done).

    Probabilities are ``<stem>_probability.png`` (0..255) for binary, ``<stem>_probabilities.npz``
    (every class) for a K-class model. ``stem`` is the image's id in its folder (`output_ids`);
    None: `image_id`.
    """
    stem = image_id(image_path) if stem is None else stem
    probability = f"{stem}_probabilities.npz" if multi_class else f"{stem}_probability.png"
    extras = [probability] * probabilities + [f"{stem}_overlay.png"] * overlays
    return [*extras, f"{stem}_segmentation.png"]


RECORD_NAME = ".medseg-predict.json"
# How every name `output_names` gives ends (a test holds the two together).
OUTPUT_SUFFIXES = ("_segmentation.png", "_probability.png", "_probabilities.npz", "_overlay.png")


def collect_inputs(source: str | Path) -> list[Path]:
    """The images to segment: ``source`` itself if a file, else the images and DICOM files in
    the folder (in its images/ subfolder where it has one), sorted.

    A folder that predict has written into (it holds ``.medseg-predict.json``: ``--out`` was
    ``--input``) also holds predict's own outputs, named ``<id>_segmentation.png`` and so on
    (`OUTPUT_SUFFIXES`): those are never inputs, so a second run does not segment its own
    masks. Elsewhere a file named so is an image like any other.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise MedsegError(f"input not found: {source}")
    folder = source / "images" if (source / "images").is_dir() else source
    images = list_images(folder)  # first: it names an unreadable folder
    dicom = list_dicom(folder)
    if dicom:
        require_pydicom()  # once, before any work, rather than once per file
    images = sorted([*images, *dicom])
    if (folder / RECORD_NAME).is_file():
        outputs = [path for path in images if path.name.endswith(OUTPUT_SUFFIXES)]
        images = [path for path in images if not path.name.endswith(OUTPUT_SUFFIXES)]
        if outputs and not images:
            raise MedsegError(
                f"{folder} holds only medseg predict's own outputs ({len(outputs)} files such "
                f"as {outputs[0].name}, see {RECORD_NAME}); pass the folder of the images"
            )
    if not images:
        raise MedsegError(f"no images found in {folder}")
    return images


def claim_output(
    output: Path,
    names: dict[Path, list[str]],
    record: dict,
    *,
    overwrite: bool,
    report: PredictionReport,
    sources: dict[str, str | list[str]] | None = None,
) -> list[Path]:
    """Make ``output`` this run's: refuse or replace earlier results, record the settings,
    and return the inputs still to segment (those whose files are all there are skipped).

    The record also names the source of every output (`SOURCES`: mask or volume name -> the
    input file, or ``sources`` where given, as a volume's channel files); outputs an earlier
    run left there keep theirs.
    """
    if overwrite:  # replaced up front, so a resumed --overwrite run cannot keep an old mask
        for files in names.values():
            for name in files:
                (output / name).unlink(missing_ok=True)
    else:
        check_earlier_results(output, record, [output / files[-1] for files in names.values()])
    remove_partial_files(output)  # left by a kill in the middle of a write
    if sources is None:
        sources = {files[-1]: str(path.absolute()) for path, files in names.items()}
    sources = {**earlier_sources(output), **sources}
    write_text(output / RECORD_NAME, json.dumps({**record, SOURCES: sources}, indent=2))
    pending = []
    for path, files in names.items():
        if all((output / name).exists() for name in files):
            report.skipped.append(output / files[-1])
        else:
            pending.append(path)
    return pending


SOURCES = "sources"  # the record's key naming each output's input file; not a setting


def earlier_sources(output: Path) -> dict[str, str | list[str]]:
    """The sources an earlier record of ``output`` names, for the outputs still there."""
    try:
        previous = json.loads((output / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    sources = previous.get(SOURCES) if isinstance(previous, dict) else None
    if not isinstance(sources, dict):
        return {}
    return {
        name: source
        for name, source in sources.items()
        if isinstance(name, str) and Path(name).name == name and (output / name).is_file()
    }


def write_outputs(
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
    stem = files[-1].removesuffix("_segmentation.png")
    if f"{stem}_probabilities.npz" in files:
        save_npz(output / f"{stem}_probabilities.npz", probability, predictor.labels)
    if f"{stem}_probability.png" in files:
        save_png(output / f"{stem}_probability.png", probability_pixels(probability))
    if f"{stem}_overlay.png" in files:
        save_png(output / f"{stem}_overlay.png", overlay(image, mask, labels))
    save_png(output / files[-1], mask_pixels(mask, multi_class=predictor.multi_class))


def mask_pixels(mask: np.ndarray, *, multi_class: bool) -> np.ndarray:
    """The uint8 (H, W) a mask file holds: a label map's class indices, a binary mask as 0/255
    (made as uint8 directly: ``mask * 255`` would be int64, 648 MB for a 9000² image)."""
    return mask if multi_class else np.where(mask, np.uint8(255), np.uint8(0))


def probability_pixels(probability: np.ndarray) -> np.ndarray:
    """A binary model's foreground probability (H, W) as the uint8 of its PNG: × 255, rounded,
    a band of rows at a time (no float copy of the whole map)."""
    pixels = np.empty(probability.shape, np.uint8)
    band = max(1, (1 << 20) // max(1, probability.shape[-1]))
    for top in range(0, len(probability), band):
        pixels[top : top + band] = np.round(probability[top : top + band] * 255)
    return pixels


def check_earlier_results(output: Path, record: dict, masks: list[Path]) -> None:
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


def prediction_record(source: ModelSource, predictor: Predictor) -> dict:
    """What makes an output folder's masks what they are: the model file's SHA-256, and the
    settings as resolved ("auto" TTA as the mode that ran, the checkpoint's threshold unless one
    was given). An ensemble's record lists every member's SHA-256, in the order averaged, with
    its share and each member's TTA mode. A resumed run keeps earlier masks only under the same
    record."""
    if not source.is_ensemble:
        return {
            "checkpoint_sha256": file_sha256(source.weights),
            "tta": predictor.tta,
            "postprocess": predictor.postprocess,
            "threshold": predictor.threshold,
        }
    leaves = source.leaves()
    return {
        "checkpoint_sha256": [file_sha256(leaf.weights) for leaf, _ in leaves],
        "ensemble_shares": [share for _, share in leaves],
        "folds": list(source.folds) or None,
        "tta": predictor.tta,
        "member_tta": predictor.tta_modes,
        "postprocess": predictor.postprocess,
        "threshold": predictor.threshold,
    }


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (checkpoints are hundreds of megabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def readable_batches(
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


def save_png(path: Path, array: np.ndarray) -> None:
    write_bytes(path, png_bytes(array))


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array as the bytes of the PNG file predict writes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_npz(path: Path, probabilities: np.ndarray, labels: list[str]) -> None:
    write_bytes(path, npz_bytes(probabilities, labels))


def npz_bytes(probabilities: np.ndarray, labels: list[str], **arrays: np.ndarray) -> bytes:
    """(K, H, W) class probabilities as float16 (half the size, within 0.00025 of float32),
    with the class names (and any other ``arrays``), as the bytes of a compressed ``.npz``."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, probabilities=probabilities.astype(np.float16), labels=np.array(labels), **arrays
    )
    return buffer.getvalue()
