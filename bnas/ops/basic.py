"""Parameter-free and real-valued plumbing: skip, zero, pools, downsamples, stem and head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_family
from .common import check_stride, make_activation


class Zero(nn.Module):
    """Outputs zeros of the right shape: the 'no edge' op of DARTS-style cells."""

    def __init__(self, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.c_out, (h + s - 1) // s, (w + s - 1) // s)


class FactorizedReduce(nn.Module):
    """DARTS's reduction: ReLU, two stride-2 1x1 convs on offset grids, concat, BN.

    The offset path pads one row and column first, so odd sizes (5x5 -> 3x3) line up.
    At stride 1 it is a 1x1 conv + BN that changes the channel count.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.relu = nn.ReLU()
        if stride == 1:
            self.convs = nn.ModuleList([nn.Conv2d(c_in, c_out, 1, bias=False)])
        else:
            half = c_out // 2
            self.convs = nn.ModuleList([nn.Conv2d(c_in, half, 1, 2, bias=False), nn.Conv2d(c_in, c_out - half, 1, 2, bias=False)])
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        if self.stride == 1:
            return self.bn(self.convs[0](x))
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.convs[0](x), self.convs[1](shifted)], dim=1))


@register_family("skip_connect", binarize="real", description="identity; a factorized reduce at stride 2 (as DARTS)")
def skip_connect(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    check_stride(stride)
    if stride == 1:
        if C_in != C_out:
            raise ValueError(
                f"skip_connect needs C_out == C_in at stride 1 (got {C_in} -> {C_out}); use a conv unit or conv_downsample"
            )
        return nn.Identity()
    return FactorizedReduce(C_in, C_out, 2)


@register_family("zero", binarize="real", description="no connection: zeros of the output shape")
def zero(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    return Zero(C_out, check_stride(stride))


@register_family("factorized_reduce", binarize="real", description="ReLU + two offset 1x1 convs (stride 2) + BN (DARTS)")
def factorized_reduce(C_in: int, C_out: int, stride: int = 2) -> nn.Module:
    return FactorizedReduce(C_in, C_out, check_stride(stride))


@register_family("pool", binarize="real", description="max or average pooling (keeps channels)")
def pool(C_in: int, C_out: int, stride: int = 1, *, mode: str = "max", kernel: int = 3) -> nn.Module:
    check_stride(stride)
    if C_in != C_out:
        raise ValueError(f"{mode}_pool keeps the channel count (got {C_in} -> {C_out}); follow it with conv_downsample")
    if mode == "max":
        return nn.MaxPool2d(kernel, stride, kernel // 2)
    if mode == "avg":
        return nn.AvgPool2d(kernel, stride, kernel // 2, count_include_pad=False)
    raise ValueError(f"pool mode must be 'max' or 'avg', got {mode!r}")


@register_family("avgpool_downsample", binarize="real", description="avg-pool + real 1x1 conv + BN (Bi-Real shortcut)")
def avgpool_downsample(C_in: int, C_out: int, stride: int = 2) -> nn.Module:
    check_stride(stride)
    layers: list[nn.Module] = [nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)] if stride == 2 else []
    layers += [nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out)]
    return nn.Sequential(*layers)


@register_family("conv_downsample", binarize="real", description="real 1x1 conv (stride 1 or 2) + BN")
def conv_downsample(C_in: int, C_out: int, stride: int = 2) -> nn.Module:
    return nn.Sequential(nn.Conv2d(C_in, C_out, 1, check_stride(stride), bias=False), nn.BatchNorm2d(C_out))


@register_family("conv_bn", binarize="real", description="real conv + BN (+ activation): the stem")
def conv_bn(C_in: int, C_out: int, stride: int = 1, *, kernel: int = 3, activation: str = "none") -> nn.Module:
    check_stride(stride)
    return nn.Sequential(
        nn.Conv2d(C_in, C_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(C_out), make_activation(activation, C_out)
    )


class GlobalAvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


@register_family("global_avgpool", binarize="real", description="mean over H and W: (N, C, H, W) -> (N, C)")
def global_avgpool(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    if C_in != C_out:
        raise ValueError(f"global_avgpool keeps the channel count (got {C_in} -> {C_out})")
    return GlobalAvgPool()


@register_family("flatten", binarize="real", description="(N, C, H, W) -> (N, C*H*W)")
def flatten(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    return nn.Flatten()


@register_family("linear", binarize="real", description="real fully connected layer (optional dropout before it)")
def linear(C_in: int, C_out: int, stride: int = 1, *, bias: bool = True, dropout: float = 0.0) -> nn.Module:
    layer = nn.Linear(C_in, C_out, bias=bias)
    return nn.Sequential(nn.Dropout(dropout), layer) if dropout else layer
