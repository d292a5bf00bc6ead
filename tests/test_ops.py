"""Every catalog primitive: shapes at stride 1 and 2, gradients, channel rules, and that
binary ops really convolve +-1 activations with +-alpha weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bnas.binarize import BinarizeConfig, BinaryConv2d, BinaryLinear, binary_layers
from bnas.registry import build_op, closest_primitives, get_spec, list_primitives

SPATIAL = sorted(
    s.name for s in list_primitives()
    if s.name not in {"flatten", "global_avgpool", "linear", "binary_linear", "binary_dense", "conv_pool", "binary_conv_pool"}
)
KEEPS_CHANNELS = {"skip_connect", "avg_pool_3x3", "max_pool_3x3", "pool"}
REQUIRED = {
    "xnor_resnet_block", "bireal_resnet_block", "bireal_block", "xnor_vgg_block", "bireal_vgg_block",
    "xnor_conv_3x3_noskip", "xnor_conv_1x1_noskip", "xnor_conv_3x3_cond_skip", "xnor_conv_3x3_skip_connect",
    "skip_connect", "zero", "nin", "binary_conv_3x3", "binary_conv_5x5", "binary_dil_conv_3x3", "binary_dil_conv_5x5",
    "avg_pool_3x3", "max_pool_3x3", "avgpool_downsample", "factorized_reduce", "conv_downsample",
    "binary_conv_downsample", "binary_linear", "binary_conv_pool", "conv_bn", "global_avgpool", "flatten", "linear",
}


def test_catalog_holds_every_required_name() -> None:
    names = {s.name for s in list_primitives()}
    assert REQUIRED <= names, REQUIRED - names


def _allowed(name: str, c_in: int, c_out: int, stride: int) -> bool:
    if name in KEEPS_CHANNELS and c_in != c_out:
        return name == "skip_connect" and stride == 2
    return True


@pytest.mark.parametrize("name", SPATIAL)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("c_in,c_out", [(8, 8), (8, 16), (16, 8)])
@pytest.mark.parametrize("size", [8, 5])
def test_spatial_op_shapes_and_gradients(name: str, stride: int, c_in: int, c_out: int, size: int) -> None:
    if not _allowed(name, c_in, c_out, stride):
        with pytest.raises(ValueError, match="C_out == C_in|keeps the channel count"):
            build_op(name, c_in, c_out, stride)
        return
    torch.manual_seed(0)
    op = build_op(name, c_in, c_out, stride)
    x = torch.randn(2, c_in, size, size, requires_grad=True)
    out = op(x)
    expect = math.ceil(size / stride)
    assert out.shape == (2, c_out, expect, expect)
    if name == "zero":
        assert not out.any()
        return
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in op.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("stride", [1, 2])
def test_dense_and_head_ops(stride: int) -> None:
    x = torch.randn(4, 6, 5, 5)
    assert build_op("flatten", 6, 6, stride)(x).shape == (4, 150)
    assert build_op("global_avgpool", 6, 6, stride)(x).shape == (4, 6)
    flat = torch.randn(4, 150, requires_grad=True)
    for name in ("linear", "binary_linear"):
        out = build_op(name, 150, 10, stride)(flat)
        assert out.shape == (4, 10)
        out.sum().backward()
        assert torch.isfinite(flat.grad).all()
    # LeNet conv-pool: valid 5x5 conv then a 2x2 max-pool.
    y = build_op("binary_conv_pool", 1, 20, stride)(torch.randn(2, 1, 28, 28))
    conv = (28 - 5) // stride + 1
    assert y.shape == (2, 20, math.ceil(conv / 2), math.ceil(conv / 2))


@pytest.mark.parametrize(
    "name,c_in,c_out,stride,fragment",
    [
        ("skip_connect", 8, 16, 1, "skip_connect needs C_out == C_in at stride 1 (got 8 -> 16)"),
        ("max_pool_3x3", 8, 16, 1, "keeps the channel count"),
        ("global_avgpool", 8, 16, 1, "keeps the channel count"),
        ("binary_conv_3x3", 8, 16, 3, "stride must be 1 or 2"),
    ],
)
def test_disallowed_pairs_give_clear_errors(name: str, c_in: int, c_out: int, stride: int, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        build_op(name, c_in, c_out, stride)
    assert fragment in str(info.value)


def test_groups_must_divide_channels() -> None:
    with pytest.raises(ValueError, match="groups=3 must divide"):
        build_op("binary_conv_3x3", 8, 8, 1, groups=3)
    op = build_op("binary_conv_3x3", 8, 16, 1, groups=4)
    assert op(torch.randn(1, 8, 6, 6)).shape == (1, 16, 6, 6)


class _ConvRecorder(TorchFunctionMode):
    """Records (layer, input, weight) of every conv2d / linear call made inside a binary layer."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[torch.nn.Module] = []
        self.calls: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear) and self.active:
            self.calls.append((self.active[-1], args[0].detach(), args[1].detach()))
        return func(*args, **kwargs)


