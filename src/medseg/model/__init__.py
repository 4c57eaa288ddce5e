"""DeepLabv3+: backbone, ASPP and decoder, one module per concept."""

from medseg.model.backbone import BACKBONES, RESNETS, VARIANTS, build_backbone
from medseg.model.decoder import DECODER_STRIDES
from medseg.model.deeplab import PAPER_DECODER_STRIDE, DeepLabV3Plus, model_arguments

__all__ = [
    "BACKBONES",
    "DECODER_STRIDES",
    "PAPER_DECODER_STRIDE",
    "RESNETS",
    "VARIANTS",
    "DeepLabV3Plus",
    "build_backbone",
    "model_arguments",
]
