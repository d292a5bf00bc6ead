"""Every catalog primitive: shapes at stride 1 and 2 (odd sizes too), gradients, channel rules;
binary ops really convolve +-1 activations with +-alpha weights; no op shares mutable state;
and the op semantics (shortcuts, factorized reduce, pools, activations) against hand formulas."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bnas import registry
from bnas.binarize import BinarizeConfig, BinaryConv2d, BinaryLinear, binary_layers, set_binarization
from bnas.ops.common import RPReLU
from bnas.ops.downsample import FactorizedReduce
from bnas.registry import build_op, get_spec, list_primitives

ALL = sorted(s.name for s in list_primitives())
# Ops whose input is not an (N, C, H, W) map of C_in channels in and C_out out, tested apart.
HEAD = {"flatten", "global_avgpool", "linear", "binary_linear"}
LENET = {"binary_conv_pool"}
SPATIAL = [n for n in ALL if n not in HEAD | LENET]
POOLS = {"pool", "avg_pool_3x3", "max_pool_3x3", "avg_pool_3x3_bn", "max_pool_3x3_bn"}
# Single-layer ops that keep the width and cannot downsample (tests/test_ops_darts.py).
POINTWISE = {"bn", "relu", "prelu"}
KEEP_WIDTH = POOLS | POINTWISE | {"avgpool_shortcut"}
PAIRS = [(8, 8), (8, 16), (16, 8)]
SIZES = [(5, 7), (8, 6)]  # odd and even heights and widths


def disallowed(name: str, c_in: int, c_out: int, stride: int) -> str | None:
    """The build error an op must give for a channel pair it cannot support (None: allowed)."""
    if name.startswith("ebnas_"):  # EBNAS's fixed 14 groups (tested at 28 and 56 channels in test_cell_inputs)
        return f"groups=14 must divide both C_in={c_in} and C_out={c_out}"
    if c_in != c_out and (name in KEEP_WIDTH or name == "global_avgpool"):
        return f"keeps the channel count (got {c_in} -> {c_out})"
    if name in POINTWISE and stride == 2:
        return f"{name} cannot downsample (stride 2)"
    if c_in == c_out:
        return None
    if name == "skip_connect" and stride == 1:
        return f"skip_connect needs C_out == C_in at stride 1 (got {c_in} -> {c_out})"
    return None


def check_gradients(name: str, op: nn.Module, x: Tensor, out: Tensor) -> None:
    """Backward a loss with a non-trivial gradient (a sum of BN outputs would have none)."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), name
    assert x.grad.abs().sum() > 0, f"{name}: no gradient reaches the input"
    for pname, p in op.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"


def test_catalog_lists_ops_of_every_kind() -> None:
    # Guards the parametrisations below against an empty or partial catalog.
    assert len(SPATIAL) >= 25 and HEAD <= set(ALL) and LENET <= set(ALL)


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_ops_shapes_and_gradients(name: str) -> None:
    for stride in (1, 2):
        for c_in, c_out in PAIRS:
            error = disallowed(name, c_in, c_out, stride)
            if error is not None:
                with pytest.raises(ValueError) as info:
                    build_op(name, c_in, c_out, stride)
                assert error in str(info.value)
                continue
            torch.manual_seed(0)
            op = build_op(name, c_in, c_out, stride)
            for h, w in SIZES:
                x = torch.randn(2, c_in, h, w, requires_grad=True)
                out = op(x)
                expect = (2, c_out, math.ceil(h / stride), math.ceil(w / stride))
                assert out.shape == expect, f"{name} {c_in}->{c_out} stride {stride} size {h}x{w}"
                if name in ("zero", "none"):
                    assert not out.any()
                    continue
                op.zero_grad()
                check_gradients(f"{name} {c_in}->{c_out} s{stride} {h}x{w}", op, x, out)


