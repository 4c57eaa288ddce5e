"""medseg: DeepLabv3+ for 2D medical image segmentation, binary masks or multi-class label maps.

The command line (``medseg train|evaluate|predict|visualize|export|serve|prepare|demo``) and this API do the
same things; see README.md. Names are imported on first use, so that ``import medseg`` (and the
command line's ``--help``) does not wait for PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medseg.core.version import __version__

# Each public name and the module that defines it.
_PUBLIC = {
    "demo": "medseg.api",
    "evaluate": "medseg.api",
    "export": "medseg.api",
    "predict": "medseg.api",
    "prepare_data": "medseg.api",
    "train": "medseg.api",
    "tune": "medseg.api",
    "visualize": "medseg.api",
    "load_pretrained": "medseg.api",
    "save_pretrained": "medseg.api",
    "serve": "medseg.api",
    "Config": "medseg.config",
    "build_config": "medseg.config",
    "MedsegError": "medseg.core.errors",
    "Predictor": "medseg.prediction",
    "DeepLabV3Plus": "medseg.model",
}

__all__ = [
    "Config",
    "DeepLabV3Plus",
    "MedsegError",
    "Predictor",
    "__version__",
    "build_config",
    "demo",
    "evaluate",
    "export",
    "load_pretrained",
    "predict",
    "prepare_data",
    "save_pretrained",
    "serve",
    "train",
    "tune",
    "visualize",
]

if TYPE_CHECKING:  # for editors and type checkers; at run time __getattr__ imports on demand
    from medseg.api import (
        demo,
        evaluate,
        export,
        load_pretrained,
        predict,
        prepare_data,
        save_pretrained,
        serve,
        train,
        tune,
        visualize,
    )
    from medseg.config import Config, build_config
    from medseg.core.errors import MedsegError
    from medseg.model import DeepLabV3Plus
    from medseg.prediction import Predictor


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
