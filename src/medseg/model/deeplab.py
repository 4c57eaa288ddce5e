"""DeepLabv3+ wired from its parts: backbone → ASPP → decoder → upsample to the input size."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.model.aspp import ASPP
from medseg.model.backbone import build_backbone
from medseg.model.decoder import DECODER_STRIDES, Decoder

if TYPE_CHECKING:
    from medseg.config import Config, ModelConfig


# The paper's decoder, at a quarter of the input; also what a config's 0 (planned from the
# data) builds before planning.
PAPER_DECODER_STRIDE = 4

# Model settings added after checkpoints had been written, with the value those older runs
# used: a saved config without the key was trained that way.
LEGACY_SETTINGS = {"separable": False, "decoder_stride": PAPER_DECODER_STRIDE}

# The paper's ASPP rates at each output stride (Chen et al. 2017, chosen for 513 × 513 crops),
# doubled at stride 8 so that the receptive fields cover the same part of the image.
PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def model_arguments(config: ModelConfig) -> dict:
    """The `DeepLabV3Plus` arguments (its ``config``, all but the weights) that a run's
    ``model`` settings stand for."""
    return {
        "num_classes": config.num_classes,
        "in_channels": config.in_channels,
        "backbone": config.backbone,
        "variant": config.variant,
        "output_stride": config.output_stride,
        "aspp_dropout": config.aspp_dropout,
        "separable": config.separable,
        "aspp_rates": list(config.aspp_rates),
        "decoder_stride": config.decoder_stride or PAPER_DECODER_STRIDE,
        "pooling_window": config.pooling_window,
    }


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
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "backbone": backbone,
            "variant": variant,
            "output_stride": output_stride,
            "aspp_dropout": aspp_dropout,
            "separable": separable,
            "aspp_rates": list(aspp_rates),
            "decoder_stride": decoder_stride,
            "pooling_window": pooling_window,
        }
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
    def from_config(
        cls, config: ModelConfig, *, pretrained: bool | str | None = None
    ) -> DeepLabV3Plus:
        """The network a run's ``model`` settings describe (``pretrained`` overrides theirs)."""
        return cls(
            **model_arguments(config),
            pretrained=config.pretrained if pretrained is None else pretrained,
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> DeepLabV3Plus:
        """The network `save_pretrained` (or ``medseg export --format safetensors``) wrote into
        ``folder``, in eval mode; only JSON and raw tensors are read, nothing is unpickled."""
        from medseg.exports.pretrained import load_pretrained  # it builds this class

        model, _ = load_pretrained(folder)
        return model

    def save_pretrained(
        self, folder: str | os.PathLike, *, config: Config | None = None, **options
    ) -> os.PathLike:
        """Write model.safetensors, config.json and a model card into ``folder``.

        ``config`` is the run's resolved `medseg.config.Config`, which a Predictor needs (input
        size, classes, threshold); ``options``: see `medseg.exports.pretrained.save_pretrained`.
        """
        from medseg.exports.pretrained import save_pretrained

        return save_pretrained(self, folder, config=config, **options)

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
