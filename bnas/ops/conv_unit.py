"""The binary conv unit: one ``BinaryConv2d`` with its BN, optional shortcut and activation.

Layer orders: ``bn_conv_act`` is XNOR-Net's (BN -> sign -> binary conv -> activation);
``conv_bn_act`` is Bi-Real Net's and DARTS's (sign -> binary conv -> BN -> activation);
``bn_conv_bn_act`` has both BNs (BN -> sign -> binary conv -> BN -> activation: EBNAS). The
sign is the conv's own activation quantizer, so it always sits right before the conv. With a
shortcut the activation comes after the addition (ReActNet puts RPReLU there).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..binarize import BinarizeConfig, BinaryConv2d
from ..registry import register_family
from .common import (
    Binarize,
    as_config,
    check_channels,
    check_kernel,
    check_order,
    check_stride,
    make_activation,
    resolve_groups,
    same_padding,
)
from .downsample import check_reduction, make_shortcut


class ConvUnit(nn.Module):
    """One binary conv with its BN, activation and optional real-valued shortcut."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        kernel: int = 3,
        dilation: int = 1,
        groups: int | str = 1,
        order: str = "bn_conv_act",
        shortcut: bool = False,
        reduction: str = "conv",
        activation: str = "none",
        op: str = "conv_unit",
        config: BinarizeConfig,
    ):
        super().__init__()
        check_stride(stride)
        check_kernel(kernel, dilation)
        groups = resolve_groups(op, c_in, c_out, groups)
        self.order = check_order(order)
        check_reduction(reduction)
        self.bn = nn.BatchNorm2d(c_in if order != "conv_bn_act" else c_out)
        self.conv = BinaryConv2d(
            c_in, c_out, kernel, stride, same_padding(kernel, dilation), dilation, groups, config=config
        )
        # EBNAS's order normalises both sides of the conv: the BN before it sets the sign's threshold.
        self.bn_out = nn.BatchNorm2d(c_out) if order == "bn_conv_bn_act" else None
        self.shortcut = make_shortcut(c_in, c_out, stride, reduction) if shortcut else None
        self.act = make_activation(activation, c_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "conv_bn_act":
            out = self.bn(self.conv(x))
        else:
            out = self.conv(self.bn(x))
            if self.bn_out is not None:
                out = self.bn_out(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)


@register_family("conv_unit", description="binary conv unit: order, kernel, dilation, groups, shortcut, activation")
def conv_unit(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    kernel: int = 3,
    dilation: int = 1,
    groups: int | str = 1,
    order: str = "bn_conv_act",
    shortcut: bool = False,
    reduction: str = "conv",
    activation: str = "none",
    binarize: Binarize = None,
) -> nn.Module:
    """Binary conv unit (default binarization: xnor).

    ``shortcut``: add a real-valued shortcut; it is the identity at stride 1 with equal
    widths, else ``reduction`` adapts it (``conv``: 1x1 conv + BN, ``factorized``: DARTS's
    factorized reduce, ``avgpool``: Bi-Real's avg-pool + 1x1 conv + BN, ``pool``: EBNAS's
    parameter-free 2x2 average pool, widths equal). ``groups``: an
    integer that must divide both widths, or ``depthwise`` (groups = C_in at whatever width
    the op is built).
    """
    check_channels("conv_unit", C_in, C_out)
    return ConvUnit(
        C_in,
        C_out,
        stride,
        kernel=kernel,
        dilation=dilation,
        groups=groups,
        order=order,
        shortcut=shortcut,
        reduction=reduction,
        activation=activation,
        config=as_config(binarize),
    )
