"""DeepLabv3+ wired from its parts: backbone → ASPP → decoder → upsample to the input size."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.core.errors import MedsegError
from medseg.model.aspp import ASPP
from medseg.model.backbone import build_backbone
from medseg.model.decoder import DECODER_STRIDES, Decoder

# The paper's decoder, at a quarter of the input; also what a config's 0 (planned from the
# data) builds before planning.
PAPER_DECODER_STRIDE = 4

# The paper's ASPP rates at each output stride (Chen et al. 2017, chosen for 513 × 513 crops),
# doubled at stride 8 so that the receptive fields cover the same part of the image.
PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


# What `DeepLabV3Plus.config` records: every argument but the weights, so that a checkpoint's
# config rebuilds the network. A run's ``model`` settings (medseg.config.ModelConfig) carry the
# same names.
ARGUMENTS = (
    "num_classes",
    "in_channels",
    "backbone",
    "variant",
    "output_stride",
    "aspp_dropout",
    "separable",
    "aspp_rates",
    "decoder_stride",
    "pooling_window",
)


def model_arguments(settings: Any) -> dict[str, Any]:
    """The `DeepLabV3Plus` arguments that a run's ``model`` settings (any object with the
    attributes `ARGUMENTS` names, e.g. `medseg.config.ModelConfig`) stand for; a decoder
    stride of 0 (planned from the data, not planned yet) builds the paper's."""
    arguments = {name: getattr(settings, name) for name in ARGUMENTS}
    arguments["aspp_rates"] = list(arguments["aspp_rates"])
    arguments["decoder_stride"] = arguments["decoder_stride"] or PAPER_DECODER_STRIDE
    return arguments


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ for segmentation; logits of the same height and width as the input.

    Input ``(N, in_channels, H, W)`` float (normalised), any H and W of at least 32 pixels;
    output logits ``(N, num_classes, H, W)``. For binary masks, ``num_classes=1`` and
    ``sigmoid(logits) > threshold`` is the mask; for K classes, ``num_classes=K`` and the label
    map is ``logits.argmax(1)``. ``decoder_stride`` 4 is the paper's decoder; 2 adds a stage
    that joins the stem's stride-2 features (`medseg.model.decoder.FineStage`).
    ``pooling_window`` (pixels), for a network trained on patches of that side: the ASPP's
    image pooling averages windows of the patch's size on larger inputs (`ImagePooling`);
    0 averages the whole input, as the paper does.

    Keyword arguments are stored in ``self.config`` so a checkpoint can rebuild the model.
    """

    def __init__(
        self,
        num_classes: int = 1,
        backbone: str = "resnet50",
        *,
        variant: str = "seed",
        output_stride: int = 16,
        pretrained: bool | str | os.PathLike = False,
        aspp_dropout: float = 0.1,
        separable: bool = True,
        in_channels: int = 3,
        aspp_rates: tuple[int, ...] | list[int] = (),
        decoder_stride: int = PAPER_DECODER_STRIDE,
        pooling_window: int = 0,
    ):
        super().__init__()
        if decoder_stride not in DECODER_STRIDES:
            raise MedsegError(
                f"decoder_stride={decoder_stride} is not available; choose one of "
                f"{', '.join(map(str, DECODER_STRIDES))}"
            )
        given = locals()
        self.config = {name: given[name] for name in ARGUMENTS}
        self.config["aspp_rates"] = list(aspp_rates)
        self.backbone = build_backbone(
            name=backbone,
            variant=variant,
            output_stride=output_stride,
            pretrained=pretrained,
            in_channels=in_channels,
        )
        rates = tuple(aspp_rates) or PAPER_RATES[output_stride]
        self.aspp = ASPP(
            self.backbone.deep_channels,
            rates=rates,
            dropout=aspp_dropout,
            separable=separable,
            pooling_window=math.ceil(pooling_window / output_stride) or None,
        )
        self.decoder = Decoder(
            self.backbone.low_level_channels,
            num_classes,
            separable=separable,
            stem_channels=self.backbone.stem_channels if decoder_stride == 2 else 0,
        )
        self.backbone_frozen = False

    @classmethod
    def from_config(cls, config: Any, *, pretrained: bool | str | None = None) -> DeepLabV3Plus:
        """The network a run's ``model`` settings (`medseg.config.ModelConfig`) describe
        (``pretrained`` overrides theirs)."""
        return cls(
            **model_arguments(config),
            pretrained=config.pretrained if pretrained is None else pretrained,
        )

    def zero_taps_out_of_reach(self, input_size: int) -> None:
        """Zero the ASPP taps that an ``input_size`` × ``input_size`` input never reaches, for a
        network that trains (or was trained) at that size: see `ASPP.zero_taps_out_of_reach`.
        A size of 0 (not planned yet) leaves every tap as it is."""
        if input_size > 0:
            grid = math.ceil(input_size / self.config["output_stride"])
            self.aspp.zero_taps_out_of_reach(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        context = self.aspp(features["deep"])  # (N, 256, H/16, W/16)
        # (N, classes, H/4, W/4), or H/2 × W/2 with the fine stage
        logits = self.decoder(context, features["low_level"], features["stem"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def freeze_backbone(self) -> None:
        """Train only ASPP and decoder (the seed's transfer-learning warm-up).

        BatchNorm statistics of the backbone are frozen too: updating them while the weights
        stay fixed would shift the features the new head is learning from.
        """
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def unfreeze_backbone(self) -> None:
        """Train every parameter again."""
        self.backbone_frozen = False
        self.backbone.requires_grad_(True)
        self.backbone.train(self.training)

    def train(self, mode: bool = True) -> DeepLabV3Plus:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self
