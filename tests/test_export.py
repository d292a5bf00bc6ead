"""Export of trained networks to the packed 1-bit format (bnas.export, `bnas export`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize
from safetensors import safe_open
from safetensors.torch import save_file

import bnas
from bnas.binarize import BinarizeConfig, BinaryConv2d, BinaryLinear
from bnas.cli import main
from bnas.data import load_dataset
from bnas.evaluate import evaluate
from bnas.export import ExportError, PackedConv2d, PackedLinear, freeze_model, load_packed, pack_model, save_packed
from bnas.kernels import unpack_weights

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

ROOT = Path(__file__).resolve().parents[1]
GENOTYPES = ROOT / "search_spaces" / "genotypes"


def assert_logits_close(packed: torch.Tensor, ref: torch.Tensor, rel: float = 1e-3) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(packed, ref, rtol=rel, atol=rel * scale)


# --------------------------------------------------------------------------------------
# A trained digits network: export, reload, same predictions
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("digits_run")
    genotype = bnas.load_genotype(GENOTYPES / "digits_small.yaml")
    torch.manual_seed(0)
    report = evaluate(genotype, "digits", overrides={"epochs": 2}, out=out, progress=False, test=False)
    model = bnas.build(genotype)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    data = load_dataset("digits", val_fraction=0.1, seed=0, shape=tuple(genotype.input), num_classes=10)
    return {"out": out, "genotype": genotype, "model": model.eval(), "data": data, "report": report}


def test_cli_export_matches_trained_model_on_every_test_image(trained: dict, tmp_path: Path, capsys) -> None:
    target = tmp_path / "model.bnas"
    rc = main(
        ["export", str(GENOTYPES / "digits_small.yaml"), str(trained["out"] / "checkpoint.pt"), "--out", str(target)]
    )
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    packed = load_packed(target)
    assert not any(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in packed.modules())
    assert sum(isinstance(m, PackedConv2d) for m in packed.modules()) == 4  # 4 bireal units
    x = torch.cat([xb for xb, _ in trained["data"].loader("test", 512)])
    assert len(x) == len(trained["data"].test_x) > 300
    with torch.no_grad():
        ref = trained["model"](x)
    out = packed(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))  # every test image
    for i in range(len(x)):  # logits within 1e-3 relative, image by image
        assert_logits_close(out[i], ref[i])


def test_checkpoint_dict_and_plain_state_dict_export_alike(trained: dict, tmp_path: Path) -> None:
    a, b = tmp_path / "a.bnas", tmp_path / "b.bnas"
    bnas.export.export(trained["genotype"], trained["out"] / "checkpoint.pt", a)
    bnas.export.export(trained["genotype"], trained["out"] / "model.pt", b)
    x = torch.randn(16, 1, 8, 8)
    # checkpoint.pt holds the last epoch, model.pt the final model: the same weights here.
    assert torch.equal(load_packed(a)(x), load_packed(b)(x))


def test_binary_weights_take_one_bit_each(trained: dict, tmp_path: Path) -> None:
    target = tmp_path / "m.bnas"
    packed, _ = bnas.export.export(trained["genotype"], trained["out"] / "model.pt", target)
    binary_weights = sum(m.weight.numel() for m in trained["model"].modules() if isinstance(m, BinaryConv2d))
    with safe_open(str(target), framework="pt") as fh:
        packed_keys = [k for k in fh.keys() if k.endswith("weight_packed")]
        bits = 0
        for k in packed_keys:
            t = fh.get_tensor(k)
            assert t.dtype == torch.int32
            bits += t.numel() * 32
    assert len(packed_keys) == 4
    assert bits == binary_weights  # 32 and 64 input channels: no padding bits at all
    float_bytes = (trained["out"] / "model.pt").stat().st_size
    file_bytes = target.stat().st_size
    binary_float_bytes = binary_weights * 4
    print(
        f"\npacked file {file_bytes} B vs float checkpoint {float_bytes} B: {float_bytes / file_bytes:.1f}x smaller; "
        f"binary weights {bits // 8} B vs {binary_float_bytes} B as float32 (32x)"
    )
    assert file_bytes < float_bytes / 3


def test_file_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = randomize(bnas.build(GENOTYPES / "digits_small.yaml"))
    packed = pack_model(model)
    first, second = tmp_path / "1.bnas", tmp_path / "2.bnas"
    save_packed(packed, first)
    loaded = load_packed(first)
    save_packed(loaded, second)
    with safe_open(str(first), framework="pt") as f1, safe_open(str(second), framework="pt") as f2:
        meta1, meta2 = f1.metadata(), f2.metadata()
        assert sorted(f1.keys()) == sorted(f2.keys())
        for k in f1.keys():
            assert torch.equal(f1.get_tensor(k), f2.get_tensor(k)), k
    assert meta1 == meta2
    assert meta1["format"] == "bnas-packed" and meta1["version"] == "1"
    assert bnas.genotype.genotype_from_dict(yaml.safe_load(meta1["genotype"])) == model.genotype
    assert json.loads(meta1["layers"]) == packed.layers
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(loaded(x), packed(x))
    # the packed weights are the signs of the latent weights
    conv = model.body[0].op.conv
    assert torch.equal(
        unpack_weights(loaded.net.body[0].op.conv.weight_packed, 32), torch.where(conv.weight >= 0, 1.0, -1.0)
    )


# --------------------------------------------------------------------------------------
# Folding: random networks, random BN statistics
# --------------------------------------------------------------------------------------
def test_bireal_resnet18_random_weights_and_statistics() -> None:
    torch.manual_seed(0)
    model = randomize(bnas.build(GENOTYPES / "bireal_resnet18.yaml"), seed=3)
    packed = pack_model(model)
    kinds = [e["kind"] for e in packed.layers]
    assert kinds.count("packed_conv2d") == 16
    assert kinds.count("identity") == 20  # 16 binary convs + stem + 3 downsample shortcuts
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    out = packed(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert_logits_close(out, ref)
    assert_logits_close(freeze_model(model)(x), ref)
    # the source model is left as it was
    assert isinstance(model.body[0].op.conv, BinaryConv2d) and isinstance(model.body[0].op.bn, torch.nn.BatchNorm2d)


MIXED = {
    "name": "mixed_binarizations",
    "input": [3, 12, 12],
    "num_classes": 5,
    "stem": [{"op": "conv_bn", "channels": 40}],
    "body": [
        # rsign threshold, RPReLU, odd channel count (40: a padded last word)
        {
            "op": "conv_unit",
            "channels": 40,
            "order": "conv_bn_act",
            "activation": "rprelu",
            "binarize": {"activation": "rsign", "weight": "xnor"},
        },
        # conv -> max-pool -> BN: the BN must stay in float
        {"op": "vgg_block", "channels": 40, "stride": 2, "binarize": {"activation": "ste", "weight": "xnor_tensor"}},
        # BN -> sign -> conv (no BN after the conv); grouped
        {"op": "conv_unit", "channels": 40, "groups": 2, "binarize": {"activation": "ste", "weight": "sign"}},
        # real activations: a float conv with alpha * sign(W)
        {
            "op": "conv_unit",
            "channels": 40,
            "order": "conv_bn_act",
            "binarize": {"activation": "none", "weight": "xnor"},
        },
        # binary activations, real weights: a float conv on signs
        {
            "op": "conv_unit",
            "channels": 40,
            "order": "conv_bn_act",
            "binarize": {"activation": "approx_sign", "weight": "none"},
        },
    ],
    "head": [
        {"op": "global_avgpool"},
        {"op": "binary_linear", "channels": 24, "binarize": {"activation": "ste", "weight": "bireal"}},
        {"op": "linear"},
    ],
}


def test_mixed_binarizations_fold_only_where_proven(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = randomize(bnas.build(MIXED), seed=5)
    packed = pack_model(model)
    by_path = {e["path"]: e for e in packed.layers}
    assert by_path["body.0.op.conv"]["kind"] == "packed_conv2d" and by_path["body.0.op.conv"]["threshold"]
    assert by_path["body.0.op.conv"]["folded_bn"] == "body.0.op.bn"
    assert by_path["body.1.op.conv"]["folded_bn"] is None  # max-pool between conv and BN
    assert isinstance(packed.net.body[1].op.bn, torch.nn.BatchNorm2d)
    assert by_path["body.2.op.conv"]["kind"] == "packed_conv2d" and by_path["body.2.op.conv"]["groups"] == 2
    assert by_path["body.3.op.conv"]["kind"] == "conv2d"
    assert by_path["body.4.op.conv"]["kind"] == "sign_conv2d"
    assert by_path["head.1.0"]["kind"] == "packed_linear" and by_path["head.1.0"]["folded_bn"] == "head.1.1"
    assert isinstance(packed.net.head[1][0], PackedLinear)
    x = torch.randn(6, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    assert_logits_close(packed(x), ref)
    save_packed(packed, tmp_path / "mixed.bnas")
    assert torch.equal(load_packed(tmp_path / "mixed.bnas")(x), packed(x))


def test_packed_network_stays_in_eval_mode() -> None:
    packed = pack_model(randomize(bnas.build(GENOTYPES / "digits_small.yaml")))
    packed.train()
    assert not any(m.training for m in packed.modules())
    assert not any(p.requires_grad for p in packed.parameters())


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def test_wrong_files_give_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bnas"
    junk.write_bytes(b"\x00not a model at all" * 50)
    with pytest.raises(ExportError, match="not a bnas packed model"):
        load_packed(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="not a bnas packed model.*bnas export"):
        load_packed(other)
    newer = tmp_path / "newer.bnas"
    save_file({"w": torch.zeros(3)}, str(newer), metadata={"format": "bnas-packed", "version": "9"})
    with pytest.raises(ExportError, match="version '9'"):
        load_packed(newer)
    with pytest.raises(ExportError, match="no packed model"):
        load_packed(tmp_path / "missing.bnas")


def test_wrong_genotype_checkpoint_pair(trained: dict, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "export",
            str(GENOTYPES / "bireal_resnet18.yaml"),
            str(trained["out"] / "checkpoint.pt"),
            "--out",
            str(tmp_path / "x.bnas"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "does not match the network" in err
    assert "bireal_resnet18" in err and "Traceback" not in err
    assert not (tmp_path / "x.bnas").exists()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(bnas.errors.BnasError, match="is not a PyTorch checkpoint"):
        bnas.export.export(trained["genotype"], bad, tmp_path / "y.bnas")


def test_real_input_first_layer_keeps_one_bit_weights(tmp_path: Path) -> None:
    """bnn_mlp_2048's first layer (real pixels x binary weights) packs its 1.6 M weights to
    1 bit with alpha and the folded BN in the epilogue, and predicts like the float layer."""
    torch.manual_seed(0)
    model = randomize(bnas.build(GENOTYPES / "bnn_mlp_2048.yaml"), seed=4)
    packed = pack_model(model)
    first = packed.net.body[0].op[0]
    assert [e["kind"] for e in packed.layers if e["kind"] != "identity"] == [
        "packed_weight_linear",
        "packed_linear",
        "packed_linear",
        "packed_linear",
    ]
    assert first.weight_packed.shape == (2048, 25) and first.weight_packed.dtype == torch.int32  # 784 bits -> 25 words
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(packed(x).argmax(1), ref.argmax(1))
    assert_logits_close(packed(x), ref)
    # 1.6 M weights at 1 bit: the whole file is ~1.3 MB where a float first layer alone takes 6.4 MB
    path = save_packed(packed, tmp_path / "mlp.bnas")
    assert path.stat().st_size < 1.5e6
    assert torch.equal(load_packed(path)(x), packed(x))


def test_weights_that_are_not_one_magnitude_per_output_stay_float() -> None:
    class TwoMagnitudes(BinaryLinear):
        def binary_weight(self) -> torch.Tensor:
            w = super().binary_weight()
            return w * torch.linspace(1.0, 2.0, w.shape[1])  # a magnitude per input: not +-alpha_k

    layer = TwoMagnitudes(6, 3, config=BinarizeConfig(activation="none", weight="xnor"))
    packed = pack_model(torch.nn.Sequential(layer))
    assert [e["kind"] for e in packed.layers] == ["linear"]
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x))