@pytest.mark.parametrize("stride", [1, 2])
def test_head_ops_shapes_and_gradients(stride: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 7)
    assert build_op("flatten", 6, 6, stride)(x).shape == (4, 6 * 5 * 7)
    assert build_op("flatten", 3, 99, stride)(x).shape == (4, 6 * 5 * 7), "flatten ignores C_in and C_out"
    pooled = build_op("global_avgpool", 6, 6, stride)(x)
    assert torch.allclose(pooled, x.mean(dim=(2, 3)))
    for name in ("linear", "binary_linear"):
        for c_in, c_out in [(30, 10), (10, 30)]:
            op = build_op(name, c_in, c_out, stride)
            feats = torch.randn(4, c_in, requires_grad=True)
            out = op(feats)
            assert out.shape == (4, c_out)
            check_gradients(name, op, feats, out)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("c_in,c_out", PAIRS)
def test_lenet_conv_pool_shapes_and_gradients(stride: int, c_in: int, c_out: int) -> None:
    for size, padding in [(28, 0), (13, 0), (11, 2)]:
        op = build_op("binary_conv_pool", c_in, c_out, stride, padding=padding)
        x = torch.randn(2, c_in, size, size, requires_grad=True)
        out = op(x)
        conv = (size + 2 * padding - 5) // stride + 1
        assert out.shape == (2, c_out, math.ceil(conv / 2), math.ceil(conv / 2))
        check_gradients("binary_conv_pool", op, x, out)


@pytest.mark.parametrize(
    "name,args,options,fragment",
    [
        (
            "skip_connect",
            (32, 64, 1),
            {},
            "skip_connect needs C_out == C_in at stride 1 (got 32 -> 64); use a conv unit",
        ),
        ("avg_pool_3x3", (8, 16, 2), {}, "avg_pool keeps the channel count (got 8 -> 16)"),
        ("global_avgpool", (8, 16, 1), {}, "global_avgpool keeps the channel count (got 8 -> 16)"),
        ("factorized_reduce", (8, 1, 2), {}, "needs C_out >= 2"),
        ("binary_conv_3x3", (8, 16, 3), {}, "stride must be 1 or 2, got 3"),
        ("zero", (8, 8, 0), {}, "stride must be 1 or 2"),
        ("conv_unit", (0, 8, 1), {}, "C_in must be a positive integer, got 0"),
        ("binary_conv_3x3", (8, 8, 1), {"groups": 3}, "groups=3 must divide both C_in=8 and C_out=8"),
        ("binary_conv_3x3", (8, 8, 1), {"kernel": 4}, "kernel must be an odd positive integer"),
        ("binary_conv_3x3", (8, 8, 1), {"dilation": 0}, "dilation must be a positive integer"),
        ("binary_conv_3x3", (8, 8, 1), {"order": "conv_act_bn"}, "order must be one of bn_conv_act, conv_bn_act"),
        (
            "xnor_conv_3x3_cond_skip",
            (8, 8, 1),
            {"reduction": "maxpool"},
            "reduction must be one of conv, factorized, avgpool, pool",
        ),
        ("binary_conv_3x3", (8, 8, 1), {"activation": "gelu"}, "unknown activation 'gelu'"),
        ("binary_conv_3x3", (8, 8, 1), {"binarize": "xnr"}, "unknown binarization 'xnr'"),
        ("binary_conv_3x3", (8, 8, 1), {"binarize": {"activation": "sgn"}}, "unknown activation quantizer 'sgn'"),
        ("xnor_vgg_block", (8, 8, 2), {"downsample": "avg"}, "downsample must be one of maxpool, stride"),
        ("pool", (8, 8, 1), {"mode": "min"}, "pool mode must be one of max, avg"),
        ("binary_linear", (8, 8, 1), {"dropout": 1.5}, "dropout must be a probability in [0, 1)"),
    ],
)
def test_bad_builds_give_clear_errors(
    name: str, args: tuple[int, int, int], options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValueError) as info:
        build_op(name, *args, **options)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["linear", "binary_linear"])
def test_linear_ops_reject_feature_maps(name: str) -> None:
    op = build_op(name, 7, 4, 1)
    with pytest.raises(
        RuntimeError, match=r"expects \(N, 7\) inputs, got \(2, 3, 5, 7\); put flatten or global_avgpool"
    ):
        op(torch.randn(2, 3, 5, 7))  # W == C_in: nn.Linear alone would silently accept this


