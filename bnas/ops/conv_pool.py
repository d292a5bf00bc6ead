"""LeNet-5's binary conv-pool unit."""

from __future__ import annotations

from torch import nn

from ..binarize import BinaryConv2d
from ..registry import register_family
from .common import Binarize, as_config, check_channels, check_stride, make_activation


@register_family(
    "binary_conv_pool", binarize="xnor", description="LeNet-5 unit: binary 5x5 conv -> 2x2 max-pool -> BN -> activation"
)
def binary_conv_pool(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    kernel: int = 5,
    padding: int = 0,
    activation: str = "none",
    binarize: Binarize = None,
) -> nn.Module:
    """LeNet-5 conv-pool unit (default binarization: xnor).

    The conv is 'valid' by default (``padding: 0``), as in LeNet-5: 28 -> 24 -> pool 12. The
    output is ceil(((H + 2 * padding - kernel) // stride + 1) / 2).
    """
    check_channels("binary_conv_pool", C_in, C_out)
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"binary_conv_pool: kernel must be a positive integer, got {kernel!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"binary_conv_pool: padding must be a non-negative integer, got {padding!r}")
    return nn.Sequential(
        BinaryConv2d(C_in, C_out, kernel, check_stride(stride), padding, config=as_config(binarize)),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.BatchNorm2d(C_out),
        make_activation(activation, C_out),
    )
