"""The DeepLabv3+ decoder: sharpen the ASPP's coarse output with low-level detail."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.model.aspp import conv_bn_relu

DECODER_STRIDES = (4, 2)


class Decoder(nn.Module):
    """Join 48-channel low-level features with the upsampled ASPP output, refine, classify.

    Inputs: ``context`` (N, 256, H/16, W/16) from the ASPP, ``low_level`` (N, C_low, H/4, W/4)
    from the backbone. Output: logits (N, num_classes, H/4, W/4), the paper's decoder.

    ``stem_channels`` > 0 adds a `FineStage`: the refined features are joined once more with
    the backbone's ``stem`` (N, stem_channels, H/2, W/2), and the logits come at H/2 × W/2.
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
        stem_channels: int = 0,
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
        self.fine = (
            FineStage(refine_channels, stem_channels, separable=separable)
            if stem_channels
            else None
        )
        classified = self.fine.out_channels if self.fine else refine_channels
        self.classifier = nn.Conv2d(classified, num_classes, kernel_size=1)

    def forward(
        self, context: torch.Tensor, low_level: torch.Tensor, stem: torch.Tensor | None = None
    ) -> torch.Tensor:
        detail = self.project_low_level(low_level)  # (N, 48, H/4, W/4)
        joined = torch.cat([_upsample_to(context, detail), detail], dim=1)  # (N, 256 + 48, ...)
        features = self.refine(joined)
        if self.fine is not None:
            features = self.fine(features, stem)  # (N, 32, H/2, W/2)
        return self.classifier(features)


class FineStage(nn.Module):
    """One more decoder step at stride 2, for structures one to three pixels wide (retinal
    vessels): at the paper's stride 4 a vessel is a quarter of a logit cell wide, and two
    vessels side by side share one (README Results, DRIVE).

    The coarse features are narrowed to ``channels`` before they are upsampled, and the stem's
    features projected to ``projection`` channels (as the paper projects its low-level ones to
    48), so that the stage stays small beside the network (its cost: README, The model).
    """

    def __init__(
        self,
        coarse_channels: int,
        stem_channels: int,
        *,
        channels: int = 32,
        projection: int = 16,
        separable: bool = False,
    ):
        super().__init__()
        self.narrow = conv_bn_relu(coarse_channels, channels, kernel_size=1)
        self.project_stem = conv_bn_relu(stem_channels, projection, kernel_size=1)
        self.refine = conv_bn_relu(
            channels + projection, channels, kernel_size=3, separable=separable
        )
        self.out_channels = channels

    def forward(self, coarse: torch.Tensor, stem: torch.Tensor) -> torch.Tensor:
        detail = self.project_stem(stem)
        coarse = _upsample_to(self.narrow(coarse), detail)
        return self.refine(torch.cat([coarse, detail], dim=1))


def _upsample_to(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``features`` resized bilinearly to ``reference``'s grid: to the grid itself rather than
    by an exact factor, so inputs whose size is not a multiple of 16 line up too."""
    return F.interpolate(features, size=reference.shape[-2:], mode="bilinear", align_corners=False)