# --------------------------------------------------------------------------------------
# Inside every binary op the conv runs on +-1 activations and +-alpha weights.
# --------------------------------------------------------------------------------------
class BinaryCallRecorder(TorchFunctionMode):
    """Records (layer, input, weight) of every conv2d / linear call made inside a binary layer."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[nn.Module] = []
        self.calls: list[tuple[nn.Module, Tensor, Tensor]] = []
        self.outputs: dict[int, Tensor] = {}  # id(layer) -> the layer's output

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear, torch.conv2d) and self.active:
            self.calls.append((self.active[-1], args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)

    def enter(self, module: nn.Module, args: Any) -> None:
        self.active.append(module)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.active.pop()
        self.outputs[id(module)] = output.detach().clone()

    def watch(self, model: nn.Module) -> list[Any]:
        handles = []
        for layer in binary_layers(model):
            handles.append(layer.register_forward_pre_hook(self.enter))
            handles.append(layer.register_forward_hook(self.leave))
        return handles


def expected_binary_weight(layer: nn.Module) -> Tensor:
    """The forward weight by the binarizers' formulas, written out independently."""
    w = layer.weight.detach()
    signs = torch.where(w >= 0, 1.0, -1.0)
    name = layer.config.weight
    if name == "sign":
        return signs
    if name in ("xnor", "bireal"):  # alpha_k = mean |W_k| per output channel
        return signs * w.abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
    if name == "xnor_tensor":
        return signs * w.abs().mean()
    raise AssertionError(f"no formula for weight binarizer {name}")


BINARY_NAMES = sorted(s.name for s in list_primitives() if s.binarize != "real")
REAL_NAMES = sorted(s.name for s in list_primitives() if s.binarize == "real")
# (binarize option, stride): the op's own binarization at both strides, then the others.
CONFIGS = [
    (None, 1),
    (None, 2),
    ("bireal", 2),
    ("binarynet", 1),
    ("reactnet", 2),
    ({"activation": "swish_sign", "weight": "xnor_tensor"}, 1),
]


def _example_input(name: str, c_in: int) -> Tensor:
    if name == "binary_linear":
        x = torch.randn(4, c_in)
    else:
        x = torch.randn(2, c_in, 13 if name == "binary_conv_pool" else 7, 7)
    x.view(-1)[::5] = 0.0  # exact zeros: sign(0) must be +1, never 0
    return x


@pytest.mark.parametrize("name", BINARY_NAMES)
def test_binary_ops_convolve_signs_with_scaled_signs(name: str) -> None:
    torch.manual_seed(1)
    for binarize, stride in CONFIGS:
        options = {} if binarize is None else {"binarize": binarize}
        c_in, c_out = (28, 28) if name.startswith("ebnas_") else (8, 16)  # EBNAS's 14 groups
        op = build_op(name, c_in, c_out, stride, **options)
        layers = list(binary_layers(op))
        assert layers, f"{name} has no binary layer"
        recorder = BinaryCallRecorder()
        recorder.watch(op)
        with recorder:
            op(_example_input(name, c_in))
        assert sorted(id(c[0]) for c in recorder.calls) == sorted(id(layer) for layer in layers), (
            f"{name}: every binary layer must run exactly one conv/linear"
        )
        for layer, inp, weight in recorder.calls:
            assert layer.config.activation != "none" and layer.config.weight != "none"
            values = set(inp.unique().tolist())
            assert values <= {-1.0, 1.0}, f"{name} ({binarize}): a binary conv saw activations {sorted(values)[:5]}"
            # The conv runs on the signs of the weights (exact integer sums) and the layer scales
            # its output: the layer computes the conv with the weights +-alpha.
            w = layer.weight.detach()
            assert torch.equal(weight, torch.where(w >= 0, 1.0, -1.0)), (
                f"{name} ({binarize}): conv weights are not signs"
            )
            expected = expected_binary_weight(layer)
            assert torch.allclose(layer.binary_weight().detach(), expected, rtol=1e-6, atol=0)
            if isinstance(layer, BinaryLinear):
                reference = F.linear(inp, expected, layer.bias)
            else:
                reference = F.conv2d(
                    inp, expected, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
                )
            torch.testing.assert_close(recorder.outputs[id(layer)], reference, rtol=1e-5, atol=1e-5)
            # One magnitude per output channel: the values are exactly {-alpha_k, +alpha_k}.
            magnitudes = expected.abs().flatten(1)
            assert torch.equal(magnitudes, magnitudes[:, :1].expand_as(magnitudes)), (
                f"{name}: a channel has two |values|"
            )


