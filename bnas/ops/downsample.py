"""Downsamples: ops that change the resolution and/or the width on a shortcut or between stages.

``avgpool_downsample`` (Bi-Real Net's shortcut), ``factorized_reduce`` (DARTS),
``conv_downsample`` (a real 1x1 conv, ResNet's option B) and ``binary_conv_downsample``
(its binary counterpart). At stride 1 each is just its channel-changing part. All of them
take odd sizes: a stride-2 op maps H to ceil(H / 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..binarize import BinaryConv2d
from ..registry import register_family
from .common import XNOR, Binarize, as_config, check_channels, check_stride, make_activation

REDUCTIONS = ("conv", "factorized", "avgpool", "pool")


class FactorizedReduce(nn.Module):
    """DARTS's reduction: (ReLU), two stride-2 1x1 convs on grids offset by one pixel, concat, BN.

    The offset path pads one row and column at the bottom/right before shifting, so both paths
    give ceil(H / 2) rows for odd H too (5x5 -> 3x3), where DARTS's ``x[:, :, 1:, 1:]`` would
    give 2x2 and fail to concatenate. At stride 1 it is a 1x1 conv + BN.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 2, relu: bool = True):
        super().__init__()
        self.stride = stride
        self.relu = nn.ReLU() if relu else nn.Identity()
        if stride == 1:
            self.convs = nn.ModuleList([nn.Conv2d(c_in, c_out, 1, bias=False)])
        else:
            half = c_out // 2
            self.convs = nn.ModuleList(
                [nn.Conv2d(c_in, half, 1, 2, bias=False), nn.Conv2d(c_in, c_out - half, 1, 2, bias=False)]
            )
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        if self.stride == 1:
            return self.bn(self.convs[0](x))
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.convs[0](x), self.convs[1](shifted)], dim=1))


@register_family(
    "factorized_reduce", binarize="real", description="(ReLU) + two offset 1x1 convs at stride 2 + BN (DARTS)"
)
def factorized_reduce(C_in: int, C_out: int, stride: int = 2, *, relu: bool = True) -> nn.Module:
    check_channels("factorized_reduce", C_in, C_out)
    check_stride(stride)
    if stride == 2 and C_out < 2:
        raise ValueError(
            f"factorized_reduce at stride 2 splits C_out over two paths and needs C_out >= 2 (got {C_out})"
        )
    return FactorizedReduce(C_in, C_out, stride, relu=relu)


@register_family(
    "avgpool_downsample", binarize="real", description="2x2 avg-pool + real 1x1 conv + BN (Bi-Real shortcut)"
)
def avgpool_downsample(C_in: int, C_out: int, stride: int = 2) -> nn.Module:
    check_channels("avgpool_downsample", C_in, C_out)
    layers: list[nn.Module] = []
    if check_stride(stride) == 2:
        # ceil_mode with count_include_pad=False averages only the real pixels of an edge window.
        layers.append(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))
    layers += [nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out)]
    return nn.Sequential(*layers)


@register_family("conv_downsample", binarize="real", description="real 1x1 conv (stride 1 or 2) + BN")
def conv_downsample(C_in: int, C_out: int, stride: int = 2) -> nn.Module:
    check_channels("conv_downsample", C_in, C_out)
    return nn.Sequential(nn.Conv2d(C_in, C_out, 1, check_stride(stride), bias=False), nn.BatchNorm2d(C_out))


@register_family("binary_conv_downsample", binarize="xnor", description="sign -> binary 1x1 conv (stride 1 or 2) -> BN")
def binary_conv_downsample(
    C_in: int, C_out: int, stride: int = 2, *, activation: str = "none", binarize: Binarize = None
) -> nn.Module:
    check_channels("binary_conv_downsample", C_in, C_out)
    return nn.Sequential(
        BinaryConv2d(C_in, C_out, 1, check_stride(stride), 0, config=as_config(binarize, XNOR)),
        nn.BatchNorm2d(C_out),
        make_activation(activation, C_out),
    )


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return reduction


def make_shortcut(c_in: int, c_out: int, stride: int, reduction: str) -> nn.Module:
    """A real-valued shortcut: the identity where shapes allow, else the chosen reduction.

    ``conv``: 1x1 conv + BN (ResNet); ``factorized``: DARTS's factorized reduce;
    ``avgpool``: avg-pool + 1x1 conv + BN (Bi-Real Net); ``pool``: a parameter-free 2x2
    average pool, which cannot change the width (EBNAS).
    """
    check_reduction(reduction)
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if reduction == "pool":
        if c_in != c_out:
            raise ValueError(
                f"reduction: pool has no weights and keeps the width (got {c_in} -> {c_out}); "
                "use reduction: avgpool, conv or factorized to change it"
            )
        # ceil_mode with count_include_pad=False: odd maps give ceil(H / 2), like every stride-2 op
        return nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    if reduction == "factorized":
        return factorized_reduce(c_in, c_out, stride)
    if reduction == "avgpool":
        return avgpool_downsample(c_in, c_out, stride)
    return conv_downsample(c_in, c_out, stride)
