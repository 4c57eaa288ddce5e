"""DeepLabv3+: backbone, ASPP and decoder, one module per concept."""

from medseg.model.backbone import RESNETS, VARIANTS, build_backbone
from medseg.model.deeplab import DeepLabV3Plus

__all__ = ["RESNETS", "VARIANTS", "DeepLabV3Plus", "build_backbone"]
