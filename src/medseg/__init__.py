"""medseg: DeepLabv3+ for 2D medical image segmentation, binary masks or multi-class label maps.

The command line (``medseg train|evaluate|predict|visualize|export|prepare|demo``) and this API do the
same things; see README.md.
"""

from medseg.api import demo, evaluate, export, predict, prepare_data, train, visualize
from medseg.config import Config, build_config
from medseg.errors import MedsegError
from medseg.inference import Predictor
from medseg.model import DeepLabV3Plus

__version__ = "0.1.0"

__all__ = [
    "Config",
    "DeepLabV3Plus",
    "MedsegError",
    "Predictor",
    "build_config",
    "demo",
    "evaluate",
    "export",
    "predict",
    "prepare_data",
    "train",
    "visualize",
]
