"""Separable, dilated and factorized convs: the ops of published DARTS-family cells.

Real ones follow DARTS's ``cnn/operations.py`` layer by layer (all convs bias-free), so a
network over them has DARTS's parameter count exactly:

- ``sep_conv``: twice ReLU -> depthwise k x k conv -> 1x1 conv -> BN; the first depthwise
  conv carries the stride, the last 1x1 conv the width change (DARTS's ``SepConv``).
- ``dil_conv``: once ReLU -> depthwise k x k conv, dilation 2 -> 1x1 conv -> BN (``DilConv``).
- ``conv_7x1_1x7``: ReLU -> (1, 7) conv, stride (1, s) -> (7, 1) conv, stride (s, 1) -> BN.

The binary family ``binary_sep_conv`` keeps that topology with binary convs. Each half is
sign -> binary depthwise k x k conv -> sign -> binary 1x1 conv -> BN: the sign of each binary
conv stands where DARTS has its ReLU, and no BN sits between the depthwise and the pointwise
conv, as in the real op.
"""

from __future__ import annotations

from torch import nn

from ..binarize import BinarizeConfig, BinaryConv2d
from ..registry import register_family
from .common import (
    GROUPS_DEPTHWISE,
    Binarize,
    as_config,
    check_channels,
    check_kernel,
    check_stride,
    make_activation,
    resolve_groups,
    same_padding,
)


def _check_repeats(op: str, repeats: int) -> int:
    if isinstance(repeats, bool) or repeats not in (1, 2):
        raise ValueError(f"{op}: repeats must be 1 (DARTS's DilConv) or 2 (DARTS's SepConv), got {repeats!r}")
    return repeats


def _real_half(c_in: int, c_out: int, kernel: int, stride: int, dilation: int, affine: bool) -> list[nn.Module]:
    depthwise = resolve_groups("sep_conv", c_in, c_in, GROUPS_DEPTHWISE)
    return [
        nn.ReLU(),
        nn.Conv2d(c_in, c_in, kernel, stride, same_padding(kernel, dilation), dilation, depthwise, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out, affine=affine),
    ]


@register_family(
    "sep_conv",
    binarize="real",
    description="DARTS SepConv: 2x (ReLU -> depthwise k x k -> 1x1 -> BN); repeats: 1 = DilConv",
)
def sep_conv(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    kernel: int = 3,
    dilation: int = 1,
    repeats: int = 2,
    affine: bool = True,
) -> nn.Module:
    """DARTS's ``SepConv`` (``repeats: 2``) or ``DilConv`` (``repeats: 1``, ``dilation: 2``).

    With two halves the first keeps C_in (DARTS's ``SepConv`` maps C_in -> C_in, then
    C_in -> C_out), so the parameter count is DARTS's at any pair of widths.
    """
    op = "sep_conv"
    check_channels(op, C_in, C_out)
    check_kernel(kernel, dilation)
    check_stride(stride)
    layers: list[nn.Module] = []
    if _check_repeats(op, repeats) == 2:
        layers += _real_half(C_in, C_in, kernel, stride, dilation, affine)
        stride = 1
    layers += _real_half(C_in, C_out, kernel, stride, dilation, affine)
    return nn.Sequential(*layers)


@register_family(
    "conv_7x1_1x7", binarize="real", description="DARTS conv_7x1_1x7: ReLU -> (1,k) conv -> (k,1) conv -> BN"
)
def conv_7x1_1x7(C_in: int, C_out: int, stride: int = 1, *, kernel: int = 7, affine: bool = True) -> nn.Module:
    """DARTS's factorized k x k conv; the first conv halves the width axis, the second the
    height axis, and the first carries the width change."""
    check_channels("conv_7x1_1x7", C_in, C_out)
    check_kernel(kernel)
    s = check_stride(stride)
    pad = kernel // 2
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(C_in, C_out, (1, kernel), stride=(1, s), padding=(0, pad), bias=False),
        nn.Conv2d(C_out, C_out, (kernel, 1), stride=(s, 1), padding=(pad, 0), bias=False),
        nn.BatchNorm2d(C_out, affine=affine),
    )


def _binary_half(
    c_in: int, c_out: int, kernel: int, stride: int, dilation: int, config: BinarizeConfig, activation: str
) -> list[nn.Module]:
    depthwise = resolve_groups("binary_sep_conv", c_in, c_in, GROUPS_DEPTHWISE)
    padding = same_padding(kernel, dilation)
    return [
        BinaryConv2d(c_in, c_in, kernel, stride, padding, dilation, depthwise, config=config),
        BinaryConv2d(c_in, c_out, 1, 1, 0, config=config),
        nn.BatchNorm2d(c_out),
        make_activation(activation, c_out),
    ]


@register_family(
    "binary_sep_conv",
    description="binary SepConv: 2x (sign -> binary depthwise k x k -> sign -> binary 1x1 -> BN); repeats: 1 = DilConv",
)
def binary_sep_conv(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    kernel: int = 3,
    dilation: int = 1,
    repeats: int = 2,
    activation: str = "none",
    binarize: Binarize = None,
) -> nn.Module:
    """Binary separable conv (default binarization: xnor), DARTS's topology over binary convs.

    ``activation`` follows each BN (``none``: the next sign is the only nonlinearity).
    """
    op = "binary_sep_conv"
    check_channels(op, C_in, C_out)
    check_kernel(kernel, dilation)
    check_stride(stride)
    config = as_config(binarize)
    layers: list[nn.Module] = []
    if _check_repeats(op, repeats) == 2:
        layers += _binary_half(C_in, C_in, kernel, stride, dilation, config, activation)
        stride = 1
    layers += _binary_half(C_in, C_out, kernel, stride, dilation, config, activation)
    return nn.Sequential(*layers)
