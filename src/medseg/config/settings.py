"""Typed run configuration: data, model and training settings, presets, YAML in and out, and
the rules for configs that older runs saved.

A run's settings resolve in this order, later winning: the dataclass defaults (the ``default``
recipe), a named preset (``--preset seed`` reproduces the specification), a YAML file
(``--config``), then command-line overrides. The resolved config is written beside every run
and travels inside every checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medseg.config.choices import (
    DEVICE_FORMS,
    MULTI_CLASS_LOSSES,
    PER_IMAGE_LOSSES,
    setting_choices,
)
from medseg.core.errors import MedsegError
from medseg.core.files import write_text


@dataclass
class DataConfig:
    # "resize": images and masks are resized to image_size × image_size and predictions scaled
    # back to each image's own size. "patch": the network trains on image_size × image_size
    # patches cut from the images at their own resolution and predicts by sliding window, for
    # structures a resize would erase (vessels). "auto": planned from the data.
    mode: str = "auto"
    # The network's input side: the resized square, or the patch. 0: planned from the data when
    # training starts (medseg.data.plan): 160 for binary masks, the default recipe's size (see
    # README Recipes), or the smallest size at which every class survives the round trip to it
    # and back; patches when no size below the images' own keeps them.
    image_size: int = 0
    # Patch mode: the share of patches centred on a foreground pixel (of a class drawn at
    # random), as nnU-Net oversamples foreground; the others are drawn uniformly.
    foreground_fraction: float = 0.33
    mask_suffix: str = "_segmentation"  # masks/<id><mask_suffix>.png pairs with images/<id>.jpg
    val_fraction: float = 0.1  # share of train/ held out for validation when there is no val/
    # "default" (dermoscopy: flips, turns, colour), "anatomy" (no flips: anatomy has a left
    # and a right), "seed" (the specification's), "thin" (no zoom or blur, with colour: vessels),
    # "none"; "auto": planned from the data.
    augment: str = "auto"
    num_workers: int = 0  # DataLoader processes; 0 loads in the training process
    # Where training batches are augmented: "loader" (Albumentations in the DataLoader),
    # "device" (on the GPU, from the uploaded cache), "auto" (device on CUDA, else loader).
    augment_on: str = "auto"
    # "shades-of-gray": each image's colour cast removed before the network sees it, in
    # training and prediction alike (medseg.data.transforms.colour_constancy). Off by default:
    # see docs/results.md for what it measured.
    colour_constancy: str = "none"
    # "clahe": each image's local contrast equalised after any colour correction, in training
    # and prediction alike (medseg.data.transforms.local_contrast). Off by default: see
    # docs/results.md for what it measured.
    contrast: str = "none"
    skip_bad: bool = False  # leave out unreadable images (listed) instead of stopping
    # Class names by label value, from the data root's dataset.json; empty: binary masks read
    # by the half-range rule (medseg.data.io). Planned from the data.
    labels: list[str] = field(default_factory=list)
    channels: int = 3  # image channels: 3 (RGB) or 1 (grayscale); planned from the data


@dataclass
class ModelConfig:
    # resnet18, resnet34, resnet50, resnet101; efficientnet-lite0, -lite1, -lite2 (medseg[lite])
    backbone: str = "resnet50"
    variant: str = "seed"  # "seed": layers 1-3 as specified; "paper": Chen et al. 2018
    output_stride: int = 16  # 16, or 8 for the paper variant
    pretrained: bool | str = True  # ImageNet weights from torchvision, or a local .pth path
    aspp_dropout: float = 0.1  # dropout after the ASPP projection
    # Atrous separable 3×3 convolutions in the ASPP and decoder, as in Chen et al. 2018: less
    # than half the multiply-adds of the whole network. False: plain 3×3 (the seed's network).
    separable: bool = True
    # The ASPP's atrous rates; empty: the paper's for the output stride (6, 12, 18 at 16).
    aspp_rates: list[int] = field(default_factory=list)
    # Where the decoder's logits are: 4, the paper's; 2, one more stage joining the stem's
    # features, for structures a few pixels wide. 0: planned from the data (2 for patches).
    decoder_stride: int = 0
    # The image pooling's window, in pixels: the ASPP's global branch averages windows of this
    # side on larger inputs. 0: planned from the data (the patch for patch training); the
    # whole input otherwise, as in the paper.
    pooling_window: int = 0
    # Set from the data (data.labels, data.channels): 1 output for binary masks (sigmoid),
    # K for K classes (softmax); the input channels are the images'.
    num_classes: int = 1
    in_channels: int = 3


@dataclass
class TrainConfig:
    # 0: planned from the data when training starts (medseg.data.plan): 50 epochs, or more on a
    # small data set, so that a run makes at least a few hundred optimizer steps.
    epochs: int = 0
    batch_size: int = 16
    optimizer: str = "adamw"  # "adam" or "adamw"
    lr: float = 1e-3  # peak learning rate
    # The backbone's learning rate as a share of lr: below 1 changes pretrained features more
    # slowly than the new ASPP and decoder (the usual fine-tuning split). 1: one rate for all.
    backbone_lr_factor: float = 1.0
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "constant", "cosine" or "poly" (each after the warm-up)
    warmup_epochs: float = 1.0  # linear warm-up from lr/100, in epochs (fractions allowed)
    loss: str = "dice_bce"  # dice_bce, dice, iou, focal, dice_focal
    # Dice averaged over images rather than pooled over the batch: a small lesion then counts
    # as much as a large one, as in the per-image mean Dice that evaluation reports.
    loss_per_image: bool = False  # for dice_bce, dice, dice_focal
    precision: str = "auto"  # "auto" (bf16/fp16 where fast), "bf16", "fp16", "fp32"
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPUs and GPUs
    freeze_backbone_epochs: int = 0  # epochs with a frozen backbone first (transfer warm-up)
    patience: int = 0  # early stopping: epochs without a better val Dice; 0 turns it off
    threshold: float = 0.5  # probability above which a pixel is foreground
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms, for bit-identical reruns
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off
    device: str = "auto"  # "auto", "cpu", "mps", "cuda", "cuda:1", ...
    compile: bool = False  # torch.compile the training network (slower on CPUs: README Performance)
    sync_bn: bool = False  # SyncBatchNorm across ranks (torchrun on GPUs); small per-GPU batches
    # An exponential moving average of the weights (timm's convention), validated each epoch
    # beside them; the better is kept as best.pt (medseg.engine.ema). Off until measured.
    ema: bool = False
    ema_decay: float = 0.999  # the average's decay per optimizer step (warmed up at the start)
    # Wall-time limit of the run in seconds (--time-limit 60m), setup included; the epochs and
    # the schedule are fitted to it (medseg.engine.budget). 0: none; None: an hour on a CPU
    # whose plan passes it, none elsewhere.
    time_limit: float | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)


# The specification's recipe, kept for reproducing it: 256×256, Adam 1e-4, constant, 22 epochs,
# flips / rotation / noise, plain 3×3 convolutions in the head.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "seed": {
        "data": {"augment": "seed", "image_size": 256},
        "model": {"separable": False},
        "train": {
            "epochs": 22,
            "optimizer": "adam",
            "lr": 1e-4,
            "weight_decay": 0.0,
            "schedule": "constant",
            "warmup_epochs": 0.0,
            "loss": "dice_bce",
        },
    },
}


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low``/``high`` None means unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is excluded
    high_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'greater than' if self.low_open else 'at least'} {self.low}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {self.high}")
        return " and ".join(parts)

    def holds(self, value: float | None) -> bool:
        if value is None:  # an optional setting left to its default
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )


# Bounds on what a network is built for, checked on every config, so a config.json or
# medseg.json edited by hand (or a typo) is refused in one line instead of failing to allocate:
# the input side (a 4096×4096 input already takes tens of GB of activations; the plan's sizes
# end at 512), the classes (label maps and masks are 8-bit images: values 0..255) and the
# image channels (a stack of MRI sequences is a handful).
MAX_IMAGE_SIZE = 4096
MAX_CLASSES = 256
MAX_CHANNELS = 64
# An atrous rate past the side of the largest input's feature map (at output stride 8) reads
# only padding.
MAX_ASPP_RATE = MAX_IMAGE_SIZE // 8

NON_NEGATIVE = Range(low=0)
POSITIVE = Range(low=0, low_open=True)
PROBABILITY = Range(low=0, high=1, low_open=True, high_open=True)  # strictly between 0 and 1

# (section, key) -> the range of a numeric setting. Every float must also be finite.
RANGES = {
    ("data", "image_size"): Range(low=0, high=MAX_IMAGE_SIZE),
    ("data", "val_fraction"): PROBABILITY,
    ("data", "foreground_fraction"): PROBABILITY,
    ("data", "channels"): Range(low=1, high=MAX_CHANNELS),
    ("model", "num_classes"): Range(low=1, high=MAX_CLASSES),
    ("model", "in_channels"): Range(low=1, high=MAX_CHANNELS),
    ("data", "num_workers"): NON_NEGATIVE,
    ("model", "aspp_dropout"): Range(low=0, high=1, high_open=True),
    ("model", "pooling_window"): Range(low=0, high=MAX_IMAGE_SIZE),
    ("train", "epochs"): NON_NEGATIVE,
    ("train", "batch_size"): Range(low=1),
    ("train", "lr"): POSITIVE,
    ("train", "backbone_lr_factor"): POSITIVE,
    ("train", "weight_decay"): NON_NEGATIVE,
    ("train", "warmup_epochs"): NON_NEGATIVE,
    ("train", "freeze_backbone_epochs"): NON_NEGATIVE,
    ("train", "patience"): NON_NEGATIVE,
    ("train", "threshold"): PROBABILITY,
    ("train", "grad_clip"): NON_NEGATIVE,
    ("train", "seed"): Range(low=0, high=2**32 - 1),
    ("train", "ema_decay"): PROBABILITY,
    ("train", "time_limit"): NON_NEGATIVE,
}


def build_config(
    *,
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve defaults → preset → YAML file → overrides (``{"train.lr": 3e-4, ...}``)."""
    if preset not in PRESETS:
        raise MedsegError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = Config()
    _apply_nested(config, PRESETS[preset], source=f"preset {preset!r}")
    if config_file is not None:
        _apply_nested(config, _read_yaml(Path(config_file)), source=str(config_file))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _apply_nested(config, {section: {key: value}}, source="the command line")
    validate(config)
    return config


