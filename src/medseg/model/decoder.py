"""The DeepLabv3+ decoder: sharpen the ASPP's coarse output with low-level detail."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.model.aspp import conv_bn_relu


class Decoder(nn.Module):
    """Join 48-channel low-level features with the upsampled ASPP output, refine, classify.

    Inputs: ``context`` (N, 256, H/16, W/16) from the ASPP, ``low_level`` (N, C_low, H/4, W/4)
    from the backbone. Output: logits (N, num_classes, H/4, W/4).
    """

    def __init__(
        self,
        low_level_channels: int,
        num_classes: int,
        *,
        context_channels: int = 256,
        low_level_projection: int = 48,
        refine_channels: int = 256,
        separable: bool = False,
    ):
        super().__init__()
        self.project_low_level = conv_bn_relu(
            low_level_channels, low_level_projection, kernel_size=1
        )
        self.refine = nn.Sequential(
            conv_bn_relu(
                context_channels + low_level_projection,
                refine_channels,
                kernel_size=3,
                separable=separable,
            ),
            conv_bn_relu(refine_channels, refine_channels, kernel_size=3, separable=separable),
        )
        self.classifier = nn.Conv2d(refine_channels, num_classes, kernel_size=1)

    def forward(self, context: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        detail = self.project_low_level(low_level)  # (N, 48, H/4, W/4)
        # Upsample to the low-level grid itself rather than by exactly ×4, so inputs whose size
        # is not a multiple of 16 line up too.
        context = F.interpolate(
            context, size=detail.shape[-2:], mode="bilinear", align_corners=False
        )
        joined = torch.cat([context, detail], dim=1)  # (N, 256 + 48, H/4, W/4)
        return self.classifier(self.refine(joined))