def test_alpha_is_mean_abs_per_output_channel_for_xnor() -> None:
    op = build_op("xnor_conv_3x3_noskip", 2, 3, 1)
    layer = next(binary_layers(op))
    with torch.no_grad():
        layer.weight.copy_(torch.arange(-27.0, 27.0).view(3, 2, 3, 3) / 10)
    recorder = BinaryCallRecorder()
    recorder.watch(op)
    with recorder:
        op(torch.randn(2, 2, 5, 5))
    ((_, inp, signs),) = recorder.calls
    weight = layer.binary_weight().detach()
    assert torch.allclose(recorder.outputs[id(layer)], F.conv2d(inp, weight, padding=1), atol=1e-5)
    # Channel 0 holds -2.7 ... -1.0: alpha_0 = 1.85 and every weight is -1.85.
    assert torch.allclose(weight[0], torch.full((2, 3, 3), -1.85))
    # Channel 1 holds -0.9 ... 0.8: alpha_1 = (4.5 + 3.6) / 18 = 0.45; the weight 0.0 gives +alpha.
    assert torch.allclose(weight[1].flatten(), torch.tensor([-0.45] * 9 + [0.45] * 9))
    # Channel 2 holds 0.9 ... 2.6: alpha_2 = 1.75.
    assert torch.allclose(weight[2], torch.full((2, 3, 3), 1.75))


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_ops_have_no_binary_layers(name: str) -> None:
    c_out = 8 if name in KEEP_WIDTH | {"skip_connect", "global_avgpool"} else 16
    assert not list(binary_layers(build_op(name, 8, c_out, 1 if name in POINTWISE else 2)))


# --------------------------------------------------------------------------------------
# No shared mutable state
# --------------------------------------------------------------------------------------


def _width(name: str) -> int:
    return 28 if name.startswith("ebnas_") else 8  # EBNAS's 14 groups


def _fresh(name: str, seed: int = 7, **options: Any) -> nn.Module:
    torch.manual_seed(seed)
    return build_op(name, _width(name), _width(name), 1, **options)


def _mutate(op: nn.Module, channels: int = 8) -> None:
    """Everything a user or trainer might do to one op."""
    params = list(op.parameters())
    out = op(torch.randn(2, channels, 6, 6))
    if params:
        out.square().mean().backward()
        torch.optim.SGD(params, lr=0.5).step()
    set_binarization(op, activations=False, weights=False)
    for layer in binary_layers(op):
        layer.input_quantizer.clip = 0.01
        layer.kernel_quantizer.clip = 0.01
        layer.latent_clip_value = 1e-3
    op.eval()


@pytest.mark.parametrize("name", SPATIAL)
def test_no_op_shares_mutable_state(name: str) -> None:
    spec = get_spec(name)
    preset_before = copy.deepcopy(dict(spec.options))
    presets_before = dict(registry.BINARIZE_PRESETS)
    reference = _fresh(name)
    victim = _fresh(name)
    _mutate(victim, _width(name))
    after = _fresh(name)
    # The preset and the named binarizations are untouched.
    assert dict(spec.options) == preset_before
    assert registry.BINARIZE_PRESETS == presets_before
    # An op built after another was trained and reconfigured is the op built before.
    ref_state, after_state = reference.state_dict(), after.state_dict()
    assert ref_state.keys() == after_state.keys()
    assert all(torch.equal(ref_state[k], after_state[k]) for k in ref_state)
    for a, b in zip(binary_layers(reference), binary_layers(after), strict=True):
        assert (a.input_quantizer.enabled, a.kernel_quantizer.enabled) == (True, True)
        assert (a.input_quantizer.clip, a.kernel_quantizer.clip) == (b.input_quantizer.clip, b.kernel_quantizer.clip)
        assert a.input_quantizer.clip == a.config.clip and a.latent_clip_value == b.latent_clip_value
    assert after.training
    # Two ops from one preset share no module and no tensor.
    assert not {id(m) for m in reference.modules()} & {id(m) for m in after.modules()}
    ptrs = {t.data_ptr() for t in reference.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in after.state_dict().values() if t.numel()}