def config_from_dict(values: dict[str, Any], *, source: str = "checkpoint") -> Config:
    """Rebuild a Config from its ``to_dict()`` form (as stored in checkpoints and runs)."""
    config = Config()
    _apply_nested(config, values, source=source)
    try:
        validate(config)
    except MedsegError as error:
        raise MedsegError(f"{error} (in {source})") from None
    return config


# Settings a saved config may predate, with the behaviour of its time: runs before patch
# training resized every image; before these model settings, the head used plain 3×3
# convolutions and the paper's decoder (stride 4).
LEGACY_DATA_SETTINGS = {"mode": "resize"}
LEGACY_SETTINGS = {"separable": False, "decoder_stride": 4}


def config_from_saved(values: dict[str, Any], *, source: str) -> Config:
    """The config an earlier run saved (a checkpoint's, or its config.yaml).

    Model and data settings that run predates take the value it was trained with, not today's default.
    """
    model_values = values.get("model")
    if isinstance(model_values, dict):
        values = {**values, "model": {**LEGACY_SETTINGS, **model_values}}
    data_values = values.get("data")
    if isinstance(data_values, dict):
        values = {**values, "data": {**LEGACY_DATA_SETTINGS, **data_values}}
    return config_from_dict(values, source=source)


def read_saved_config(path: str | Path) -> Config:
    """A run folder's config.yaml, with `config_from_saved`'s rules for older runs."""
    return config_from_saved(_read_yaml(Path(path)), source=str(path))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def validate(config: Config) -> None:
    """Refuse impossible values, naming the key: a negative lr, a NaN threshold, an unknown loss.

    Runs whenever a config is built, and again on a checkpoint's or run folder's config, so a
    setting that could only give a useless model never reaches training or prediction.
    """
    for (section, key), allowed in setting_choices().items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise MedsegError(
                f"{section}.{key}={value!r} is not valid; choose one of {', '.join(map(str, allowed))}"
            )
    for section in fields(config):
        for setting in fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise MedsegError(
                    f"{section.name}.{setting.name}={value!r} is impossible; it must be a finite number"
                )
    for (section, key), allowed_range in RANGES.items():
        value = getattr(getattr(config, section), key)
        if not allowed_range.holds(value):
            raise MedsegError(
                f"{section}.{key}={value!r} is impossible; it must be {allowed_range.describe()}"
            )
    if config.train.loss_per_image and config.train.loss not in PER_IMAGE_LOSSES:
        raise MedsegError(
            f"train.loss_per_image needs a Dice loss ({', '.join(PER_IMAGE_LOSSES)}), "
            f"not {config.train.loss!r}"
        )
    _check_classes(config)
    if 0 < config.data.image_size < 32:
        raise MedsegError(
            f"data.image_size={config.data.image_size} is impossible; it must be at least 32 "
            f"(or 0: planned from the data)"
        )
    rates = config.model.aspp_rates
    if any(not 1 <= rate <= MAX_ASPP_RATE for rate in rates) or len(set(rates)) != len(rates):
        raise MedsegError(
            f"model.aspp_rates={rates} is impossible; each rate must be 1 to {MAX_ASPP_RATE}, "
            f"and given once"
        )
    if config.model.variant == "seed" and config.model.output_stride != 16:
        raise MedsegError(
            "model.output_stride=8 needs model.variant=paper (the seed variant is stride 16)"
        )
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", config.train.device):
        raise MedsegError(f"unknown device {config.train.device!r}; use {DEVICE_FORMS}")


