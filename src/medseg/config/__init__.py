"""A run's settings: typed dataclasses, presets, YAML in and out, validation, the rules for
configs older runs saved, and the choice lists of every setting (`medseg.config.choices`)."""

from medseg.config.settings import (
    LEGACY_DATA_SETTINGS,
    LEGACY_SETTINGS,
    PRESETS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    build_config,
    config_from_dict,
    config_from_saved,
    parse_override,
    read_saved_config,
    save_config,
    validate,
)

__all__ = [
    "LEGACY_DATA_SETTINGS",
    "LEGACY_SETTINGS",
    "PRESETS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "build_config",
    "config_from_dict",
    "config_from_saved",
    "parse_override",
    "read_saved_config",
    "save_config",
    "validate",
]
