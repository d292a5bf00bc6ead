"""What a cell does to its inputs before its edges see them, and to its k-1 input for a residual.

A cell works at one width and the resolution of its k-1 input; its inputs (cells k-2 and
k-1) may arrive at another width, and the k-2 input at twice the resolution just after a
reduction. How they are aligned is the cell's ``preprocess`` (``bnas.genotype.Preprocess``):

* ``real``: the identity where an input fits, else a real 1x1 conv + BN, or DARTS's
  factorized reduce from twice the resolution.
* ``darts``: DARTS's ``ReLUConvBN`` (ReLU -> real 1x1 conv -> BN) on every input, fitting or
  not, and its factorized reduce from twice the resolution: DARTS's parameter count exactly.
* ``binary``: BN -> sign -> binary 1x1 conv (-> BN) (-> activation) on every input, as binary
  NAS papers do; from twice the resolution a binary factorized reduce (EBNAS) or a binary 3x3
  stride-2 conv (Kim et al. 2020). Its multiply-accumulates are BOPs, not FLOPs.
* ``identity``: nothing; an input that does not fit is an error.

The residual of a cell (``output.residual``) adds the k-1 input to the output; on a reduction
cell it goes through BN -> a real 2x2 stride-2 conv with bias, as Kim et al. project it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..binarize import BinarizeConfig, BinaryConv2d
from ..registry import register_family
from .common import XNOR, Binarize, as_config, check_channels, check_stride, make_activation
from .conv_unit import ConvUnit
from .downsample import conv_downsample, factorized_reduce

__all__ = ["BinaryFactorizedReduce", "ResidualProjection", "make_cell_input", "make_residual"]

Shape = tuple[int, ...]


class BinaryFactorizedReduce(nn.Module):
    """BN -> sign -> two binary 1x1 stride-2 convs on grids offset by one pixel -> concat (-> BN)
    (-> activation): DARTS's factorized reduce over binary convs (EBNAS's cell preprocessing).

    The offset path repeats the last row and column on odd maps, so both paths give
    ceil(H / 2) rows (5x5 -> 3x3); on even maps the repeated pixels are never sampled and the
    op is the source's exactly. Repeating (not zero padding) keeps the padded pixel a real
    activation whose sign is the one beside it, so the binary convs see only +-1.
    """

    def __init__(self, c_in: int, c_out: int, bn_after: bool, activation: str, config: BinarizeConfig):
        super().__init__()
        half = c_out // 2
        self.bn = nn.BatchNorm2d(c_in)
        self.conv_even = BinaryConv2d(c_in, half, 1, 2, 0, config=config)
        self.conv_odd = BinaryConv2d(c_in, c_out - half, 1, 2, 0, config=config)
        self.bn_out = nn.BatchNorm2d(c_out) if bn_after else nn.Identity()
        self.act = make_activation(activation, c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x)
        shifted = F.pad(x, (0, 1, 0, 1), mode="replicate")[:, :, 1:, 1:]
        return self.act(self.bn_out(torch.cat([self.conv_even(x), self.conv_odd(shifted)], dim=1)))


@register_family(
    "binary_factorized_reduce",
    description="BN -> sign -> two offset binary 1x1 convs at stride 2 -> concat -> BN (binary factorized reduce)",
)
def binary_factorized_reduce(
    C_in: int,
    C_out: int,
    stride: int = 2,
    *,
    bn_after: bool = True,
    activation: str = "none",
    binarize: Binarize = None,
) -> nn.Module:
    """Binary factorized reduce (default binarization: xnor). At stride 1 there is nothing to
    offset: it is one binary 1x1 conv unit (BN -> sign -> conv (-> BN) (-> activation)), as
    the real factorized reduce is a 1x1 conv + BN at stride 1."""
    check_channels("binary_factorized_reduce", C_in, C_out)
    config = as_config(binarize, XNOR)
    if check_stride(stride) == 1:
        return _binary_unit(C_in, C_out, 1, 1, bn_after, activation, config)
    if C_out < 2:
        raise ValueError(f"binary_factorized_reduce splits C_out over two paths and needs C_out >= 2 (got {C_out})")
    return BinaryFactorizedReduce(C_in, C_out, bn_after, activation, config)


class ReluConvBN(nn.Sequential):
    """DARTS's ``ReLUConvBN`` with a 1x1 conv: the ``darts`` preprocessing of a cell input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def _binary_unit(
    c_in: int, c_out: int, kernel: int, stride: int, bn_after: bool, activation: str, binarize: Binarize
) -> nn.Module:
    return ConvUnit(
        c_in,
        c_out,
        stride,
        kernel=kernel,
        order="bn_conv_bn_act" if bn_after else "bn_conv_act",
        activation=activation,
        op="binary cell preprocessing",
        config=as_config(binarize, XNOR),
    )