def _check_classes(config: Config) -> None:
    """The model's outputs and inputs must match the data's classes and channels."""
    labels, model = config.data.labels, config.model
    if len(labels) > MAX_CLASSES:
        raise MedsegError(
            f"data.labels names {len(labels)} classes; at most {MAX_CLASSES} (masks are 8-bit)"
        )
    if labels and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise MedsegError(
            f"data.labels={labels} must name at least two classes (background first), each once"
        )
    outputs = len(labels) if len(labels) > 2 else 1
    if model.num_classes != outputs:
        raise MedsegError(
            f"model.num_classes={model.num_classes} does not fit data.labels ({len(labels) or 2} "
            f"classes need {outputs} output{'s' * (outputs > 1)}); leave both to the data's dataset.json"
        )
    if model.in_channels != config.data.channels:
        raise MedsegError(
            f"model.in_channels={model.in_channels} differs from data.channels="
            f"{config.data.channels}; leave both to the data"
        )
    if outputs > 1 and config.train.loss not in MULTI_CLASS_LOSSES:
        raise MedsegError(
            f"train.loss={config.train.loss!r} is binary only; for {outputs} classes choose one "
            f"of {', '.join(MULTI_CLASS_LOSSES)}"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedsegError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise MedsegError(
            f"config file {path} is not valid YAML: {error}".splitlines()[0]
        ) from error
    if not isinstance(values, dict):
        raise MedsegError(f"config file {path} must hold a mapping with data/model/train sections")
    return values


def _apply_nested(config: Config, values: dict[str, Any], *, source: str) -> None:
    sections = {f.name: getattr(config, f.name) for f in fields(config)}
    for section_name, section_values in values.items():
        if section_name not in sections:
            raise MedsegError(
                f"unknown section {section_name!r} in {source}; sections are {', '.join(sections)}"
            )
        if not isinstance(section_values, dict):
            raise MedsegError(f"section {section_name!r} in {source} must be a mapping")
        section = sections[section_name]
        known = {f.name: f for f in fields(section)}
        for key, value in section_values.items():
            if key not in known:
                raise MedsegError(
                    f"unknown key {section_name}.{key} in {source}; known keys: {', '.join(known)}"
                )
            hint = typing.get_type_hints(type(section))[key]
            setattr(section, key, _coerce(value, hint, f"{section_name}.{key}", source))


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    """Check a value against its annotation, converting only where nothing is lost (1 → 1.0)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:  # an optional setting left to its default
            return None
        if typing.get_origin(option) is list:
            [item_type] = typing.get_args(option)
            if isinstance(value, list | tuple) and all(
                isinstance(item, item_type) and not isinstance(item, bool) for item in value
            ):
                return list(value)
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    expected = " or ".join(getattr(option, "__name__", str(option)) for option in options)
    raise MedsegError(f"{name}={value!r} in {source} has the wrong type; expected {expected}")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` from the command line; the value is read as YAML (1e-3, true)."""
    dotted, separator, raw = text.partition("=")
    if not separator or "." not in dotted:
        raise MedsegError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    value = yaml.safe_load(raw)
    # YAML 1.1 reads "1e-3" as a string; accept the numbers people write.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return dotted, value
