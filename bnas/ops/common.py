"""Pieces shared by the op families: binarize-config coercion, activations, channel checks."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..binarize import BinarizeConfig

DEFAULT_BINARIZE = BinarizeConfig(activation="ste", weight="xnor")
ACTIVATIONS = ("none", "relu", "prelu", "rprelu", "hardtanh")


def as_config(value: BinarizeConfig | Mapping[str, Any] | str | None, default: BinarizeConfig = DEFAULT_BINARIZE) -> BinarizeConfig:
    """Accept a ``BinarizeConfig``, a mapping of its fields, or a catalog name (``xnor``)."""
    if value is None:
        return default
    if isinstance(value, BinarizeConfig):
        return value
    if isinstance(value, str):
        from ..registry import BINARIZE_PRESETS, get_spec

        get_spec("skip_connect")  # make sure the catalog (and its binarize presets) is loaded
        if value not in BINARIZE_PRESETS:
            raise ValueError(f"unknown binarization {value!r}; the catalog defines {', '.join(sorted(BINARIZE_PRESETS))}")
        return BINARIZE_PRESETS[value]
    if isinstance(value, Mapping):
        return BinarizeConfig.from_dict(value)
    raise TypeError(f"binarize must be a name, a mapping or a BinarizeConfig, got {type(value).__name__}")


class RPReLU(nn.Module):
    """ReActNet's RPReLU: a learnable shift, PReLU, and another shift, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.prelu = nn.PReLU(channels, init=0.25)
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.prelu(x - self.shift_in.view(shape)) + self.shift_out.view(shape)


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
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    return stride


def check_groups(c_in: int, c_out: int, groups: int) -> None:
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide both C_in={c_in} and C_out={c_out}")


def same_padding(kernel: int, dilation: int) -> int:
    return dilation * (kernel - 1) // 2