BINARY_OPS = sorted(s.name for s in list_primitives() if s.binarize != "real" and s.name in SPATIAL)


@pytest.mark.parametrize("name", BINARY_OPS)
def test_binary_ops_convolve_signs_with_scaled_signs(name: str) -> None:
    torch.manual_seed(1)
    op = build_op(name, 8, 8, 1).eval()
    layers = list(binary_layers(op))
    assert layers, f"{name} has no binary layer"
    recorder = _ConvRecorder()
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a: recorder.active.append(m))
        layer.register_forward_hook(lambda m, a, o: recorder.active.remove(m))  # returns None: keeps the output
    with recorder:
        op(torch.randn(2, 8, 6, 6))
    assert {id(c[0]) for c in recorder.calls} == {id(l) for l in layers}, "every binary layer convolves exactly once"
    for layer, inp, weight in recorder.calls:
        assert set(inp.unique().tolist()) <= {-1.0, 1.0}, f"{name}: a binary conv saw non-binary activations"
        flat = weight.flatten(1)
        alpha = layer.weight.detach().abs().flatten(1).mean(1)
        for k in range(flat.shape[0]):
            assert flat[k].abs().unique().tolist() == pytest.approx([alpha[k].item()]), f"{name}: channel {k} is not +-alpha"
        assert torch.equal(torch.sign(flat), torch.where(layer.weight.detach().flatten(1) >= 0, 1.0, -1.0))


def test_no_op_shares_mutable_config() -> None:
    spec = get_spec("xnor_resnet_block")
    options_before = dict(spec.options)
    a = build_op("xnor_resnet_block", 8, 8, 1)
    b = build_op("xnor_resnet_block", 8, 8, 1, binarize={"activation": "approx_sign", "weight": "bireal"})
    c = build_op("xnor_resnet_block", 8, 8, 1)
    assert dict(spec.options) == options_before
    assert all(l.config.activation == "ste" for l in binary_layers(a))
    assert all(l.config.activation == "approx_sign" for l in binary_layers(b))
    # Changing one op's quantizers or weights never reaches another op.
    for layer in binary_layers(a):
        layer.input_quantizer.enabled = False
        layer.input_quantizer.clip = 0.1
        with torch.no_grad():
            layer.weight.zero_()
    assert all(l.input_quantizer.enabled and l.input_quantizer.clip == 1.0 for l in binary_layers(c))
    assert all(l.weight.abs().sum() > 0 for l in binary_layers(c))
    ids_a = {id(p) for p in a.parameters()}
    assert not ids_a & {id(p) for p in c.parameters()}
    # A passed options dict is not mutated either.
    options = {"binarize": {"activation": "ste", "weight": "sign"}, "kernel": 3}
    snapshot = {"binarize": dict(options["binarize"]), "kernel": 3}
    build_op("conv_unit", 8, 8, 1, **options)
    assert options == snapshot


def test_unknown_op_suggests_close_names() -> None:
    with pytest.raises(KeyError) as info:
        get_spec("xnor_resnet_blok")
    assert "did you mean xnor_resnet_block" in str(info.value)
    assert "binary_conv_3x3" in closest_primitives("binary_conv_3x4")


def test_binarize_by_catalog_name_and_rsign() -> None:
    op = build_op("binary_conv_3x3", 8, 8, 1, binarize="reactnet", activation="rprelu")
    layer = next(binary_layers(op))
    assert layer.config == BinarizeConfig(activation="rsign", weight="bireal")
    out = op(torch.randn(2, 8, 4, 4))
    out.sum().backward()
    assert layer.input_quantizer.threshold.grad is not None
    with pytest.raises(ValueError, match="unknown binarization 'xnr'"):
        build_op("binary_conv_3x3", 8, 8, 1, binarize="xnr")


def test_binary_layers_are_bnas_layers() -> None:
    for name in BINARY_OPS:
        for layer in binary_layers(build_op(name, 8, 8, 1)):
            assert isinstance(layer, (BinaryConv2d, BinaryLinear))
