"""The ops of published DARTS-family cells: DARTS's separable, dilated and factorized convs
with DARTS's exact layer sequences and parameter counts, their binary twins, ``groups:
depthwise``, the BN / ReLU / PReLU ops, SNAS's pool + BN, EBNAS's average-pool shortcut, and
DARTS's ``none``. Every count is checked against a hand computation in the comment beside it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnas.binarize import BinaryConv2d, binary_layers
from bnas.ops.basic import Zero
from bnas.registry import build_op, get_spec


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# (op, C_in, C_out, parameters). Depthwise k x k conv: C * k^2; 1x1 conv: C_in * C_out;
# BN(affine): 2 * C. All convs bias-free, as DARTS's cnn/operations.py.
EXACT_COUNTS = [
    # sep_conv_3x3, C=16: 2 halves x (16*9 + 16*16 + 2*16) = 2 x (144 + 256 + 32) = 864
    ("sep_conv_3x3", 16, 16, 864),
    # sep_conv_5x5, C=16: 2 x (16*25 + 256 + 32) = 2 x 688 = 1376
    ("sep_conv_5x5", 16, 16, 1376),
    # sep_conv_7x7, C=16: 2 x (16*49 + 256 + 32) = 2 x 1072 = 2144
    ("sep_conv_7x7", 16, 16, 2144),
    # sep_conv_3x3, 8 -> 16: (8*9 + 8*8 + 2*8) + (8*9 + 8*16 + 2*16) = 152 + 232 = 384
    ("sep_conv_3x3", 8, 16, 384),
    # dil_conv_3x3, C=16: 16*9 + 16*16 + 2*16 = 432
    ("dil_conv_3x3", 16, 16, 432),
    # dil_conv_5x5, C=16: 16*25 + 16*16 + 2*16 = 688
    ("dil_conv_5x5", 16, 16, 688),
    # conv_7x1_1x7, C=16: 16*16*7 (1x7) + 16*16*7 (7x1) + 2*16 = 1792 + 1792 + 32 = 3616
    ("conv_7x1_1x7", 16, 16, 3616),
    # DARTS's C=36 cells: sep_conv_3x3 = 2 x (36*9 + 36*36 + 72) = 2 x 1692 = 3384
    ("sep_conv_3x3", 36, 36, 3384),
    # the binary twins: the same layers, so the same latent parameter count
    ("binary_sep_conv_3x3", 16, 16, 864),
    ("binary_sep_conv_5x5", 16, 16, 1376),
    ("binary_sep_conv_7x7", 16, 16, 2144),
    ("binary_dil_sep_conv_3x3", 16, 16, 432),
    ("binary_dil_sep_conv_5x5", 16, 16, 688),
    # bn: 2 * 16 = 32; relu: 0; prelu: one slope per channel = 16
    ("bn", 16, 16, 32),
    ("relu", 16, 16, 0),
    ("prelu", 16, 16, 16),
    # SNAS's pool + BN: BN without affine parameters, so 0; EBNAS's shortcut has no weights
    ("avg_pool_3x3_bn", 16, 16, 0),
    ("max_pool_3x3_bn", 16, 16, 0),
    ("avgpool_shortcut", 16, 16, 0),
    ("none", 16, 16, 0),
]


@pytest.mark.parametrize("name,c_in,c_out,expected", EXACT_COUNTS)
def test_parameter_counts_equal_the_hand_computation(name: str, c_in: int, c_out: int, expected: int) -> None:
    assert n_params(build_op(name, c_in, c_out, 1)) == expected
    if name not in {"bn", "relu", "prelu"}:  # a stride changes no weight shape
        assert n_params(build_op(name, c_in, c_out, 2)) == expected


def test_sep_conv_is_dartss_layer_sequence() -> None:
    op = build_op("sep_conv_3x3", 8, 16, 2)
    kinds = [type(m).__name__ for m in op]
    assert kinds == ["ReLU", "Conv2d", "Conv2d", "BatchNorm2d"] * 2
    dw1, pw1, dw2, pw2 = (m for m in op if isinstance(m, nn.Conv2d))
    assert (dw1.groups, dw1.stride, dw1.padding, dw1.in_channels, dw1.out_channels) == (8, (2, 2), (1, 1), 8, 8)
    assert (pw1.kernel_size, pw1.out_channels) == ((1, 1), 8)
    assert (dw2.groups, dw2.stride) == (8, (1, 1))
    assert (pw2.in_channels, pw2.out_channels) == (8, 16)
    assert all(c.bias is None for c in (dw1, pw1, dw2, pw2))
    dil = build_op("dil_conv_5x5", 8, 8, 1)
    assert [type(m).__name__ for m in dil] == ["ReLU", "Conv2d", "Conv2d", "BatchNorm2d"]
    assert (dil[1].dilation, dil[1].padding, dil[1].groups) == ((2, 2), (4, 4), 8)
    fac = build_op("conv_7x1_1x7", 8, 8, 2)
    assert [type(m).__name__ for m in fac] == ["ReLU", "Conv2d", "Conv2d", "BatchNorm2d"]
    assert (fac[1].kernel_size, fac[1].stride, fac[1].padding) == ((1, 7), (1, 2), (0, 3))
    assert (fac[2].kernel_size, fac[2].stride, fac[2].padding) == ((7, 1), (2, 1), (3, 0))


DARTS_OPS = [
    "sep_conv_3x3",
    "sep_conv_5x5",
    "sep_conv_7x7",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "conv_7x1_1x7",
    "binary_sep_conv_3x3",
    "binary_sep_conv_5x5",
    "binary_sep_conv_7x7",
    "binary_dil_sep_conv_3x3",
    "binary_dil_sep_conv_5x5",
    "avg_pool_3x3_bn",
    "max_pool_3x3_bn",
    "avgpool_shortcut",
    "none",
]


@pytest.mark.parametrize("name", DARTS_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_output_shapes(name: str, stride: int) -> None:
    c_out = 8 if name in {"avg_pool_3x3_bn", "max_pool_3x3_bn", "avgpool_shortcut"} else 16
    op = build_op(name, 8, c_out, stride)
    for h, w in [(7, 5), (8, 8)]:
        out = op(torch.randn(2, 8, h, w))
        assert out.shape == (2, c_out, math.ceil(h / stride), math.ceil(w / stride)), (name, stride, h, w)


@pytest.mark.parametrize("name", ["bn", "relu", "prelu"])
def test_pointwise_ops_keep_the_map_and_refuse_to_downsample(name: str) -> None:
    assert build_op(name, 8, 8, 1)(torch.randn(2, 8, 5, 7)).shape == (2, 8, 5, 7)
    with pytest.raises(ValueError, match=f"{name} cannot downsample"):
        build_op(name, 8, 8, 2)
    with pytest.raises(ValueError, match=rf"{name} keeps the channel count \(got 8 -> 16\)"):
        build_op(name, 8, 16, 1)


def test_avgpool_shortcut_is_identity_then_a_2x2_average() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert torch.equal(build_op("avgpool_shortcut", 3, 3, 1)(x), x)
    out = build_op("avgpool_shortcut", 3, 3, 2)(x)
    assert out.shape == (2, 3, 3, 3)
    assert out[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 4
    assert out[0, 0, 2, 2] == 24  # the edge window holds one real pixel: its value, not a quarter of it
    with pytest.raises(ValueError, match=r"avgpool_shortcut keeps the channel count \(got 3 -> 6\)"):
        build_op("avgpool_shortcut", 3, 6, 2)


def test_pool_bn_is_the_pool_then_a_bn_without_affine() -> None:
    op = build_op("avg_pool_3x3_bn", 4, 4, 2)
    pool, bn = op
    assert isinstance(pool, nn.AvgPool2d) and isinstance(bn, nn.BatchNorm2d) and not bn.affine
    x = torch.randn(2, 4, 6, 6)
    op.eval()
    expected = build_op("avg_pool_3x3", 4, 4, 2)(x) / math.sqrt(1 + bn.eps)  # fresh running stats
    assert torch.allclose(op(x), expected, atol=1e-6)


def test_none_builds_zero() -> None:
    assert get_spec("none").family == "zero"
    op = build_op("none", 8, 16, 2)
    assert isinstance(op, Zero)
    out = op(torch.randn(2, 8, 5, 5))
    assert out.shape == (2, 16, 3, 3) and not out.any()


def test_depthwise_groups_follow_the_width() -> None:
    for width in (8, 12):
        unit = build_op("binary_conv_3x3", width, width, 1, groups="depthwise")
        conv = next(binary_layers(unit))
        assert conv.groups == width
        assert conv.weight.numel() == width * 9  # one 3x3 filter per channel
        sep = build_op("binary_sep_conv_3x3", width, width, 1)
        assert [c.groups for c in binary_layers(sep)] == [width, 1, width, 1]
        real = build_op("sep_conv_3x3", width, width, 1)
        assert [c.groups for c in real if isinstance(c, nn.Conv2d)] == [width, 1, width, 1]
    # A depthwise multiplier: C_out a multiple of C_in.
    assert next(binary_layers(build_op("binary_conv_3x3", 8, 16, 1, groups="depthwise"))).groups == 8


def test_a_fixed_group_that_stops_dividing_the_width_is_an_error() -> None:
    assert next(binary_layers(build_op("binary_conv_3x3", 8, 8, 1, groups=8))).groups == 8
    with pytest.raises(ValueError) as info:
        build_op("binary_conv_3x3", 12, 12, 1, groups=8)
    assert "conv_unit: groups=8 must divide both C_in=12 and C_out=12; use groups: depthwise" in str(info.value)
    with pytest.raises(ValueError, match=r"groups: depthwise needs C_out a multiple of C_in \(got 8 -> 12\)"):
        build_op("binary_conv_3x3", 8, 12, 1, groups="depthwise")
    with pytest.raises(ValueError, match="groups must be a positive integer or 'depthwise', got 'dw'"):
        build_op("binary_conv_3x3", 8, 8, 1, groups="dw")


BINARY_SEPARABLE = [
    "binary_sep_conv_3x3",
    "binary_sep_conv_5x5",
    "binary_sep_conv_7x7",
    "binary_dil_sep_conv_3x3",
    "binary_dil_sep_conv_5x5",
]


@pytest.mark.parametrize("name", BINARY_SEPARABLE)
def test_binary_versions_binarize_every_conv(name: str) -> None:
    op = build_op(name, 8, 16, 2)
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    layers = list(binary_layers(op))
    assert convs and all(isinstance(c, BinaryConv2d) for c in convs)  # no real conv hides inside
    assert len(layers) == (4 if "dil" not in name else 2)
    assert all(layer.fully_binary for layer in layers)
    depthwise = layers[0]
    assert depthwise.groups == 8 and depthwise.stride == (2, 2)
    assert depthwise.dilation == ((2, 2) if "dil" in name else (1, 1))


WITH_WEIGHTS = [n for n in DARTS_OPS if n not in {"none", "avgpool_shortcut", "avg_pool_3x3_bn", "max_pool_3x3_bn"}]


@pytest.mark.parametrize("name", WITH_WEIGHTS + ["bn", "prelu"])
def test_gradients_reach_every_latent_weight(name: str) -> None:
    torch.manual_seed(0)
    op = build_op(name, 8, 8, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = op(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname} gets no gradient"
