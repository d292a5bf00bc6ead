"""Real-valued first and last layers: the conv stem, global average pooling, flatten."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register_family
from .common import check_channels, check_kernel, check_same_channels, check_stride, make_activation


@register_family("conv_bn", binarize="real", description="real conv + BN (+ activation): the stem")
def conv_bn(
    C_in: int, C_out: int, stride: int = 1, *, kernel: int = 3, activation: str = "none", bias: bool = False
) -> nn.Module:
    """Real k x k conv ('same' padding) -> BN -> activation. Binary networks keep their first
    layer real: binarizing a 3-channel image loses too much (XNOR-Net, Bi-Real Net)."""
    check_channels("conv_bn", C_in, C_out)
    check_kernel(kernel)
    return nn.Sequential(
        nn.Conv2d(C_in, C_out, kernel, check_stride(stride), kernel // 2, bias=bias),
        nn.BatchNorm2d(C_out),
        make_activation(activation, C_out),
    )


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C): the mean over H and W."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


@register_family("global_avgpool", binarize="real", description="mean over H and W: (N, C, H, W) -> (N, C)")
def global_avgpool(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    """The stride has nothing to act on (the output has no H, W); 1 and 2 are accepted alike."""
    check_channels("global_avgpool", C_in, C_out)
    check_stride(stride)
    check_same_channels("global_avgpool", C_in, C_out, "follow it with linear to change the width")
    return GlobalAvgPool()


@register_family("flatten", binarize="real", description="(N, C, H, W) -> (N, C*H*W); ignores C_in and C_out")
def flatten(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    """The output width C*H*W depends on the input's size, so C_in and C_out are not checked;
    the builder reads the real width off the output."""
    check_stride(stride)
    return nn.Flatten()
