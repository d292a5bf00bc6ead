"""Fully connected layers on (N, F) inputs: the real ``linear`` head and BinaryNet's
``binary_linear``. Their C_in is F."""

from __future__ import annotations

import functools

from torch import Tensor, nn

from ..binarize import BinaryLinear
from ..registry import register_family
from .common import BINARYNET, Binarize, as_config, check_channels, check_dropout, check_stride, make_activation


def _expect_features(op: str, layer: nn.Linear, args: tuple[Tensor, ...]) -> None:
    """Forward pre-hook: reject inputs that are not (N, in_features).

    ``nn.Linear`` on (N, C, H, W) silently maps the last axis when W happens to equal F; a
    missing ``flatten`` or ``global_avgpool`` should be an error, not a wrong network. A hook
    keeps the layer a plain ``nn.Linear`` / ``BinaryLinear`` for the metrics and the export.
    """
    x = args[0]
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise RuntimeError(
            f"{op} expects (N, {layer.in_features}) inputs, got {tuple(x.shape)}; "
            "put flatten or global_avgpool before it, or fix its input width"
        )


def _checked(op: str, layer: nn.Linear) -> nn.Linear:
    layer.register_forward_pre_hook(functools.partial(_expect_features, op))
    return layer


@register_family("linear", binarize="real", description="real fully connected layer (optional dropout before it)")
def linear(C_in: int, C_out: int, stride: int = 1, *, bias: bool = True, dropout: float = 0.0) -> nn.Module:
    """Real ``nn.Linear(C_in, C_out)``; ``dropout`` applies to its input. The stride has
    nothing to act on; 1 and 2 are accepted alike."""
    check_channels("linear", C_in, C_out)
    check_stride(stride)
    layer = _checked("linear", nn.Linear(C_in, C_out, bias=bias))
    return nn.Sequential(nn.Dropout(dropout), layer) if check_dropout("dropout", dropout) else layer


@register_family(
    "binary_linear",
    binarize="binarynet",
    description="BinaryNet MLP layer: binary linear -> BN -> activation -> dropout",
)
def binary_linear(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    bn: bool = True,
    activation: str = "none",
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    binarize: Binarize = None,
) -> nn.Module:
    """BinaryNet's MLP layer (default binarization: binarynet, i.e. ste + sign).

    [dropout on the input] -> ``BinaryLinear`` -> BatchNorm1d (``bn``) -> activation ->
    [dropout]. For a first layer on real pixels pass ``binarize: {activation: none, ...}``.
    """
    check_channels("binary_linear", C_in, C_out)
    check_stride(stride)
    layers: list[nn.Module] = [nn.Dropout(input_dropout)] if check_dropout("input_dropout", input_dropout) else []
    layers.append(_checked("binary_linear", BinaryLinear(C_in, C_out, config=as_config(binarize, BINARYNET))))
    if bn:
        layers.append(nn.BatchNorm1d(C_out))
    layers.append(make_activation(activation, C_out))
    if check_dropout("dropout", dropout):
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
