"""Atrous Spatial Pyramid Pooling (Chen et al. 2017, 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    dilation: int = 1,
    *,
    separable: bool = False,
) -> nn.Sequential:
    """Convolution (no bias: BatchNorm follows), BatchNorm, ReLU; 'same' padding.

    ``separable``: a k×k convolution becomes the paper's atrous separable convolution, a
    depthwise k×k (dilated) then a pointwise 1×1. For the 3×3 layers of the ASPP and decoder
    this is about 9× fewer multiply-adds at nearly the same receptive field and accuracy
    (Chen et al. 2018, section 3.2). A 1×1 convolution is the same either way.
    """
    padding = dilation * (kernel_size - 1) // 2
    if separable and kernel_size > 1:
        convolution = nn.Sequential(
            nn.Conv2d(
                in_channels,
                in_channels,
                kernel_size,
                padding=padding,
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        )
    else:
        convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
    return nn.Sequential(convolution, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """The ASPP's image-level branch: average, 1×1 conv, broadcast back to the grid.

    ``window`` None: the average of the whole input, the paper's. ``window`` w (feature cells),
    for a network trained on w × w grids (patches): on a larger input each position gets the
    average of the w × w window centred on it (moved inside the input at its borders), as
    DeepLab's own code does (``image_pooling_crop_size``) when a network trained on crops
    predicts whole images. The image-level context stays the size the network learned, so a
    whole image and the tiles of a sliding window see the same kind of average. On an input of
    w × w or smaller this is the global average, exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, *, window: int | None = None):
        super().__init__()
        self.project = conv_bn_relu(in_channels, out_channels, kernel_size=1)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.window is not None and (height > self.window or width > self.window):
            return self._windowed(x)
        pooled = F.adaptive_avg_pool2d(x, 1)  # (N, C_in, 1, 1)
        if self.training and x.shape[0] == 1:
            # One image gives BatchNorm a single value per channel, whose variance is undefined:
            # normalise it with the running statistics instead (and leave them unchanged).
            projected = self._project_with_running_statistics(pooled)
        else:
            projected = self.project(pooled)  # (N, C, 1, 1)
        return projected.expand(-1, -1, height, width)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """Each position's window average: every full window's mean (stride 1), projected,
        then each position takes the window most nearly centred on it (edge padding)."""
        height, width = x.shape[-2:]
        rows, columns = min(self.window, height), min(self.window, width)
        projected = self.project(F.avg_pool2d(x, (rows, columns), stride=1))
        before_rows, before_columns = (rows - 1) // 2, (columns - 1) // 2
        padding = (
            before_columns,
            columns - 1 - before_columns,
            before_rows,
            rows - 1 - before_rows,
        )
        return F.pad(projected, padding, mode="replicate")

    def _project_with_running_statistics(self, pooled: torch.Tensor) -> torch.Tensor:
        convolution, batchnorm, relu = self.project
        batchnorm.eval()
        try:
            return relu(batchnorm(convolution(pooled)))
        finally:
            batchnorm.train()


class ASPP(nn.Module):
    """A 1×1 branch, one 3×3 atrous branch per rate, and image pooling; concatenated, projected.

    ``pooling_window``: the image pooling's window in feature cells (`ImagePooling`).
    Input ``(N, in_channels, h, w)``; output ``(N, out_channels, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        rates: tuple[int, ...] = (6, 12, 18),
        out_channels: int = 256,
        dropout: float = 0.1,
        separable: bool = False,
        pooling_window: int | None = None,
    ):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, kernel_size=1)]
            + [
                conv_bn_relu(
                    in_channels, out_channels, kernel_size=3, dilation=rate, separable=separable
                )
                for rate in rates
            ]
            + [ImagePooling(in_channels, out_channels, window=pooling_window)]
        )
        branch_count = len(self.branches)
        self.project = nn.Sequential(
            conv_bn_relu(branch_count * out_channels, out_channels, kernel_size=1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = torch.cat([branch(x) for branch in self.branches], dim=1)  # (N, 5·256, h, w)
        return self.project(pyramid)

    @torch.no_grad()
    def zero_taps_out_of_reach(self, grid: int) -> None:
        """Zero the off-centre taps of every atrous branch whose rate is ``grid`` or more.

        On a ``grid`` × ``grid`` feature map such a tap reads zero padding from every position
        (Chen et al. 2017, section 3.3: the 3×3 filter degenerates to its centre), so training
        at that size never gives it a gradient and it keeps its random initial value. A larger
        input, a whole image instead of the patches the network learned on, would multiply
        those random values with real features; zeroed, the branch is at every input size the
        1×1 filter it was in training. At the training size the output is unchanged.
        """
        for rate in self.rates:
            if rate >= grid:
                weight = self.atrous(rate).weight
                centre = weight[..., 1, 1].clone()
                weight.zero_()
                weight[..., 1, 1] = centre

    def atrous(self, rate: int) -> nn.Conv2d:
        """The 3×3 convolution dilated by ``rate`` (the depthwise one of a separable branch)."""
        return next(
            module
            for module in self.modules()
            if isinstance(module, nn.Conv2d) and module.dilation == (rate, rate)
        )