def make_cell_input(
    kind: str,
    shape: Shape,
    target: Shape,
    *,
    reduce: str = "factorized",
    activation: str = "none",
    bn_after: bool = True,
    binarize: Binarize = None,
) -> nn.Module:
    """The module that brings one cell input of ``shape`` (C, H, W) to ``target`` (the cell's
    width and its k-1 input's resolution); ``reduce``, ``activation``, ``bn_after`` and
    ``binarize`` are the options of the ``binary`` kind. A ValueError says why an input cannot
    be aligned."""
    c_in, c_out = shape[0], target[0]
    if shape[1:] != target[1:] and -(-shape[1] // 2) != target[1]:
        raise ValueError(
            f"an input at {shape[1]}x{shape[2]} cannot be brought to the cell's {target[1]}x{target[2]}: "
            "cell inputs may be at most one reduction apart"
        )
    halve = shape[1:] != target[1:]
    if kind == "identity":
        if halve or c_in != c_out:
            raise ValueError(
                f"preprocess: identity needs the input to fit the cell ({c_in}x{shape[1]}x{shape[2]} given, the cell "
                f"works at {c_out}x{target[1]}x{target[2]}); use preprocess: binary, real or darts"
            )
        return nn.Identity()
    if kind == "real":
        if halve:
            return factorized_reduce(c_in, c_out, 2)
        return nn.Identity() if c_in == c_out else conv_downsample(c_in, c_out, 1)
    if kind == "darts":
        return factorized_reduce(c_in, c_out, 2) if halve else ReluConvBN(c_in, c_out)
    if kind == "binary":
        if not halve:
            return _binary_unit(c_in, c_out, 1, 1, bn_after, activation, binarize)
        if reduce == "conv3x3":
            return _binary_unit(c_in, c_out, 3, 2, bn_after, activation, binarize)
        return binary_factorized_reduce(c_in, c_out, 2, bn_after=bn_after, activation=activation, binarize=binarize)
    raise ValueError(f"unknown preprocess kind {kind!r}; expected real, darts, binary or identity")


class ResidualProjection(nn.Module):
    """BN -> real 2x2 stride-2 conv with bias: Kim et al.'s residual into a reduction cell.

    An odd map is padded by one zero row and column first, so the result has ceil(H / 2)
    rows, like the cell's other stride-2 paths.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x)
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        return self.conv(x)


def make_residual(shape: Shape, out_shape: Shape) -> nn.Module:
    """The path that adds a cell's k-1 input (``shape``) to its output (``out_shape``)."""
    if shape[1:] == out_shape[1:]:
        if shape[0] != out_shape[0]:
            raise ValueError(
                f"residual: true adds the k-1 input ({shape[0]} channels) to the cell's output ({out_shape[0]} "
                "channels) at the same resolution, so the widths must match; set residual: false on this cell "
                "(Kim et al. leave it off the first cell, whose input is the stem)"
            )
        return nn.Identity()
    if -(-shape[1] // 2) != out_shape[1] or -(-shape[2] // 2) != out_shape[2]:
        raise ValueError(
            f"residual: true cannot bring the k-1 input from {shape[1]}x{shape[2]} to the output's "
            f"{out_shape[1]}x{out_shape[2]}"
        )
    return ResidualProjection(shape[0], out_shape[0])
