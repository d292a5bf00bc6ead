"""Pieces shared by the op families: binarize-config coercion, activations, argument checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..binarize import BinarizeConfig, named_binarization
from ..registry import ensure_catalog

# The binarizations the families default to. Defined here, not looked up in the catalog, so a
# user catalog that redefines ``xnor`` cannot change what an op built without options means.
XNOR = BinarizeConfig(activation="ste", weight="xnor")
BIREAL = BinarizeConfig(activation="approx_sign", weight="bireal")
BINARYNET = BinarizeConfig(activation="ste", weight="sign")

Binarize = BinarizeConfig | Mapping[str, Any] | str | None
ACTIVATIONS = ("none", "relu", "prelu", "rprelu", "hardtanh")
ORDERS = ("bn_conv_act", "conv_bn_act", "bn_conv_bn_act")


def as_config(value: Binarize, default: BinarizeConfig = XNOR) -> BinarizeConfig:
    """Accept a ``BinarizeConfig``, a mapping of its fields, or a catalog name (``xnor``).

    A mapping is read, never changed; the result is frozen, so layers cannot share state.
    """
    if value is None:
        return default
    if isinstance(value, BinarizeConfig):
        return value
    if isinstance(value, str):
        ensure_catalog()  # the shipped catalog defines the named binarizations
        return named_binarization(value)
    if isinstance(value, Mapping):
        return BinarizeConfig.from_dict(dict(value))
    raise TypeError(f"binarize must be a catalog name, a mapping or a BinarizeConfig, got {type(value).__name__}")


class RPReLU(nn.Module):
    """ReActNet's RPReLU: per channel, shift, PReLU, shift.

    The PReLU slope lives here rather than in a child ``nn.PReLU`` so the module is one leaf
    and the metrics count its three parameter vectors together.
    """

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), init))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return rprelu(x, self.shift_in, self.slope, self.shift_out)


def rprelu(x: Tensor, shift_in: Tensor, slope: Tensor, shift_out: Tensor) -> Tensor:
    """RPReLU of ``x`` (channels in dimension 1) with these per-channel parameters: the float
    ops, in this order, that the packed kernels' epilogue makes too."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x - shift_in.view(shape)
    y = torch.where(y >= 0, y, slope.view(shape) * y)
    return y + shift_out.view(shape)


def make_activation(name: str, channels: int) -> nn.Module:
    """The real-valued activation applied after a unit (``none`` is the identity)."""
    if name == "none":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(channels)
    if name == "rprelu":
        return RPReLU(channels)
    if name == "hardtanh":
        return nn.Hardtanh()
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def check_stride(stride: int) -> int:
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    return stride


def check_channels(op: str, c_in: int, c_out: int) -> None:
    for label, value in (("C_in", c_in), ("C_out", c_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {label} must be a positive integer, got {value!r}")


def check_same_channels(op: str, c_in: int, c_out: int, hint: str) -> None:
    """Ops that cannot change the channel count say so, and what to use instead."""
    if c_in != c_out:
        raise ValueError(f"{op} keeps the channel count (got {c_in} -> {c_out}); {hint}")


def check_kernel(kernel: int, dilation: int = 1) -> None:
    # "Same" padding only exists for odd kernels; an even one would silently shift the map.
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd positive integer (1, 3, 5, ...), got {kernel!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")


GROUPS_DEPTHWISE = "depthwise"


def resolve_groups(op: str, c_in: int, c_out: int, groups: int | str) -> int:
    """The conv's group count; ``depthwise`` follows the width (groups = C_in).

    A fixed integer is kept as written, so a cell reused at a width it does not divide is an
    error here rather than a silently different conv; ``depthwise`` stays depthwise at any width.
    """
    if groups == GROUPS_DEPTHWISE:
        if c_out % c_in:
            raise ValueError(
                f"{op}: groups: depthwise needs C_out a multiple of C_in (got {c_in} -> {c_out}); "
                "change the width, or give an integer groups that divides both"
            )
        return c_in
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive integer or 'depthwise', got {groups!r}")
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"{op}: groups={groups} must divide both C_in={c_in} and C_out={c_out}; "
            "use groups: depthwise for a depthwise conv that follows the width"
        )
    return groups


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    return order


def check_dropout(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def same_padding(kernel: int, dilation: int) -> int:
    return dilation * (kernel - 1) // 2