def test_passed_config_and_options_are_not_mutated() -> None:
    config = BinarizeConfig(activation="approx_sign", weight="bireal", clip=1.5)
    nested = {"activation": "ste", "weight": "sign", "clip": 0.5}
    options = {"binarize": nested, "kernel": 5, "shortcut": True, "activation": "rprelu"}
    snapshot = copy.deepcopy(options)
    op1 = build_op("conv_unit", 8, 16, 2, **options)
    op2 = build_op("bireal_block", 8, 8, 1, binarize=config)
    op3 = build_op("binary_conv_3x3", 8, 8, 1, binarize=config)
    assert options == snapshot and options["binarize"] is nested
    assert config == BinarizeConfig(activation="approx_sign", weight="bireal", clip=1.5)
    assert next(binary_layers(op1)).config == BinarizeConfig(activation="ste", weight="sign", clip=0.5)
    _mutate(op2)
    layer3 = next(binary_layers(op3))
    assert layer3.config == config and layer3.input_quantizer.clip == 1.5 and layer3.input_quantizer.enabled
    with pytest.raises(AttributeError):
        next(binary_layers(op2)).config.clip = 3.0  # frozen: a layer cannot rewrite a shared config


# --------------------------------------------------------------------------------------
# Op semantics against hand formulas
# --------------------------------------------------------------------------------------
def _bn_identity(module: nn.Module) -> nn.Module:
    """Eval mode with fresh BN statistics: every BN is x / sqrt(1 + eps)."""
    return module.eval()


BN_SCALE = 1 / math.sqrt(1 + 1e-5)


def test_skip_connect_is_identity_at_stride_1_and_factorized_reduce_at_stride_2() -> None:
    x = torch.randn(2, 8, 5, 5)
    assert build_op("skip_connect", 8, 8, 1)(x) is x
    reduce = build_op("skip_connect", 8, 12, 2)
    assert isinstance(reduce, FactorizedReduce)
    assert reduce(x).shape == (2, 12, 3, 3)


def test_factorized_reduce_matches_the_formula_on_odd_sizes() -> None:
    torch.manual_seed(0)
    op = _bn_identity(build_op("factorized_reduce", 3, 4, 2))
    x = torch.randn(1, 3, 5, 5)
    relu = x.clamp(min=0)
    w0, w1 = op.convs[0].weight[:, :, 0, 0], op.convs[1].weight[:, :, 0, 0]
    out = op(x)
    for i in range(3):
        for j in range(3):
            even = w0 @ relu[0, :, 2 * i, 2 * j]
            # The offset grid reads pixel (2i+1, 2j+1); past the edge it is zero padding.
            odd_px = relu[0, :, 2 * i + 1, 2 * j + 1] if 2 * i + 1 < 5 and 2 * j + 1 < 5 else torch.zeros(3)
            odd = w1 @ odd_px
            assert torch.allclose(out[0, :, i, j], torch.cat([even, odd]) * BN_SCALE, atol=1e-5)


def test_avgpool_downsample_averages_only_real_pixels_at_the_edge() -> None:
    op = _bn_identity(build_op("avgpool_downsample", 1, 1, 2))
    with torch.no_grad():
        op[1].weight.fill_(1.0)
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = op(x)[0, 0] / BN_SCALE
    assert out.shape == (3, 3)
    assert out[0, 0].item() == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert out[2, 2].item() == pytest.approx(24.0)  # the corner window holds one real pixel
    assert out[0, 2].item() == pytest.approx((4 + 9) / 2)


