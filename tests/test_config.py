"""Config: defaults, presets, YAML, overrides, and refusals that name the offending key."""

import pytest
import yaml

from medseg.config import (
    Config,
    build_config,
    config_from_dict,
    parse_override,
    save_config,
)
from medseg.core.errors import MedsegError


def test_defaults():
    # The training recipe's numbers (epochs, lr) are tuned over time; these are the contract.
    config = build_config()
    assert config == Config()
    assert config.data.mask_suffix == "_segmentation"
    assert config.data.skip_bad is False
    assert config.model.backbone == "resnet50"
    assert config.model.variant == "seed"
    assert config.model.output_stride == 16
    assert config.model.pretrained is True
    assert config.train.seed == 0


def test_seed_preset_reproduces_the_specification():
    config = build_config(preset="seed")
    assert config.train.lr == 1e-4
    assert config.train.optimizer == "adam"
    assert config.train.epochs == 22
    assert config.train.schedule == "constant"
    assert config.train.warmup_epochs == 0.0
    assert config.train.weight_decay == 0.0
    assert config.train.loss == "dice_bce"
    assert config.data.augment == "seed"
    assert config.data.image_size == 256
    assert config.model.separable is False
    # Settings the preset does not name keep their defaults.
    assert config.train.batch_size == 16


def test_presets_do_not_leak_into_each_other():
    build_config(preset="seed")
    assert build_config() == Config()


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(MedsegError, match="unknown preset 'fast'; choose one of default, seed"):
        build_config(preset="fast")


def test_yaml_file_overrides_the_preset_and_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  backbone: resnet18\n  variant: paper\n  output_stride: 8\n"
        "train:\n  lr: 3.0e-4\n  epochs: 5\n"
    )
    config = build_config(preset="seed", config_file=path, overrides={"train.epochs": 7})
    assert config.model.backbone == "resnet18"
    assert config.model.variant == "paper"
    assert config.model.output_stride == 8
    assert config.train.lr == 3e-4
    assert config.train.epochs == 7
    assert config.train.optimizer == "adam"  # from the preset, untouched by the file


def test_integer_for_a_float_setting_becomes_a_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1\n")
    lr = build_config(config_file=path).train.lr
    assert lr == 1.0
    assert type(lr) is float


def test_pretrained_accepts_a_path():
    config = build_config(overrides={"model.pretrained": "/weights/resnet50.pth"})
    assert config.model.pretrained == "/weights/resnet50.pth"


