"""Network-in-Network unit: a binary k x k conv, then two binary 1x1 convs (the "mlpconv")."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import register_family
from .common import Binarize, as_config, check_channels, check_order, check_stride
from .conv_unit import ConvUnit


@register_family("nin", binarize="xnor", description="NIN unit: binary 3x3 conv then two binary 1x1 convs")
def nin(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    kernel: int = 3,
    order: str = "bn_conv_act",
    activation: str = "relu",
    binarize: Binarize = None,
) -> nn.Module:
    """NIN unit (default binarization: xnor).

    The defaults follow XNOR-Net's binary NIN for CIFAR-10: each conv is BN -> sign ->
    binary conv -> ReLU. The first conv carries the stride and the width change; the 1x1
    convs keep ``C_out``.
    """
    check_channels("nin", C_in, C_out)
    unit: dict[str, Any] = dict(
        order=check_order(order), shortcut=False, activation=activation, config=as_config(binarize)
    )
    return nn.Sequential(
        ConvUnit(C_in, C_out, check_stride(stride), kernel=kernel, **unit),
        ConvUnit(C_out, C_out, 1, kernel=1, **unit),
        ConvUnit(C_out, C_out, 1, kernel=1, **unit),
    )
