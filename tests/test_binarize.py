"""The STE core: forward values and gradients checked against the formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bnas.binarize import (
    ActivationQuantizer,
    BinarizeConfig,
    BinaryConv2d,
    BinaryLinear,
    WeightBinarizer,
    binary_layers,
    clip_latent_weights,
    hard_sigmoid,
    set_binarization,
    sign,
)

# Points that straddle every clip boundary, zero included.
X = torch.tensor([-3.0, -1.5, -1.0, -0.999, -0.5, -0.25, 0.0, 0.25, 0.5, 0.999, 1.0, 1.5, 3.0], dtype=torch.float64)


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def test_sign_of_zero_is_plus_one() -> None:
    assert sign(torch.tensor([0.0, -0.0, 1e-30, -1e-30])).tolist() == [1.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("name", ["ste", "approx_sign", "swish_sign", "identity_ste"])
def test_activation_forward_is_sign(name: str) -> None:
    q = ActivationQuantizer(name)
    expected = torch.where(X >= 0, 1.0, -1.0).to(X.dtype)
    assert torch.equal(q(X), expected)


@pytest.mark.parametrize("clip", [1.0, 0.5, 2.0])
def test_ste_gradient_is_clipped_identity(clip: float) -> None:
    g = _grad(ActivationQuantizer("ste", clip=clip), X)
    assert torch.equal(g, (X.abs() <= clip).to(X.dtype))


def test_approx_sign_gradient() -> None:
    g = _grad(ActivationQuantizer("approx_sign"), X)
    assert torch.allclose(g, torch.clamp(2 - 2 * X.abs(), min=0))

    # Matches the derivative of Bi-Real's piecewise polynomial, checked numerically.
    def poly(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < -1, -1.0, torch.where(x < 0, 2 * x + x * x, torch.where(x < 1, 2 * x - x * x, 1.0)))

    eps = 1e-6
    inner = X[(X.abs() < 0.99) & (X.abs() > 1e-3)]
    numeric = (poly(inner + eps) - poly(inner - eps)) / (2 * eps)
    assert torch.allclose(_grad(ActivationQuantizer("approx_sign"), inner), numeric, atol=1e-6)


def test_swish_sign_gradient_matches_signswish_derivative() -> None:
    beta = 5.0
    q = ActivationQuantizer("swish_sign", swish_beta=beta)
    g = _grad(q, X)

    def signswish(x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(beta * x)
        return 2 * s * (1 + beta * x * (1 - s)) - 1

    eps = 1e-6
    numeric = (signswish(X + eps) - signswish(X - eps)) / (2 * eps)
    assert torch.allclose(g, numeric, atol=1e-5)
    assert g[X == 0].item() == pytest.approx(beta)


def test_identity_ste_passes_gradient_unchanged() -> None:
    assert torch.equal(_grad(ActivationQuantizer("identity_ste"), X), torch.ones_like(X))


def test_none_quantizer_is_identity() -> None:
    assert torch.equal(ActivationQuantizer("none")(X), X)
    assert torch.equal(WeightBinarizer("none")(X), X)


def test_stochastic_activation_matches_hard_sigmoid_statistically() -> None:
    torch.manual_seed(0)
    q = ActivationQuantizer("stochastic").train()
    values = torch.tensor([-1.2, -0.6, -0.2, 0.0, 0.3, 0.8, 1.5])
    draws = q(values.repeat(20000, 1))
    assert set(draws.unique().tolist()) <= {-1.0, 1.0}
    p_plus = (draws > 0).double().mean(0)
    expected = hard_sigmoid(values).double()
    # 20000 draws: standard error <= 0.0036; allow 5 sigma.
    assert torch.allclose(p_plus, expected, atol=0.018)
    # Eval mode is deterministic and equals sign.
    q.eval()
    assert torch.equal(q(values.repeat(3, 1)), sign(values).repeat(3, 1))
    assert torch.equal(_grad(q, X), (X.abs() <= 1).to(X.dtype))


def test_rsign_threshold_shifts_sign_and_learns() -> None:
    q = ActivationQuantizer("rsign", channels=3)
    with torch.no_grad():
        q.threshold.copy_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.tensor([[[[0.2]], [[-0.2]], [[0.0]]]], requires_grad=True)
    out = q(x)
    assert out.flatten().tolist() == [-1.0, 1.0, 1.0]
    out.sum().backward()
    # d/dx = max(0, 2 - 2|x - b|); d/db is its negative.
    shifted = torch.tensor([0.2 - 0.5, -0.2 + 0.5, 0.0])
    expected = torch.clamp(2 - 2 * shifted.abs(), min=0)
    assert torch.allclose(x.grad.flatten(), expected)
    assert torch.allclose(q.threshold.grad, -expected)


# ---------------------------------------------------------------------------- weights
def _weights() -> torch.Tensor:
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w[0, 0, 0, 0] = 0.0
    w[1, 0, 0, 0] = 1.0  # exactly on the clip boundary
    w[2, 0, 0, 0] = -1.7  # outside it
    return w


def test_sign_weight_binarizer() -> None:
    w = _weights()
    b = WeightBinarizer("sign")
    assert torch.equal(b(w), sign(w))
    assert torch.equal(_grad(b, w), (w.abs() <= 1).to(w.dtype))


def test_xnor_forward_has_per_channel_alpha() -> None:
    w = _weights()
    out = WeightBinarizer("xnor")(w)
    alpha = w.abs().mean(dim=(1, 2, 3))
    for k in range(w.shape[0]):
        assert set(out[k].unique().tolist()) <= {alpha[k].item(), -alpha[k].item()}
        assert torch.equal(out[k], alpha[k] * sign(w[k]))


def test_xnor_gradient_flows_through_alpha_and_sign() -> None:
    w = _weights()
    upstream = torch.randn_like(w)
    wr = w.clone().requires_grad_(True)
    (WeightBinarizer("xnor")(wr) * upstream).sum().backward()
    n = w[0].numel()
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    # XNOR-Net: dL/dW = g * alpha * 1{|W|<=1} + d|W|/dW / n * sum(g * sign(W)); the derivative
    # of |W| is torch.sign(W) (0 at W = 0), while the binarized weight uses sign(0) = +1.
    alpha_grad = (upstream * sign(w)).sum(dim=(1, 2, 3), keepdim=True) / n
    expected = upstream * alpha * (w.abs() <= 1) + torch.sign(w) * alpha_grad
    assert torch.allclose(wr.grad, expected)


def test_xnor_tensor_uses_one_alpha() -> None:
    w = _weights()
    out = WeightBinarizer("xnor_tensor")(w)
    alpha = w.abs().mean()
    assert torch.allclose(out.abs(), alpha.expand_as(w))


def test_bireal_gradient_is_magnitude_aware() -> None:
    w = _weights()
    upstream = torch.randn_like(w)
    wr = w.clone().requires_grad_(True)
    out = WeightBinarizer("bireal")(wr)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, alpha * sign(w))
    (out * upstream).sum().backward()
    assert torch.allclose(wr.grad, upstream * alpha * (w.abs() <= 1))


def test_weight_clip_is_configurable() -> None:
    w = _weights()
    g = _grad(WeightBinarizer("sign", clip=0.5), w)
    assert torch.equal(g, (w.abs() <= 0.5).to(w.dtype))


def test_stochastic_weights_deterministic_in_eval() -> None:
    w = _weights()
    b = WeightBinarizer("stochastic").eval()
    assert torch.equal(b(w), sign(w))
    b.train()
    torch.manual_seed(0)
    draws = torch.stack([b(w) for _ in range(4000)])
    p = (draws > 0).double().mean(0)
    assert torch.allclose(p, hard_sigmoid(w), atol=0.04)


# ---------------------------------------------------------------------------- layers
def test_binary_conv_runs_on_signs_and_alpha() -> None:
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 5, 3, padding=1, config=BinarizeConfig("ste", "xnor")).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    alpha = conv.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = torch.nn.functional.conv2d(sign(x), alpha * sign(conv.weight), padding=1)
    assert torch.allclose(conv(x), expected)


def test_binary_linear_matches_formula() -> None:
    torch.manual_seed(0)
    layer = BinaryLinear(7, 4, config=BinarizeConfig("approx_sign", "sign")).double()
    x = torch.randn(3, 7, dtype=torch.float64)
    assert torch.equal(layer(x), sign(x) @ sign(layer.weight).T)


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match="unknown activation quantizer 'sgn'"):
        BinarizeConfig(activation="sgn")
    with pytest.raises(ValueError, match="unknown weight binarizer"):
        BinarizeConfig(weight="xor")
    with pytest.raises(ValueError, match="latent_clip"):
        BinarizeConfig(latent_clip=-1)
    with pytest.raises(ValueError, match="unknown binarize option"):
        BinarizeConfig.from_dict({"activation": "ste", "wieght": "xnor"})


def test_config_is_frozen_and_shared_safely() -> None:
    cfg = BinarizeConfig("ste", "xnor")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.activation = "none"  # type: ignore[misc]
    a = BinaryConv2d(4, 4, 3, config=cfg)
    b = BinaryConv2d(4, 4, 3, config=cfg)
    set_binarization(a, activations=False, weights=False)
    assert b.input_quantizer.enabled and b.kernel_quantizer.enabled
    assert cfg == BinarizeConfig("ste", "xnor")


def test_latent_clipping_and_glorot_lr_scale() -> None:
    layer = BinaryLinear(100, 50, config=BinarizeConfig("ste", "sign", latent_clip="glorot"))
    h = math.sqrt(1.5 / 150)
    assert layer.latent_clip_value == pytest.approx(h)
    assert layer.lr_scale == pytest.approx(1 / h)
    with torch.no_grad():
        layer.weight.mul_(100)
    clip_latent_weights(layer)
    assert layer.weight.abs().max().item() == pytest.approx(h)
    fixed = BinaryLinear(10, 10, config=BinarizeConfig(latent_clip=1.0))
    with torch.no_grad():
        fixed.weight.fill_(3.0)
    clip_latent_weights(fixed)
    assert torch.all(fixed.weight == 1.0)
    # The optimiser's groups that carry lr_scale: tests/test_train.py::test_glorot_lr_scale_reaches_the_optimizer.


def test_two_step_schedule_switch() -> None:
    torch.manual_seed(0)
    layer = BinaryLinear(6, 3, config=BinarizeConfig("ste", "xnor")).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    set_binarization(layer, activations=True, weights=False)
    assert torch.allclose(layer(x), sign(x) @ layer.weight.T)
    set_binarization(layer, activations=True, weights=True)
    alpha = layer.weight.abs().mean(dim=1, keepdim=True)
    assert torch.allclose(layer(x), sign(x) @ (alpha * sign(layer.weight)).T)


def test_glorot_lr_scale_with_unit_latent_clip() -> None:
    layer = BinaryLinear(100, 50, config=BinarizeConfig("ste", "sign", latent_clip=1.0, lr_scale="glorot"))
    assert layer.latent_clip_value == 1.0
    assert layer.lr_scale == pytest.approx(1 / math.sqrt(1.5 / 150))
    with pytest.raises(ValueError, match="lr_scale"):
        BinarizeConfig(lr_scale=0)


# --------------------------------------------------------------------------------------
# The one answer to "is this layer binary": the quantizers' precision, the layer's flags.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ActivationQuantizer, WeightBinarizer])
def test_quantizer_precision_is_one_bit_only_while_it_binarizes(cls: type) -> None:
    binarizing = cls("stochastic")
    assert binarizing.precision == 1
    binarizing.enabled = False
    assert binarizing.precision == 32
    assert cls("none").precision == 32


@pytest.mark.parametrize(
    ("activation", "weight", "acts_on", "weights_on", "flags"),
    [
        # (binarizes_input, binarizes_weights, fully_binary, has_latent_weights)
        ("ste", "xnor", True, True, (True, True, True, True)),
        ("rsign", "bireal", True, True, (True, True, True, True)),
        ("none", "sign", True, True, (False, True, False, True)),  # a binary-weight first layer
        ("ste", "none", True, True, (True, False, False, False)),  # binary activations, real weights
        ("none", "none", True, True, (False, False, False, False)),
        # the two-step schedule's first step: weights off, yet already latent binary weights
        ("ste", "xnor", True, False, (True, False, False, True)),
        # the full-precision twin: every quantizer off, plain real weights
        ("ste", "xnor", False, False, (False, False, False, False)),
        ("ste", "xnor", False, True, (False, True, False, True)),
    ],
)
def test_binary_layer_flags_follow_its_quantizers(
    activation: str, weight: str, acts_on: bool, weights_on: bool, flags: tuple[bool, bool, bool, bool]
) -> None:
    for layer in (
        BinaryConv2d(4, 4, 3, config=BinarizeConfig(activation, weight)),
        BinaryLinear(4, 4, config=BinarizeConfig(activation, weight)),
    ):
        set_binarization(layer, activations=acts_on, weights=weights_on)
        assert (layer.binarizes_input, layer.binarizes_weights, layer.fully_binary, layer.has_latent_weights) == flags


def test_binary_layers_finds_switched_off_layers_too() -> None:
    model = torch.nn.Sequential(
        BinaryConv2d(1, 2, 3),
        torch.nn.Conv2d(2, 2, 1),
        torch.nn.Flatten(),
        BinaryLinear(8, 3, config=BinarizeConfig("none", "none")),
    )
    set_binarization(model, activations=False, weights=False)
    assert [type(m) for m in binary_layers(model)] == [BinaryConv2d, BinaryLinear]
    assert not any(layer.fully_binary for layer in binary_layers(model))
