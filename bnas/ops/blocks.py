"""Published binary blocks: the ResNet basic block, Bi-Real Net's unit, and the VGG block."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..binarize import BinarizeConfig, BinaryConv2d
from ..registry import register_family
from .common import BIREAL, Binarize, as_config, check_channels, check_order, check_stride, make_activation
from .conv_unit import ConvUnit
from .downsample import check_reduction, make_shortcut


class ResNetBlock(nn.Module):
    """The basic block of two binary 3x3 convs.

    One shortcut spans both convs (XNOR-Net's ResNet), or, with ``shortcut_per_conv``, each
    conv gets its own real-valued shortcut (Bi-Real Net's ResNet, which keeps the real-valued
    activations flowing around every binary conv). The first conv carries the stride.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        order: str,
        reduction: str,
        activation: str,
        shortcut_per_conv: bool,
        config: BinarizeConfig,
    ):
        super().__init__()
        unit: dict[str, Any] = dict(
            kernel=3, order=order, reduction=reduction, config=config, shortcut=shortcut_per_conv
        )
        # With one block shortcut the activation comes after the addition, once.
        inner_act = activation if shortcut_per_conv else "none"
        self.conv1 = ConvUnit(c_in, c_out, stride, activation=activation, **unit)
        self.conv2 = ConvUnit(c_out, c_out, 1, activation=inner_act, **unit)
        self.shortcut = None if shortcut_per_conv else make_shortcut(c_in, c_out, stride, reduction)
        self.act = nn.Identity() if shortcut_per_conv else make_activation(activation, c_out)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        if self.shortcut is not None:
            out = self.act(out + self.shortcut(x))
        return out


@register_family("resnet_block", description="basic block of two binary 3x3 convs with shortcut(s)")
def resnet_block(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    order: str = "bn_conv_act",
    reduction: str = "conv",
    activation: str = "none",
    shortcut_per_conv: bool = False,
    binarize: Binarize = None,
) -> nn.Module:
    """ResNet basic block (default binarization: xnor); ``reduction`` adapts the shortcut."""
    check_channels("resnet_block", C_in, C_out)
    check_stride(stride)
    return ResNetBlock(
        C_in,
        C_out,
        stride,
        order=check_order(order),
        reduction=check_reduction(reduction),
        activation=activation,
        shortcut_per_conv=shortcut_per_conv,
        config=as_config(binarize),
    )


@register_family(
    "bireal_block", binarize="bireal", description="Bi-Real unit: sign -> binary 3x3 conv -> BN + real shortcut"
)
def bireal_block(
    C_in: int, C_out: int, stride: int = 1, *, activation: str = "none", binarize: Binarize = None
) -> nn.Module:
    """Bi-Real Net's unit (default binarization: bireal).

    A real-valued shortcut around one binary conv: the identity, or, where the stride or the
    width changes, Bi-Real's downsample (2x2 avg-pool + real 1x1 conv + BN).
    """
    check_channels("bireal_block", C_in, C_out)
    return ConvUnit(
        C_in,
        C_out,
        check_stride(stride),
        kernel=3,
        order="conv_bn_act",
        shortcut=True,
        reduction="avgpool",
        activation=activation,
        config=as_config(binarize, BIREAL),
    )


VGG_DOWNSAMPLES = ("maxpool", "stride")


class VGGBlock(nn.Module):
    """A binary 3x3 conv with BN and activation; at stride 2 a 2x2 max-pool halves the map.

    The max-pool follows the conv, before BN, as in BinaryNet's and XNOR-Net's VGG-Small
    (conv -> pool -> BN -> act): pooling the conv output keeps the largest pre-BN response,
    and the conv runs at full resolution. ``downsample: stride`` gives a stride-2 conv instead.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        order: str,
        activation: str,
        downsample: str,
        config: BinarizeConfig,
    ):
        super().__init__()
        self.order = check_order(order)
        if downsample not in VGG_DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {', '.join(VGG_DOWNSAMPLES)}, got {downsample!r}")
        pooled = stride == 2 and downsample == "maxpool"
        self.bn = nn.BatchNorm2d(c_in if order == "bn_conv_act" else c_out)
        self.conv = BinaryConv2d(c_in, c_out, 3, 1 if pooled else stride, 1, config=config)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if pooled else nn.Identity()
        self.act = make_activation(activation, c_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "bn_conv_act":
            return self.act(self.pool(self.conv(self.bn(x))))
        return self.act(self.bn(self.pool(self.conv(x))))


@register_family("vgg_block", description="binary 3x3 conv (-> 2x2 max-pool at stride 2) -> BN -> activation")
def vgg_block(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    order: str = "conv_bn_act",
    activation: str = "none",
    downsample: str = "maxpool",
    binarize: Binarize = None,
) -> nn.Module:
    """VGG-Small block (default binarization: xnor)."""
    check_channels("vgg_block", C_in, C_out)
    return VGGBlock(
        C_in,
        C_out,
        check_stride(stride),
        order=order,
        activation=activation,
        downsample=downsample,
        config=as_config(binarize),
    )