def test_pools_match_torch_and_ignore_padding_in_the_average() -> None:
    x = torch.randn(2, 4, 7, 7)
    avg = build_op("avg_pool_3x3", 4, 4, 2)(x)
    assert torch.allclose(avg[:, :, 0, 0], x[:, :, :2, :2].mean(dim=(2, 3)))
    mx = build_op("max_pool_3x3", 4, 4, 1)(x)
    assert torch.equal(mx[:, :, 3, 3], x[:, :, 2:5, 2:5].amax(dim=(2, 3)))


def test_zero_has_output_shape_and_dtype() -> None:
    out = build_op("zero", 8, 3, 2)(torch.randn(2, 8, 5, 4, dtype=torch.float64))
    assert out.shape == (2, 3, 3, 2) and out.dtype == torch.float64 and not out.any()


def _sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def test_conv_unit_orders_follow_their_formulas() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for order in ("bn_conv_act", "conv_bn_act"):
        op = _bn_identity(build_op("conv_unit", 4, 6, 1, order=order, binarize="binarynet"))
        w = _sign(op.conv.weight)
        if order == "bn_conv_act":  # BN over C_in, then sign, then conv
            expect = F.conv2d(_sign(x * BN_SCALE), w, padding=1)
        else:  # sign, conv, then BN over C_out
            expect = F.conv2d(_sign(x), w, padding=1) * BN_SCALE
        assert torch.allclose(op(x), expect, atol=1e-4), order


def test_cond_skip_shortcut_is_identity_then_factorized() -> None:
    torch.manual_seed(0)
    op = _bn_identity(build_op("xnor_conv_3x3_cond_skip", 8, 8, 1))
    assert isinstance(op.shortcut, nn.Identity)
    x = torch.randn(2, 8, 5, 5)
    body = op.conv(op.bn(x))
    assert torch.allclose(op(x), body + x)
    assert isinstance(build_op("xnor_conv_3x3_cond_skip", 8, 16, 2).shortcut, FactorizedReduce)
    assert isinstance(build_op("xnor_conv_3x3_noskip", 8, 8, 1).shortcut, type(None))
    skip = build_op("xnor_conv_3x3_skip_connect", 8, 16, 2).shortcut
    assert isinstance(skip[0], nn.Conv2d) and skip[0].kernel_size == (1, 1) and skip[0].stride == (2, 2)


def test_bireal_block_adds_the_real_input_around_one_conv() -> None:
    torch.manual_seed(0)
    op = _bn_identity(build_op("bireal_block", 8, 8, 1))
    x = torch.randn(2, 8, 5, 5)
    conv = op.conv
    expect = F.conv2d(_sign(x), conv.binary_weight(), padding=1) * BN_SCALE + x
    assert torch.allclose(op(x), expect, atol=1e-5)
    assert conv.config == BinarizeConfig(activation="approx_sign", weight="bireal")
    down = build_op("bireal_block", 8, 16, 2).shortcut
    assert [type(m) for m in down] == [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]


def test_resnet_block_shortcut_layouts() -> None:
    xnor = build_op("xnor_resnet_block", 8, 16, 2)
    assert xnor.conv1.order == "bn_conv_act" and xnor.conv1.shortcut is None and xnor.conv2.shortcut is None
    assert xnor.shortcut is not None and xnor.conv1.conv.stride == (2, 2) and xnor.conv2.conv.stride == (1, 1)
    torch.manual_seed(0)
    same = _bn_identity(build_op("xnor_resnet_block", 8, 8, 1))
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(same(x), same.conv2(same.conv1(x)) + x)
    bireal = build_op("bireal_resnet_block", 8, 16, 2)
    assert bireal.shortcut is None and bireal.conv1.order == "conv_bn_act"
    assert isinstance(bireal.conv1.shortcut[0], nn.AvgPool2d) and isinstance(bireal.conv2.shortcut, nn.Identity)
    assert len(list(binary_layers(bireal))) == 2


def test_vgg_block_pools_after_the_conv_at_stride_2() -> None:
    op = build_op("xnor_vgg_block", 8, 16, 2)
    assert op.conv.stride == (1, 1) and isinstance(op.pool, nn.MaxPool2d) and op.bn.num_features == 8
    strided = build_op("bireal_vgg_block", 8, 16, 2, downsample="stride")
    assert strided.conv.stride == (2, 2) and strided.bn.num_features == 16
    torch.manual_seed(0)
    op = _bn_identity(build_op("bireal_vgg_block", 4, 4, 2))
    x = torch.randn(1, 4, 6, 6)
    expect = F.max_pool2d(F.conv2d(_sign(x), op.conv.binary_weight(), padding=1), 2) * BN_SCALE
    assert torch.allclose(op(x), expect, atol=1e-5)


