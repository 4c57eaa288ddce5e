"""DeepLabv3+: backbone, ASPP and decoder, one module per concept."""

from medseg.model.backbone import RESNETS, VARIANTS, build_backbone
from medseg.model.decoder import DECODER_STRIDES
from medseg.model.deeplab import LEGACY_SETTINGS, DeepLabV3Plus

__all__ = [
    "DECODER_STRIDES",
    "LEGACY_SETTINGS",
    "RESNETS",
    "VARIANTS",
    "DeepLabV3Plus",
    "build_backbone",
]
