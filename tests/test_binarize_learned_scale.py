"""A learnable per-output-channel weight scale (``BinarizeConfig.learned_scale``): config, layers,
gradients, the float twin, checkpoints, weight decay, export and the catalog schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import randomize

import bnas
from bnas.binarize import BinarizeConfig, BinaryConv2d, BinaryLinear, WeightBinarizer, set_binarization, sign
from bnas.errors import GenotypeError
from bnas.export import PackedConv2d, PackedLinear, load_packed, pack_model
from bnas.schemas import validate
from bnas.train import Recipe, param_groups

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

NONE_MESSAGE = (
    "learned_scale: true cannot be used with weight: none; use one of sign, xnor, xnor_tensor, bireal, "
    "or learned_scale: false"
)


def assert_logits_close(packed: torch.Tensor, ref: torch.Tensor, rel: float = 1e-3) -> None:
    """tests/test_export.py's tolerance: 1e-3 relative to the largest logit."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(packed, ref, rtol=rel, atol=rel * scale)


def random_positive_scales(model: torch.nn.Module, seed: int) -> int:
    """Set every learned scale to random values in [0.05, 2.05); returns how many layers."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, (BinaryConv2d, BinaryLinear)) and m.kernel_quantizer.learned_scale is not None:
            s = m.kernel_quantizer.learned_scale
            s.data.copy_(torch.rand(s.shape, generator=gen) * 2 + 0.05)
            n += 1
    return n


# --------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------
def test_config_default_round_trip_and_errors() -> None:
    assert BinarizeConfig().learned_scale is False
    config = BinarizeConfig("ste", "bireal", learned_scale=True)
    assert config.to_dict()["learned_scale"] is True
    assert BinarizeConfig.from_dict(config.to_dict()) == config
    assert BinarizeConfig.from_dict({"weight": "sign", "learned_scale": True}).learned_scale is True
    with pytest.raises(ValueError) as info:
        BinarizeConfig(weight="none", learned_scale=True)
    assert str(info.value) == NONE_MESSAGE
    with pytest.raises(ValueError, match="learned_scale: true cannot be used with weight: stochastic"):
        BinarizeConfig(weight="stochastic", learned_scale=True)
    with pytest.raises(ValueError, match="learned_scale must be true or false, got 'yes'"):
        BinarizeConfig(learned_scale="yes")  # type: ignore[arg-type]
    # the binarizer refuses too, when built by hand
    with pytest.raises(ValueError, match="learned_scale: true cannot be used with weight: stochastic"):
        WeightBinarizer("stochastic", initial_scale=torch.ones(3, 1))
    # off, none and stochastic stay valid
    BinarizeConfig(weight="none")
    BinarizeConfig(weight="stochastic", learned_scale=False)


# --------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", ["sign", "xnor", "xnor_tensor", "bireal"])
def test_scale_shape_init_and_forward(weight: str) -> None:
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 5, 3, padding=1, config=BinarizeConfig("ste", weight, learned_scale=True))
    lin = BinaryLinear(7, 4, config=BinarizeConfig("ste", weight, learned_scale=True))
    for layer, shape in ((conv, (5, 1, 1, 1)), (lin, (4, 1))):
        s = layer.kernel_quantizer.learned_scale
        assert isinstance(s, torch.nn.Parameter) and s.shape == shape
        w = layer.weight.detach()
        # XNOR-Net's alpha, channel by channel, computed by hand
        for c in range(w.shape[0]):
            assert s[c].item() == pytest.approx(w[c].abs().mean().item(), rel=1e-6)
        # scale(w) is the parameter itself, whatever w is
        assert layer.kernel_quantizer.scale(torch.randn_like(w)) is s
    # training starts where xnor starts: same weights, same output
    xnor = BinaryConv2d(3, 5, 3, padding=1, config=BinarizeConfig("ste", "xnor"))
    xnor.weight.data.copy_(conv.weight.data)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), xnor(x))
    # after changing it, the forward is scale * sign(W)
    conv.kernel_quantizer.learned_scale.data.copy_(torch.arange(1.0, 6.0).view(5, 1, 1, 1))
    expected = F.conv2d(sign(x), torch.arange(1.0, 6.0).view(5, 1, 1, 1) * sign(conv.weight.detach()), padding=1)
    torch.testing.assert_close(conv(x), expected)
    assert "learned_scale=True" in repr(conv) and "learned_scale" in repr(conv.kernel_quantizer)
    assert "learned_scale" not in repr(xnor)


@pytest.mark.parametrize("weight", ["xnor", "bireal", "sign"])
def test_scale_and_weight_gradients_match_the_formula(weight: str) -> None:
    torch.manual_seed(1)
    layer = BinaryConv2d(4, 6, 3, padding=1, config=BinarizeConfig("ste", weight, learned_scale=True))
    with torch.no_grad():
        layer.weight[0, 0] = 1.5  # outside the STE clip: no gradient reaches these
        layer.kernel_quantizer.learned_scale.copy_(torch.rand(6, 1, 1, 1) + 0.1)
    x, g = torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5)
    (layer(x) * g).sum().backward()
    s = layer.kernel_quantizer.learned_scale.detach()
    w = layer.weight.detach()
    # dL/dWb of y = conv(sign(x), Wb), from a plain conv on the same binarized weights
    wb = (s * sign(w)).requires_grad_()
    (F.conv2d(sign(x), wb, padding=1) * g).sum().backward()
    grad_wb = wb.grad
    assert grad_wb is not None and grad_wb.abs().sum() > 0
    expected_ds = (grad_wb * sign(w)).sum(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(layer.kernel_quantizer.learned_scale.grad, expected_ds)
    # the latent weights get the STE: dL/dWb * scale * 1{|W| <= clip}
    inside = (w.abs() <= 1.0).float()
    torch.testing.assert_close(layer.weight.grad, grad_wb * s * inside)
    assert torch.count_nonzero(layer.weight.grad[0, 0]) == 0


def test_linear_scale_gradient() -> None:
    torch.manual_seed(2)
    layer = BinaryLinear(9, 3, config=BinarizeConfig("ste", "xnor", learned_scale=True))
    x, g = torch.randn(5, 9), torch.randn(5, 3)
    (layer(x) * g).sum().backward()
    # y = sign(x) @ (s * sign(W)).T, so dL/ds_c = sum_j (g.T @ sign(x))[c, j] * sign(W)[c, j]
    grad_wb = g.T @ sign(x)
    expected = (grad_wb * sign(layer.weight.detach())).sum(dim=1, keepdim=True)
    torch.testing.assert_close(layer.kernel_quantizer.learned_scale.grad, expected)


def test_float_twin_uses_the_latent_weights() -> None:
    torch.manual_seed(3)
    layer = BinaryConv2d(3, 4, 3, padding=1, config=BinarizeConfig("none", "xnor", learned_scale=True))
    layer.kernel_quantizer.learned_scale.data.fill_(7.0)
    set_binarization(layer, activations=False, weights=False)
    assert torch.equal(layer.binary_weight(), layer.weight)
    x = torch.randn(2, 3, 5, 5)
    out = layer(x)
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, padding=1))
    out.sum().backward()
    assert layer.kernel_quantizer.learned_scale.grad is None  # unused
    assert not layer.binarizes_weights
    # the genotype's full-precision twin, the same
    twin = bnas.build(_genotype(), binarize=False)
    scaled = [m for m in twin.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    assert len(scaled) == 3
    for m in scaled:
        assert m.kernel_quantizer.learned_scale is not None
        assert torch.equal(m.binary_weight(), m.weight)


def test_state_dict_keeps_the_scale(tmp_path: Path) -> None:
    config = BinarizeConfig("ste", "xnor", learned_scale=True)
    a, b = BinaryConv2d(3, 4, 3, config=config), BinaryConv2d(3, 4, 3, config=config)
    a.kernel_quantizer.learned_scale.data.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1))
    assert "kernel_quantizer.learned_scale" in a.state_dict()
    assert "kernel_quantizer.learned_scale" not in BinaryConv2d(3, 4, 3).state_dict()
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    assert torch.equal(b.kernel_quantizer.learned_scale, a.kernel_quantizer.learned_scale)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("decay_binary_weights", [False, True])
def test_scales_get_no_weight_decay(decay_binary_weights: bool) -> None:
    torch.manual_seed(4)
    model = bnas.build(_genotype())
    recipe = Recipe.from_dict(
        {"optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4}, "decay_binary_weights": decay_binary_weights}
    )
    decay_of = {id(p): g["weight_decay"] for g in param_groups(model, recipe) for p in g["params"]}
    assert len(decay_of) == sum(1 for p in model.parameters() if p.requires_grad)
    layers = [m for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    assert len(layers) == 3
    for m in layers:
        assert decay_of[id(m.kernel_quantizer.learned_scale)] == 0.0
        assert decay_of[id(m.weight)] == (1e-4 if decay_binary_weights else 0.0)
    # a real conv (the stem) still decays: the rule was not switched off wholesale
    assert decay_of[id(model.stem[0][0].weight)] == 1e-4


# --------------------------------------------------------------------------------------
# Export: the learned scale is what gets folded
# --------------------------------------------------------------------------------------
def _genotype() -> dict:
    return {
        "name": "learned_scales",
        "input": [3, 10, 10],
        "num_classes": 5,
        "stem": [{"op": "conv_bn", "channels": 24}],
        "body": [
            {
                "op": "conv_unit",
                "channels": 24,
                "order": "conv_bn_act",
                "binarize": {"activation": "ste", "weight": "xnor", "learned_scale": True},
            },
            {
                "op": "conv_unit",
                "channels": 24,
                "groups": 2,
                "binarize": {"activation": "ste", "weight": "sign", "learned_scale": True},
            },
        ],
        "head": [
            {"op": "global_avgpool"},
            {
                "op": "binary_linear",
                "channels": 16,
                "binarize": {"activation": "ste", "weight": "bireal", "learned_scale": True},
            },
            {"op": "linear"},
        ],
    }


def test_packed_conv_and_linear_use_the_learned_scale() -> None:
    torch.manual_seed(5)
    config = BinarizeConfig("ste", "xnor", learned_scale=True)
    # 3 x 3 x 3 taps and no padding: every conv dot is odd, never 0, so the linear layer's signs
    # of it cannot flip on rounding
    model = torch.nn.Sequential(
        BinaryConv2d(3, 12, 3, config=config), torch.nn.Flatten(), BinaryLinear(12 * 4 * 4, 6, config=config)
    ).eval()
    assert random_positive_scales(model, seed=1) == 2
    packed = pack_model(model)
    conv, lin = packed.net[0], packed.net[2]
    assert isinstance(conv, PackedConv2d) and isinstance(lin, PackedLinear)
    # no BN to fold: the packed scale is the learned scale, not mean |W|
    torch.testing.assert_close(conv.scale, model[0].kernel_quantizer.learned_scale.detach().reshape(-1))
    torch.testing.assert_close(lin.scale, model[2].kernel_quantizer.learned_scale.detach().reshape(-1))
    assert not torch.allclose(conv.scale, model[0].weight.detach().abs().mean(dim=(1, 2, 3)))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    assert_logits_close(packed(x), ref)


def test_export_of_a_genotype_matches_the_model(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = bnas.build(_genotype())
    randomize(model, seed=7)
    assert random_positive_scales(model, seed=8) == 3
    model.eval()
    # through a checkpoint file, as `bnas export` reads it: the scales travel in the state_dict
    torch.save(model.state_dict(), tmp_path / "model.pt")
    genotype = bnas.load_genotype(_genotype())
    packed, path = bnas.export.export(genotype, tmp_path / "model.pt", tmp_path / "m.bnas")
    kinds = {e["path"]: e["kind"] for e in packed.layers}
    assert kinds["body.0.op.conv"] == kinds["body.1.op.conv"] == "packed_conv2d"
    assert kinds["head.1.0"] == "packed_linear"
    x = torch.randn(6, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    assert_logits_close(packed(x), ref)
    assert torch.equal(load_packed(path)(x), packed(x))
    # had export folded mean |W| (xnor's alpha) instead, the logits would be off: the check above can fail
    xnor_alpha = copy.deepcopy(model)
    for m in xnor_alpha.modules():
        if isinstance(m, (BinaryConv2d, BinaryLinear)):
            w = m.weight.detach()
            m.kernel_quantizer.learned_scale.data.copy_(w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True))
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_logits_close(xnor_alpha(x), ref)


# --------------------------------------------------------------------------------------
# The catalog schema says what BinarizeConfig says
# --------------------------------------------------------------------------------------
def test_catalog_schema_and_loader_refuse_learned_scale_without_a_sign(tmp_path: Path) -> None:
    text = "binarize:\n  b: {weight: none, learned_scale: true}\n"
    with pytest.raises(GenotypeError) as info:
        validate("catalog", yaml.safe_load(text), "mine.yaml")
    assert str(info.value) == f"mine.yaml: binarize.b: {NONE_MESSAGE}"
    from bnas.registry import CatalogError, load_catalog

    file = tmp_path / "mine.yaml"
    file.write_text(text)
    with pytest.raises(CatalogError) as caught:
        load_catalog(file)
    assert str(caught.value) == f"{file}: binarize.b: {NONE_MESSAGE}"
    with pytest.raises(GenotypeError, match="binarize.b: learned_scale must be true or false, got 'yes'"):
        validate("catalog", {"binarize": {"b": {"learned_scale": "yes"}}}, "mine.yaml")
    validate("catalog", {"binarize": {"b": {"weight": "xnor", "learned_scale": True}}}, "mine.yaml")