def test_nin_is_a_3x3_then_two_1x1_binary_convs() -> None:
    convs = list(binary_layers(build_op("nin", 8, 16, 2)))
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1), (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (8, 16, (2, 2)),
        (16, 16, (1, 1)),
        (16, 16, (1, 1)),
    ]


def test_dilated_and_grouped_convs() -> None:
    conv = next(binary_layers(build_op("binary_dil_conv_5x5", 8, 8, 1)))
    assert conv.kernel_size == (5, 5) and conv.dilation == (2, 2) and conv.padding == (4, 4)
    grouped = build_op("binary_conv_3x3", 8, 16, 2, groups=8)
    assert grouped(torch.randn(1, 8, 5, 5)).shape == (1, 16, 3, 3)
    assert next(binary_layers(grouped)).groups == 8


def test_activations_after_the_unit() -> None:
    x = torch.randn(2, 8, 5, 5)
    for name, kind in [
        ("relu", nn.ReLU),
        ("prelu", nn.PReLU),
        ("rprelu", RPReLU),
        ("hardtanh", nn.Hardtanh),
        ("none", nn.Identity),
    ]:
        op = build_op("bireal_block", 8, 8, 1, activation=name)
        assert isinstance(op.act, kind)
        assert op(x).shape == x.shape


def test_rprelu_follows_reactnet() -> None:
    act = RPReLU(3)
    with torch.no_grad():
        act.shift_in.copy_(torch.tensor([0.5, -1.0, 0.0]))
        act.slope.copy_(torch.tensor([0.1, 0.2, 0.3]))
        act.shift_out.copy_(torch.tensor([1.0, 2.0, -3.0]))
    x = torch.tensor([[0.0, 0.0, 2.0], [1.0, -2.0, -1.0]])
    y = x - act.shift_in
    expect = torch.where(y >= 0, y, act.slope * y) + act.shift_out
    assert torch.allclose(act(x), expect)
    assert act(x)[0].tolist() == pytest.approx([-0.05 + 1.0, 1.0 + 2.0, 2.0 - 3.0])
    maps = act(torch.randn(2, 3, 4, 4))
    assert maps.shape == (2, 3, 4, 4)


def test_binary_linear_layout_and_options() -> None:
    op = build_op("binary_linear", 16, 8, 1, dropout=0.5, input_dropout=0.2, activation="hardtanh")
    kinds = [type(m).__name__ for m in op]
    assert kinds == ["Dropout", "BinaryLinear", "BatchNorm1d", "Hardtanh", "Dropout"]
    assert op[0].p == 0.2 and op[4].p == 0.5
    assert isinstance(op[1], BinaryLinear) and op[1].config == BinarizeConfig(activation="ste", weight="sign")
    plain = build_op("binary_linear", 16, 8, 1, bn=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain)
    first = build_op("binary_linear", 16, 8, 1, binarize={"activation": "none", "weight": "sign"})
    x = torch.randn(3, 16)
    assert torch.allclose(first[0](x), x @ _sign(first[0].weight).T, atol=1e-5)  # real inputs, sign weights


def test_real_stem_and_linear_options() -> None:
    stem = build_op("conv_bn", 3, 16, 2, kernel=5, activation="relu")
    assert stem[0].kernel_size == (5, 5) and stem[0].padding == (2, 2) and isinstance(stem[2], nn.ReLU)
    assert stem(torch.randn(2, 3, 7, 7)).shape == (2, 16, 4, 4)
    head = build_op("linear", 10, 3, 1, bias=False, dropout=0.3)
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3 and head[1].bias is None
    assert type(head[1]) is nn.Linear and type(build_op("linear", 10, 3, 1)) is nn.Linear
    assert all(not isinstance(m, BinaryConv2d) for m in stem.modules())