def test_saved_config_reads_back_equal(tmp_path):
    config = build_config(preset="seed", overrides={"model.backbone": "resnet34"})
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert yaml.safe_load(path.read_text())["model"]["backbone"] == "resnet34"
    assert build_config(config_file=path) == config
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  learning_rate: 0.1\n", "unknown key train.learning_rate in .*run.yaml"),
        ("training:\n  lr: 0.1\n", "unknown section 'training'"),
        ("train: 5\n", "section 'train' in .*run.yaml must be a mapping"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("train: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files_are_refused(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(MedsegError, match=message):
        build_config(config_file=path)


def test_unknown_key_lists_the_known_keys():
    with pytest.raises(MedsegError) as caught:
        build_config(overrides={"model.depth": 50})
    assert "unknown key model.depth" in str(caught.value)
    assert "backbone, variant, output_stride" in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(MedsegError, match="config file not found: .*absent.yaml"):
        build_config(config_file=tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("train.epochs", "ten", r"train.epochs='ten' .* has the wrong type; expected int"),
        ("train.epochs", 2.5, r"train.epochs=2.5 .* wrong type; expected int"),
        ("train.lr", "fast", r"train.lr='fast' .* wrong type; expected float"),
        ("train.lr", True, r"train.lr=True .* wrong type; expected float"),
        ("data.skip_bad", 1, r"data.skip_bad=1 .* wrong type; expected bool"),
        ("model.pretrained", 3, r"model.pretrained=3 .* wrong type; expected bool or str"),
    ],
)
def test_wrong_types_name_the_key(dotted, value, message):
    with pytest.raises(MedsegError, match=message):
        build_config(overrides={dotted: value})


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("train.lr", -0.1, r"train.lr=-0.1 is impossible; it must be greater than 0"),
        ("train.lr", 0.0, r"train.lr=0.0 is impossible; it must be greater than 0"),
        ("train.lr", float("nan"), r"train.lr=nan is impossible; it must be a finite number"),
        (
            "train.threshold",
            float("nan"),
            r"train.threshold=nan is impossible; it must be a finite",
        ),
        ("train.warmup_epochs", float("inf"), r"train.warmup_epochs=inf is impossible"),
        ("data.val_fraction", float("nan"), r"data.val_fraction=nan is impossible"),
        (
            "model.aspp_dropout",
            2,
            r"model.aspp_dropout=2.0 is impossible; it must be at least 0 and below 1",
        ),
        ("train.seed", -1, r"train.seed=-1 is impossible; it must be at least 0"),
        ("train.device", "foo", r"foo"),
        ("train.batch_size", 0, r"train.batch_size=0 is impossible; it must be at least 1"),
        ("train.epochs", -1, r"train.epochs=-1 is impossible"),
        ("data.image_size", 16, r"data.image_size=16 is impossible; it must be at least 32"),
        ("data.val_fraction", 1.0, r"data.val_fraction=1.0 is impossible; it must be .* below 1"),
        ("train.threshold", 1.0, r"train.threshold=1.0 is impossible; it must be .* below 1"),
        ("train.threshold", 0.0, r"train.threshold=0.0 is impossible; it must be greater than 0"),
        ("train.loss", "mse", r"train.loss='mse' is not valid; choose one of dice_bce, dice"),
        ("model.backbone", "vgg16", r"model.backbone='vgg16' is not valid; choose one of resnet18"),
        ("model.output_stride", 8, r"model.output_stride=8 needs model.variant=paper"),
    ],
)
def test_impossible_values_name_the_key(dotted, value, message):
    with pytest.raises(MedsegError, match=message):
        build_config(overrides={dotted: value})


def test_per_image_loss_needs_a_dice_loss():
    with pytest.raises(MedsegError, match="train.loss_per_image needs a Dice loss .* not 'iou'"):
        build_config(overrides={"train.loss_per_image": True, "train.loss": "iou"})
    assert build_config(overrides={"train.loss_per_image": True}).train.loss_per_image


def test_checkpoint_config_is_validated_too():
    values = Config().to_dict()
    values["train"]["batch_size"] = 0
    with pytest.raises(MedsegError, match="train.batch_size=0 is impossible"):
        config_from_dict(values, source="old.pt")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.lr=3e-4", ("train.lr", 3e-4)),
        ("train.lr=1e-3", ("train.lr", 1e-3)),
        ("train.lr=0.01", ("train.lr", 0.01)),
        ("train.epochs=5", ("train.epochs", 5)),
        ("train.channels_last=false", ("train.channels_last", False)),
        ("model.backbone=resnet18", ("model.backbone", "resnet18")),
        ("model.pretrained=/tmp/w.pth", ("model.pretrained", "/tmp/w.pth")),
        ("train.device=cuda:1", ("train.device", "cuda:1")),
    ],
)
def test_parse_override(text, expected):
    dotted, value = parse_override(text)
    assert (dotted, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["train.lr", "lr=3e-4", "=3"])
def test_malformed_override(text):
    with pytest.raises(MedsegError, match="must look like section.key=value"):
        parse_override(text)


def test_parsed_overrides_build_a_config():
    overrides = dict(map(parse_override, ["train.lr=2e-4", "train.batch_size=4"]))
    config = build_config(overrides=overrides)
    assert config.train.lr == 2e-4
    assert config.train.batch_size == 4
