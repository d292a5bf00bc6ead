"""The binary op families. Every one binarizes through ``BinaryConv2d`` / ``BinaryLinear``.

Layer orders: ``bn_conv_act`` is XNOR-Net's (BN -> sign -> binary conv -> activation);
``conv_bn_act`` is Bi-Real's and DARTS's (sign -> binary conv -> BN -> activation).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from ..binarize import BinarizeConfig, BinaryConv2d, BinaryLinear
from ..registry import register_family
from .basic import FactorizedReduce, avgpool_downsample
from .common import as_config, check_groups, check_stride, make_activation, same_padding

Binarize = BinarizeConfig | Mapping[str, Any] | str | None
ORDERS = ("bn_conv_act", "conv_bn_act")
REDUCTIONS = ("conv", "factorized", "avgpool")


def _check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    return order


def _shortcut(c_in: int, c_out: int, stride: int, reduction: str) -> nn.Module:
    """Identity where shapes allow it, else the chosen real-valued reduction."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if reduction == "factorized":
        return FactorizedReduce(c_in, c_out, stride)
    if reduction == "avgpool":
        return avgpool_downsample(c_in, c_out, stride)
    if reduction == "conv":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
    raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


class ConvUnit(nn.Module):
    """One binary conv with its BN, activation and optional shortcut."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        kernel: int,
        dilation: int,
        groups: int,
        order: str,
        shortcut: bool,
        reduction: str,
        activation: str,
        config: BinarizeConfig,
    ):
        super().__init__()
        check_stride(stride)
        check_groups(c_in, c_out, groups)
        self.order = _check_order(order)
        self.bn = nn.BatchNorm2d(c_in if order == "bn_conv_act" else c_out)
        self.conv = BinaryConv2d(c_in, c_out, kernel, stride, same_padding(kernel, dilation), dilation, groups, config=config)
        self.act = make_activation(activation, c_out)
        self.shortcut = _shortcut(c_in, c_out, stride, reduction) if shortcut else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(self.bn(x)) if self.order == "bn_conv_act" else self.bn(self.conv(x))
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
    groups: int = 1,
    order: str = "bn_conv_act",
    shortcut: bool = False,
    reduction: str = "conv",
    activation: str = "none",
    binarize: Binarize = None,
) -> nn.Module:
    return ConvUnit(
        C_in, C_out, stride, kernel=kernel, dilation=dilation, groups=groups, order=order, shortcut=shortcut,
        reduction=reduction, activation=activation, config=as_config(binarize),
    )


class ResNetBlock(nn.Module):
    """The basic block of two binary 3x3 convs.

    ``shortcut_per_conv`` gives each conv its own shortcut (Bi-Real's ResNet); otherwise one
    shortcut spans both convs (XNOR-Net's ResNet).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, order: str, reduction: str, activation: str,
                 shortcut_per_conv: bool, config: BinarizeConfig):
        super().__init__()
        common = dict(kernel=3, dilation=1, groups=1, order=order, reduction=reduction, config=config)
        self.per_conv = shortcut_per_conv
        self.conv1 = ConvUnit(c_in, c_out, stride, shortcut=shortcut_per_conv, activation=activation, **common)
        self.conv2 = ConvUnit(c_out, c_out, 1, shortcut=shortcut_per_conv, activation="none" if not shortcut_per_conv else activation, **common)
        self.shortcut = None if shortcut_per_conv else _shortcut(c_in, c_out, stride, reduction)
        self.act = make_activation(activation, c_out) if not shortcut_per_conv else nn.Identity()

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
    check_stride(stride)
    return ResNetBlock(C_in, C_out, stride, _check_order(order), reduction, activation, shortcut_per_conv, as_config(binarize))


@register_family("bireal_unit", description="Bi-Real unit: sign -> binary 3x3 conv -> BN, plus a real shortcut")
def bireal_unit(
    C_in: int, C_out: int, stride: int = 1, *, activation: str = "none", binarize: Binarize = "bireal"
) -> nn.Module:
    # Bi-Real Net's downsampling shortcut: avg-pool + real 1x1 conv + BN.
    return ConvUnit(
        C_in, C_out, stride, kernel=3, dilation=1, groups=1, order="conv_bn_act", shortcut=True,
        reduction="avgpool", activation=activation, config=as_config(binarize),
    )


class VGGBlock(nn.Module):
    """Binary 3x3 conv -> (max-pool 2 at stride 2) -> BN -> activation (BinaryNet / VGG-Small).

    The conv itself runs at stride 1 and the pool halves the map, as in VGG-Small.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, order: str, activation: str, config: BinarizeConfig):
        super().__init__()
        self.order = _check_order(order)
        self.bn = nn.BatchNorm2d(c_in if order == "bn_conv_act" else c_out)
        self.conv = BinaryConv2d(c_in, c_out, 3, 1, 1, config=config)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.act = make_activation(activation, c_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "bn_conv_act":
            return self.act(self.pool(self.conv(self.bn(x))))
        return self.act(self.bn(self.pool(self.conv(x))))


@register_family("vgg_block", description="binary 3x3 conv, max-pool at stride 2, BN, activation")
def vgg_block(
    C_in: int, C_out: int, stride: int = 1, *, order: str = "conv_bn_act", activation: str = "none", binarize: Binarize = None
) -> nn.Module:
    return VGGBlock(C_in, C_out, check_stride(stride), order, activation, as_config(binarize))


@register_family("nin_block", description="NIN unit: binary 3x3 conv then two binary 1x1 convs, each with BN")
def nin_block(C_in: int, C_out: int, stride: int = 1, *, activation: str = "none", binarize: Binarize = None) -> nn.Module:
    config = as_config(binarize)
    common = dict(dilation=1, groups=1, order="conv_bn_act", shortcut=False, reduction="conv", activation=activation, config=config)
    return nn.Sequential(
        ConvUnit(C_in, C_out, check_stride(stride), kernel=3, **common),
        ConvUnit(C_out, C_out, 1, kernel=1, **common),
        ConvUnit(C_out, C_out, 1, kernel=1, **common),
    )


@register_family("conv_pool", description="LeNet-5 unit: binary conv (valid) -> max-pool 2 -> BN -> activation")
def conv_pool(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    kernel: int = 5,
    padding: int = 0,
    activation: str = "none",
    binarize: Binarize = None,
) -> nn.Module:
    return nn.Sequential(
        BinaryConv2d(C_in, C_out, kernel, check_stride(stride), padding, config=as_config(binarize)),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.BatchNorm2d(C_out),
        make_activation(activation, C_out),
    )


@register_family("binary_dense", description="BinaryNet MLP layer: binary linear -> BN -> activation -> dropout")
def binary_dense(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    bn: bool = True,
    activation: str = "none",
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    binarize: Binarize = "binarynet",
) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
    layers.append(BinaryLinear(C_in, C_out, config=as_config(binarize)))
    if bn:
        layers.append(nn.BatchNorm1d(C_out))
    layers.append(make_activation(activation, C_out))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
