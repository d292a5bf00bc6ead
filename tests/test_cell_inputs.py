"""Cell input preprocessing (real, darts, binary, identity), cell residuals, the published
cells built on them (Kim et al. 2020, EBNAS), and their packed export.

Counts are checked against hand computation: a BatchNorm of C channels has 2C parameters, a
k x k conv from A to B channels A*B*k*k (over its groups), a conv bias B.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnas
from bnas.binarize import BinaryConv2d
from bnas.errors import GenotypeError
from bnas.export import load_packed, pack_model, save_packed
from bnas.genotype import genotype_from_dict, loads_genotype
from bnas.metrics import summarize
from bnas.ops.cell_inputs import BinaryFactorizedReduce, ResidualProjection
from bnas.registry import build_op

ROOT = Path(__file__).resolve().parents[1]
GENOTYPES = ROOT / "search_spaces" / "genotypes"


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def one_cell(preprocess: Any = None, cell_preprocess: Any = None, stem: int = 8, width: int = 16) -> dict[str, Any]:
    """stem (stem channels, 8x8) -> one cell of ``width`` whose single node is a zero edge."""
    cell: dict[str, Any] = {"nodes": {"n0": [["zero", "in1"], ["zero", "in0"]]}, "output": {"nodes": ["n0"]}}
    if cell_preprocess is not None:
        cell["preprocess"] = cell_preprocess
    data: dict[str, Any] = {
        "name": "one_cell",
        "input": [3, 8, 8],
        "num_classes": 10,
        "stem": [{"op": "conv_bn", "channels": stem}],
        "cells": {"c": cell},
        "body": [{"cell": "c", "channels": width}],
        "head": [{"op": "global_avgpool"}, {"op": "linear"}],
    }
    if preprocess is not None:
        data["preprocess"] = preprocess
    return data


# --------------------------------------------------------------------------------------
# Preprocessing: what each kind builds, counted by hand
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preprocess", "per_input"),
    [
        (None, 8 * 16 + 2 * 16),  # real (default): 1x1 conv + BN where the width changes
        ("real", 8 * 16 + 2 * 16),
        ("darts", 8 * 16 + 2 * 16),  # ReLU -> 1x1 conv -> BN
        ("binary", 2 * 8 + 8 * 16 + 2 * 16),  # BN -> sign -> binary 1x1 conv -> BN
        ({"kind": "binary", "bn_after": False, "activation": "relu"}, 2 * 8 + 8 * 16),  # Kim et al.
        ({"kind": "binary", "activation": "prelu"}, 2 * 8 + 8 * 16 + 2 * 16 + 16),  # EBNAS
    ],
)
def test_preprocessing_parameters_by_hand(preprocess: Any, per_input: int) -> None:
    model = bnas.build(one_cell(preprocess))
    cell = model.body[0]
    assert params(cell.pre0) == params(cell.pre1) == per_input
    assert params(cell.edges) == 0  # zero edges
    summary = summarize(model, (3, 8, 8))
    macs = 2 * 8 * 16 * 8 * 8  # two 1x1 convs from 8 to 16 channels on 8x8 maps
    stem_and_head = 3 * 8 * 9 * 64 + 16 * 10
    kind = preprocess["kind"] if isinstance(preprocess, dict) else preprocess
    if kind == "binary":
        assert summary.bops == macs and summary.flops == stem_and_head  # `bnas info` counts them as BOPs
        assert all(isinstance(m, BinaryConv2d) for m in (cell.pre0.conv, cell.pre1.conv))
    else:
        assert summary.bops == 0 and summary.flops == stem_and_head + macs


def test_darts_and_binary_preprocess_inputs_that_already_fit_real_does_not() -> None:
    # DARTS applies ReLUConvBN to every input, fitting or not; bnas's real kind skips it.
    assert params(bnas.build(one_cell("real", width=8)).body[0].pre1) == 0
    assert params(bnas.build(one_cell("darts", width=8)).body[0].pre1) == 8 * 8 + 2 * 8
    assert params(bnas.build(one_cell("binary", width=8)).body[0].pre1) == 2 * 8 + 8 * 8 + 2 * 8
    assert isinstance(bnas.build(one_cell("identity", width=8)).body[0].pre1, nn.Identity)


def test_darts_preprocess_is_relu_conv_bn() -> None:
    torch.manual_seed(0)
    model = bnas.build(one_cell("darts")).eval()
    pre = model.body[0].pre1
    x = torch.randn(2, 8, 8, 8)
    conv, bn = pre[1], pre[2]
    expect = F.batch_norm(
        F.conv2d(F.relu(x), conv.weight), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    torch.testing.assert_close(pre(x), expect)


def test_binary_preprocess_convolves_signs() -> None:
    torch.manual_seed(0)
    pre = bnas.build(one_cell({"kind": "binary", "bn_after": False})).eval().body[0].pre1
    with torch.no_grad():
        pre.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 8, 8)
    bn = pre.bn
    normed = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    w = pre.conv.weight
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)  # xnor by default
    expect = F.conv2d(torch.where(normed >= 0, 1.0, -1.0), alpha * torch.where(w >= 0, 1.0, -1.0))
    torch.testing.assert_close(pre(x), expect)


def test_identity_preprocess_refuses_an_input_that_does_not_fit() -> None:
    with pytest.raises(GenotypeError) as info:
        bnas.build(one_cell("identity"))
    message = str(info.value)
    assert "preprocess: identity needs the input to fit the cell (8x8x8 given, the cell works at 16x8x8)" in message
    assert "body[0] (aligning in0)" in message and "use preprocess: binary, real or darts" in message


def test_cell_preprocess_overrides_the_genotype_default() -> None:
    model = bnas.build(one_cell("binary", cell_preprocess="darts"))
    assert params(model.body[0].pre1) == 8 * 16 + 2 * 16
    assert not any(isinstance(m, BinaryConv2d) for m in model.body[0].pre1.modules())


def reduction_pair(preprocess: Any) -> dict[str, Any]:
    """A stride-2 cell then a normal cell, whose k-2 input is at twice its resolution."""
    data = one_cell(preprocess, width=8)
    data["body"] = [{"cell": "c", "channels": 8, "stride": 2}, {"cell": "c", "channels": 16}]
    return data


@pytest.mark.parametrize(
    ("preprocess", "pre0"),
    [
        ("real", 8 * 16 + 2 * 16),  # factorized reduce: two 1x1 convs to 8 channels each + BN
        ("darts", 8 * 16 + 2 * 16),
        ("binary", 2 * 8 + 8 * 16 + 2 * 16),  # binary factorized reduce: BN, two binary 1x1 convs, BN
        ({"kind": "binary", "reduce": "conv3x3", "bn_after": False}, 2 * 8 + 8 * 16 * 9),  # Kim et al.
    ],
)
def test_inputs_at_twice_the_resolution_by_hand(preprocess: Any, pre0: int) -> None:
    model = bnas.build(reduction_pair(preprocess))
    cell = model.body[1]
    assert params(cell.pre0) == pre0
    out = cell.pre0(torch.randn(2, 8, 8, 8))
    assert out.shape == (2, 16, 4, 4)


def test_binary_factorized_reduce_is_the_source_op_on_even_maps_and_takes_odd_ones() -> None:
    torch.manual_seed(0)
    op = build_op("binary_factorized_reduce", 6, 10, 2).eval()
    assert isinstance(op, BinaryFactorizedReduce)
    x = torch.randn(2, 6, 8, 8)
    normed = op.bn(x)
    # EBNAS: cat([conv_1(x), conv_2(x[:, :, 1:, 1:])]) on the normalised input, then BN
    expect = op.bn_out(torch.cat([op.conv_even(normed), op.conv_odd(normed[:, :, 1:, 1:])], dim=1))
    torch.testing.assert_close(op(x), expect)
    assert op(torch.randn(2, 6, 5, 7)).shape == (2, 10, 3, 4)
    assert params(op) == 2 * 6 + 6 * 5 + 6 * 5 + 2 * 10
    with pytest.raises(ValueError, match="needs C_out >= 2"):
        build_op("binary_factorized_reduce", 6, 1, 2)


# --------------------------------------------------------------------------------------
# Residuals
# --------------------------------------------------------------------------------------
def residual_genotype(stride: int) -> dict[str, Any]:
    data = one_cell("identity", width=8)
    data["cells"]["c"]["output"]["residual"] = True
    data["body"] = [{"cell": "c", "channels": 8, "stride": stride}]
    return data


def test_residual_on_a_normal_cell_adds_the_k_minus_1_input() -> None:
    torch.manual_seed(0)
    model = bnas.build(residual_genotype(1)).eval()
    cell = model.body[0]
    assert isinstance(cell.residual, nn.Identity)
    s = torch.randn(2, 8, 8, 8)
    # every edge is a zero, so the cell's output is its residual alone
    torch.testing.assert_close(cell(s, s), s)
    plain = copy.deepcopy(residual_genotype(1))
    plain["cells"]["c"]["output"]["residual"] = False
    assert params(bnas.build(plain)) == params(model)


def test_residual_on_a_reduction_cell_is_bn_then_a_2x2_stride_2_conv() -> None:
    torch.manual_seed(0)
    model = bnas.build(residual_genotype(2)).eval()
    cell = model.body[0]
    assert isinstance(cell.residual, ResidualProjection)
    assert params(cell.residual) == 2 * 8 + 8 * 8 * 4 + 8  # BN, 2x2 conv, its bias
    plain = residual_genotype(2)
    plain["cells"]["c"]["output"]["residual"] = False
    assert params(model) - params(bnas.build(plain)) == 2 * 8 + 8 * 8 * 4 + 8
    s = torch.randn(2, 8, 8, 8)
    bn, conv = cell.residual.bn, cell.residual.conv
    normed = F.batch_norm(s, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(cell(s, s), F.conv2d(normed, conv.weight, conv.bias, stride=2))
    # odd maps: ceil(H / 2), like every stride-2 path of the cell
    assert cell.residual(torch.randn(2, 8, 7, 5)).shape == (2, 8, 4, 3)


def test_residual_width_mismatch_is_a_clear_error() -> None:
    data = one_cell("binary", width=8)
    data["cells"]["c"]["output"]["residual"] = True
    data["body"] = [{"cell": "c", "channels": 16}]
    with pytest.raises(GenotypeError) as info:
        bnas.build(data)
    message = str(info.value)
    assert "residual: true adds the k-1 input (8 channels) to the cell's output (16 channels)" in message
    assert "cells.c.output.residual" in message and "set residual: false on this cell" in message


# --------------------------------------------------------------------------------------
# YAML: the forms, the round trip, the hash
# --------------------------------------------------------------------------------------
def test_preprocess_and_residual_round_trip_and_move_the_hash() -> None:
    data = one_cell({"kind": "binary", "reduce": "conv3x3", "activation": "relu", "bn_after": False}, "darts")
    data["cells"]["c"]["output"]["residual"] = False
    genotype = genotype_from_dict(data)
    again = loads_genotype(genotype.to_yaml())
    assert again == genotype and again.canonical_hash() == genotype.canonical_hash()
    text = genotype.to_yaml()
    assert "preprocess: {kind: binary, reduce: conv3x3, activation: relu, bn_after: false}" in text
    assert "preprocess: darts" in text and "residual" not in text  # the default is not written
    hashes = {genotype_from_dict(one_cell(kind)).canonical_hash() for kind in (None, "darts", "binary")}
    assert len(hashes) == 3
    with_residual = one_cell("binary", width=8)
    with_residual["cells"]["c"]["output"]["residual"] = True
    assert (
        genotype_from_dict(with_residual).canonical_hash()
        != genotype_from_dict(one_cell("binary", width=8)).canonical_hash()
    )


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("top", "binarry", "preprocess: invalid preprocess 'binarry'; expected one of real, darts, binary, identity"),
        ("cell", {"kind": "darts", "activation": "relu"}, "activation is an option of kind: binary only"),
        ("cell", {"kind": "binary", "reduce": "maxpool"}, "invalid reduce 'maxpool'; expected factorized or conv3x3"),
        ("cell", {"kind": "binary", "bn_afer": False}, "unknown key 'bn_afer'; did you mean 'bn_after'?"),
        ("cell", {"reduce": "conv3x3"}, "expected kind: real, darts, binary or identity"),
    ],
)
def test_bad_preprocess_is_refused_by_path(where: str, value: Any, message: str) -> None:
    data = one_cell(value) if where == "top" else one_cell(cell_preprocess=value)
    with pytest.raises(GenotypeError) as info:
        genotype_from_dict(data, file="cells.yaml")
    assert message in str(info.value)
    assert "cells.yaml" in str(info.value)
    assert ("cells.c.preprocess" if where == "cell" else "preprocess") in str(info.value)


# --------------------------------------------------------------------------------------
# The published cells: parameter counts against the authors' code
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "ours", "source"),
    [
        # gistvision/bnas src/model.py NetworkCIFAR(36, 10, 20, latest_cell_zeroise): 5,578,252;
        # ours has 1,080 more (a BN after the stem conv, affine BNs on two reductions' inputs)
        ("kim2020_bnas_a", 5_579_332, 5_578_252),
        # sscckk/EBNAS model.py NetworkCIFAR(56, 10, 11, False, EBNAS): 3,077,378
        ("ebnas_cifar10", 3_077_378, 3_077_378),
    ],
)
def test_published_cells_match_their_sources(name: str, ours: int, source: int) -> None:
    model = bnas.build(GENOTYPES / f"{name}.yaml")
    assert params(model) == ours
    assert abs(ours - source) / source < 0.01
    assert f"{source:,}" in (GENOTYPES / f"{name}.yaml").read_text()  # the header states it


def test_ebnas_ops_keep_14_groups_and_a_weightless_shortcut() -> None:
    for width in (28, 56):
        for name, k in (("ebnas_conv_3x3", 3), ("ebnas_dil_conv_5x5", 5)):
            op = build_op(name, width, width, 2)
            assert op.conv.groups == 14
            # BN before and after, the grouped conv, PReLU; the stride-2 shortcut has no weights
            assert params(op) == 2 * width + width * (width // 14) * k * k + 2 * width + width
            assert isinstance(op.shortcut, nn.AvgPool2d)
            assert op(torch.randn(2, width, 7, 7)).shape == (2, width, 4, 4)
    with pytest.raises(ValueError, match="groups=14 must divide both C_in=48 and C_out=48"):
        build_op("ebnas_conv_3x3", 48, 48, 1)
    with pytest.raises(ValueError, match="reduction: pool has no weights and keeps the width"):
        build_op("ebnas_conv_3x3", 28, 56, 1)


def test_bn_conv_bn_act_order() -> None:
    torch.manual_seed(0)
    op = build_op("conv_unit", 4, 6, 1, order="bn_conv_bn_act").eval()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(op(x), op.bn_out(op.conv(op.bn(x))))
    assert params(op) == 2 * 4 + 4 * 6 * 9 + 2 * 6


# --------------------------------------------------------------------------------------
# Export: binary preprocessing, the EBNAS unit and residuals pack like any other network
# --------------------------------------------------------------------------------------
PUBLISHED_SMALL = {
    "name": "published_small",
    "input": [3, 12, 12],
    "num_classes": 5,
    "preprocess": {"kind": "binary", "activation": "prelu"},
    "stem": [{"op": "conv_bn", "channels": 28, "activation": "relu"}],
    "cells": {
        "normal": {
            "nodes": {
                "n0": [["ebnas_conv_3x3", "in0"], ["max_pool_3x3", "in1"]],
                "n1": [["kim_dil_conv_3x3", "in1"], ["binary_sep_conv_3x3", "n0"]],
            },
            "output": {"combine": "sum", "nodes": ["n0", "n1"], "residual": True},
        },
        "reduce": {
            "preprocess": {"kind": "binary", "reduce": "conv3x3", "bn_after": False, "activation": "relu"},
            "nodes": {"n0": [["ebnas_conv_5x5", "in0"], ["skip_connect", "in1"]]},
            "output": {"combine": "concat", "nodes": ["n0"], "residual": True},
        },
    },
    "body": [
        {"cell": "normal", "channels": 28},
        {"cell": "reduce", "channels": 28, "stride": 2},
        {"cell": "normal", "channels": 28},
    ],
    "head": [{"op": "global_avgpool"}, {"op": "linear"}],
}


@pytest.mark.usefixtures("kernel_threads")
def test_new_ops_export_packed_and_match(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = bnas.build(PUBLISHED_SMALL).eval()
    gen = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
    packed = pack_model(model)
    kinds = {e["path"]: e["kind"] for e in packed.layers}
    assert kinds["body.0.pre0.conv"] == "packed_conv2d"  # binary preprocessing
    assert kinds["body.2.pre0.conv_even"] == kinds["body.2.pre0.conv_odd"] == "packed_conv2d"  # binary fact. reduce
    assert kinds["body.0.edges.n0_0.conv"] == "packed_conv2d"  # 14 groups
    folded = {e["path"]: e.get("folded_bn") for e in packed.layers}
    assert folded["body.0.edges.n0_0.conv"] == "body.0.edges.n0_0.bn_out"  # bn_conv_bn_act folds its second BN
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    out = packed(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * scale)
    save_packed(packed, tmp_path / "published.bnas")
    assert torch.equal(load_packed(tmp_path / "published.bnas")(x), out)
