"""The model card (README.md) shipped with an exported model, written from what the run recorded.

Every number in it is read from a file (the checkpoint, the run folder's metrics.csv and
config, an ``evaluation-*/summary.json`` beside it); what was not recorded is said to be
unknown rather than guessed.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.config import Config
from medseg.core.errors import MedsegError
from medseg.core.version import __version__
from medseg.data.folder import find_split, list_images
from medseg.data.transforms import normalisation
from medseg.engine.run_folder import RunFolder
from medseg.engine.sliding_window import inference_tile
from medseg.model.deeplab import model_arguments


@dataclass
class Provenance:
    """Where an exported model came from: what the card reports beyond the config."""

    source: str = ""  # the checkpoint's path, as given
    sha256: str = ""  # of the checkpoint file
    epoch: int | None = None  # the checkpoint's epoch
    hardware: str = ""  # as the checkpoint records it, if it does
    data_root: str = ""  # run.json's data root
    train_images: int | None = None  # images in data_root/train/images at export time
    best_epoch: int | None = None  # metrics.csv's row with the best validation Dice
    best_val_dice: float | None = None
    epochs_run: int | None = None  # rows in metrics.csv
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # summary.json contents

    @classmethod
    def of_checkpoint(
        cls, path: Path, state: dict[str, Any], *, given: str, sha256: str
    ) -> Provenance:
        """What the checkpoint ``state`` (read from ``path``) and its run folder, if any, record."""
        hardware = state.get("hardware", "")
        provenance = cls(
            source=given,
            sha256=sha256,
            epoch=state.get("epoch") if isinstance(state.get("epoch"), int) else None,
            hardware=hardware if isinstance(hardware, str) else json.dumps(hardware),
        )
        run = RunFolder.of_checkpoint(path)
        if run.metrics.is_file() or run.record.is_file():
            provenance._read_run(run)
        return provenance

    def _read_run(self, run: RunFolder) -> None:
        try:
            self.data_root = run.data_root()
            train = find_split(self.data_root, "train")
            self.train_images = len(list_images(train / "images")) if train else None
        except MedsegError:  # no run.json, or the data has moved since: left unknown
            pass
        rows = _metric_rows(run)
        if rows:
            best = max(rows, key=lambda row: row["val_dice"])
            self.best_epoch, self.best_val_dice = int(best["epoch"]), best["val_dice"]
            self.epochs_run = len(rows)
        self.evaluations = _evaluations(run)

    @classmethod
    def of_ensemble(
        cls, members: list[EnsembleMember], *, given: str, run: RunFolder | None
    ) -> Provenance:
        """An ensemble's: the data and hardware its first member records, the evaluations of
        ``run`` (a k-fold run's folder, where the ensemble's own are written)."""
        first = members[0].provenance
        return cls(
            source=given,
            hardware=first.hardware,
            data_root=first.data_root,
            train_images=first.train_images,
            evaluations=_evaluations(run) if run is not None else [],
        )


@dataclass
class EnsembleMember:
    """One model of an exported ensemble, as its card lists it."""

    name: str  # "fold 0", or "member 1" for a model that is no fold
    folder: str  # its folder in the export (fold_0/), or "" for one graph
    share: float  # its weight in the average
    provenance: Provenance


def _evaluations(run: RunFolder) -> list[dict[str, Any]]:
    """The summary.json of each evaluation-*/ folder in the run (those holding a Dice)."""
    evaluations = []
    for summary in sorted(run.path.glob("evaluation-*/summary.json")):
        try:
            values = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(values, dict) and "dice" in values:
            evaluations.append({"folder": summary.parent.name, **values})
    return evaluations


def _metric_rows(run: RunFolder) -> list[dict[str, float]]:
    """metrics.csv's rows with a finite epoch and validation Dice (others are skipped)."""
    try:
        rows = run.metric_rows()
    except MedsegError:  # none, or unreadable: the card says it was not recorded
        return []
    numbers = []
    for row in rows:
        try:
            epoch, dice = float(row["epoch"]), float(row["val_dice"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(epoch) and math.isfinite(dice):
            numbers.append({"epoch": epoch, "val_dice": dice})
    return numbers


def model_card(
    config: Config,
    provenance: Provenance | None,
    *,
    files: str,
    tta: str,
    usage: str,
    ensemble: list[EnsembleMember] | None = None,
) -> str:
    """README.md for an exported model; ``files`` and ``usage`` describe its format. For an
    ``ensemble``, the card names its members (each fold) and what each recorded."""
    labels = list(config.data.labels)
    binary = config.model.num_classes == 1
    task = "binary masks" if binary else f"{len(labels)} classes ({', '.join(labels)})"
    provenance = provenance or Provenance()
    lines = [
        f"# DeepLabv3+ ({config.model.backbone}) for {task}",
        "",
        "Exported by medseg "
        f"{__version__} on {datetime.datetime.now(datetime.timezone.utc).date().isoformat()}"
        + (f" from `{provenance.source}`" if provenance.source else "")
        + (f" (SHA-256 `{provenance.sha256}`)" if provenance.sha256 else "")
        + ".",
        "",
        "## Intended use and limits",
        "",
        "- For research only. This is not a medical device: it must not be used to diagnose, "
        "treat or decide on the care of anyone.",
        f"- It was trained on {_training_data(provenance)}. Images from other scanners, sites, "
        "populations or protocols can be segmented much worse: check it on your own labelled "
        "images (`medseg evaluate`) before relying on it.",
        "",
        "## Model",
        "",
        *_model_lines(config),
        f"- Classes: {_classes(labels, binary)}.",
        f"- Recommended test-time augmentation: {tta} (what `--tta auto` runs).",
        f"- Files: {files}.",
        *(_ensemble_lines(ensemble) if ensemble else []),
        "",
        "## Training",
        "",
        f"- Recipe: {_recipe(config)}.",
        f"- Data: {_training_data(provenance)}.",
        f"- Validation: {_ensemble_validation(ensemble) if ensemble else _validation(provenance)}.",
        f"- Hardware: {provenance.hardware or 'not recorded in the checkpoint'}.",
        *_evaluation_lines(provenance.evaluations),
        "",
        "## Use",
        "",
        usage.strip(),
        "",
    ]
    return "\n".join(lines)


def _ensemble_lines(members: list[EnsembleMember]) -> list[str]:
    """The Model section's ensemble lines: how the members are averaged, then one per member."""
    folds = [member.name for member in members if member.name.startswith("fold ")]
    named = f"folds {', '.join(name.split()[1] for name in folds)}" if folds else "models"
    lines = [
        f"- Ensemble of {len(members)} {'folds' if folds else 'models'} ({named}): the "
        "share-weighted mean of their probabilities (sigmoid or softmax), each after its own "
        "test-time augmentation, cut or arg-maxed once averaged."
    ]
    for member in members:
        provenance = member.provenance
        where = f" in `{member.folder}/`" if member.folder else ""
        digest = f", SHA-256 `{provenance.sha256}`" if provenance.sha256 else ""
        lines.append(
            f"  - {member.name}{where}, share {member.share:.4g}: from `{provenance.source}`"
            f"{digest}; validation {_validation(provenance)}."
        )
    return lines


def _ensemble_validation(members: list[EnsembleMember]) -> str:
    dice = [m.provenance.best_val_dice for m in members if m.provenance.best_val_dice is not None]
    if not dice:
        return "each member on its own validation images, not recorded (see Model)"
    mean = sum(dice) / len(dice)
    spread = (sum((value - mean) ** 2 for value in dice) / max(1, len(dice) - 1)) ** 0.5
    return (
        f"each member on its own validation images (its fold's, for folds): best Dice "
        f"{mean:.4f} ± {spread:.4f} (mean ± standard deviation over {len(dice)} members; "
        f"each listed under Model)"
    )


def _model_lines(config: Config) -> list[str]:
    """The network and what it takes: the card's Model section up to its classes."""
    data, model = config.data, config.model
    mean, std = normalisation(data.channels)
    return [
        f"- DeepLabv3+, backbone {model.backbone} ({model.variant} variant), output stride "
        f"{model.output_stride}, {'separable' if model.separable else 'plain'} 3×3 "
        f"convolutions in the ASPP and decoder, {_pooling(model)}, logits at stride "
        f"{model_arguments(model)['decoder_stride']}.",
        f"- Input: {'RGB' if data.channels == 3 else 'grayscale'} images (uint8), "
        + _input_size(data)
        + _colour(data)
        + f", scaled to 0..1 and normalised with mean {_numbers(mean)} and std {_numbers(std)} "
        "per channel.",
        _output_line(config),
    ]


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def _pooling(model) -> str:
    window = model_arguments(model)["pooling_window"]
    return f"image pooling over {window}×{window} windows" if window else "global image pooling"


def _colour(data) -> str:
    steps = []
    if data.colour_constancy != "none":
        steps.append(f"colour-corrected ({data.colour_constancy})")
    if data.contrast != "none":
        steps.append(f"contrast-equalised ({data.contrast})")
    if not steps:
        return ""
    return f", {' then '.join(steps)} on the whole image at that scale"


def _input_size(data) -> str:
    if not data.image_size:
        return "resized to a size not recorded (saved without the run's config)"
    side = f"{data.image_size}×{data.image_size}"
    if data.mode == "patch":
        tile = inference_tile(data.image_size)
        return (
            f"at their own size, in Gaussian-weighted overlapping tiles of {tile}×{tile} "
            f"(trained on {side} patches)"
        )
    return f"resized to {side}"


def _output_line(config: Config) -> str:
    if config.model.num_classes == 1:
        return (
            "- Output: one logit per pixel; the mask is sigmoid(logit) > "
            f"{config.train.threshold} (the foreground)."
        )
    return (
        f"- Output: {config.model.num_classes} logits per pixel; the label map is their "
        "arg-max (softmax probabilities, taken at the image's own size)."
    )


def _classes(labels: list[str], binary: bool) -> str:
    if binary:
        names = labels or ["background", "foreground"]
        return f"0 {names[0]}, 1 {names[1]} (saved as 0 and 255)"
    return ", ".join(f"{index} {name}" for index, name in enumerate(labels))


def _recipe(config: Config) -> str:
    model, train = config.model, config.train
    if model.pretrained is True:
        start = "from ImageNet weights"
    elif model.pretrained is False:
        start = "from scratch"
    else:
        start = f"from the weights in {model.pretrained}"
    return (
        f"{train.epochs} epoch{'s' * (train.epochs != 1)} {start}, batch {train.batch_size}, "
        f"{train.optimizer} at learning rate {train.lr:g} ({train.schedule} schedule, "
        f"{train.warmup_epochs:g} warm-up epochs), weight decay {train.weight_decay:g}, loss "
        f"{train.loss}, augmentation {config.data.augment}, precision {train.precision}, "
        f"seed {train.seed}"
    )


def _training_data(provenance: Provenance) -> str:
    if not provenance.data_root:
        return "data not recorded with this checkpoint (no run folder with run.json beside it)"
    count = (
        f", {provenance.train_images} images in its train/images at export time"
        if provenance.train_images is not None
        else ""
    )
    return f"`{provenance.data_root}`{count}"


def _validation(provenance: Provenance) -> str:
    if provenance.best_val_dice is None:
        checkpoint = f", which is of epoch {provenance.epoch}" if provenance.epoch else ""
        return f"not recorded (no metrics.csv beside the checkpoint{checkpoint})"
    return (
        f"best Dice {provenance.best_val_dice:.4f} at epoch {provenance.best_epoch} of "
        f"{provenance.epochs_run} (metrics.csv)"
        + (f"; this checkpoint is epoch {provenance.epoch}" if provenance.epoch else "")
    )


def _evaluation_lines(evaluations: list[dict[str, Any]]) -> list[str]:
    if not evaluations:
        return ["- Test: no evaluation-*/summary.json beside the run."]
    lines = []
    for summary in evaluations:
        scores = f"mean Dice {summary['dice']:.4f}"
        for key, name in (("iou", "IoU"), ("hd95", "HD95 (pixels)")):
            if isinstance(summary.get(key), int | float):
                scores += f", {name} {summary[key]:.4g}"
        per_class = summary.get("per_class")
        if isinstance(per_class, dict):
            scores += "; per class: " + ", ".join(
                f"{name} {values.get('dice', float('nan')):.4f}"
                for name, values in per_class.items()
                if isinstance(values, dict)
            )
        lines.append(
            f"- Test ({summary['folder']}, {summary.get('images', '?')} images of "
            f"`{summary.get('data', '?')}`, TTA {summary.get('tta', '?')}): {scores}."
        )
    return lines
