"""`bnas export --format lce`: a Larq Compute Engine flatbuffer that LCE's interpreter runs and
that predicts what the PyTorch model predicts (skipped without the [lce] extra)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

# found, not imported: tensorflow must first be imported by bnas (which sets TF_USE_LEGACY_KERAS)
if any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tf_keras", "larq", "larq_compute_engine")):
    pytest.skip("the [lce] extra is not installed", allow_module_level=True)

from deploy_nets import (  # noqa: E402
    FLIP_SHARE,
    GENOTYPES,
    assert_agrees,
    dyadic,
    dyadic_inputs,
    held_out_images,
    needs_mnist,
    quantizer_zoo,
    trained,
)

import bnas  # noqa: E402
from bnas.cli import main  # noqa: E402
from bnas.export import ExportError  # noqa: E402
from bnas.export.lce import LARQ_ACTIVATIONS, _padding, import_lce, to_lce  # noqa: E402
from bnas.export.verify import run_exported  # noqa: E402
from bnas.genotype import loads_genotype  # noqa: E402


def _ops(path: Path) -> dict[str, int]:
    """Operator name -> count in a flatbuffer (TFLite's analyzer, which knows LCE's ops)."""
    import io
    from contextlib import redirect_stdout

    import tensorflow as tf

    text = io.StringIO()
    with redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_path=str(path))
    counts: dict[str, int] = {}
    for line in text.getvalue().splitlines():
        line = line.strip()
        if line.startswith("Op#"):
            name = line.split()[1].split("(")[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------
# Padding: where TFLite's SAME is PyTorch's padding, and where it is not
# --------------------------------------------------------------------------------------
def test_padding_against_tflite_same_by_hand() -> None:
    # 3x3 stride 1 pad 1: SAME pads 1 and 1
    assert _padding((8, 8), (3, 3), (1, 1), (1, 1)) == "same"
    # 3x3 stride 2 pad 1 on an odd map (9 -> 5): SAME pads 1 and 1 as PyTorch
    assert _padding((9, 9), (3, 3), (2, 2), (1, 1)) == "same"
    # on an even map (8 -> 4) PyTorch's windows start at -1 (pad 1 before, the pad after unused);
    # SAME pads 0 before and 1 after
    assert _padding((8, 8), (3, 3), (2, 2), (1, 1)) == ((1, 0), (1, 0))
    # 2x2 stride 2 ceil_mode pool on 5: one pad after, as SAME; no padding at all on 4
    assert _padding((5, 5), (2, 2), (2, 2), (0, 0), ceil=True) == "same"
    assert _padding((4, 4), (2, 2), (2, 2), (0, 0), ceil=True) == "valid"
    assert _padding((24, 24), (5, 5), (1, 1), (0, 0)) == "valid"


def test_every_activation_quantizer_has_a_larq_equivalent() -> None:
    from bnas.binarize import ACTIVATION_QUANTIZERS

    assert set(LARQ_ACTIVATIONS) == set(ACTIVATION_QUANTIZERS) - {"none"}


# --------------------------------------------------------------------------------------
# Networks that export, checked in LCE's interpreter against PyTorch
# --------------------------------------------------------------------------------------
def test_every_quantizer_exports_and_agrees(tmp_path: Path) -> None:
    """One layer per activation quantizer and weight binarizer (learned scale, rsign, real
    weights on binary inputs, binary weights on real inputs, PReLU, RPReLU, stride 2, pools)."""
    model = quantizer_zoo()
    path = to_lce(model, tmp_path / "zoo.tflite")
    ops = _ops(path)
    # 8 fully binary convs (7 conv units, the VGG block) + the binary linear layer as a 1x1 binary conv;
    # binary weights on real inputs and real weights on binary inputs stay float convs
    assert ops.get("LceBconv2d") == 9, ops
    x = torch.randn(300, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert_agrees(model, run_exported(path, "lce", x), x)


def test_an_export_runs_the_layers_as_written_not_through_autograph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Autograph's transpiling was two thirds of an export's time (benchmarks/lce_export.py)
    # and bnas's, larq's and tf-keras's layers have no tensor-dependent control flow for it.
    lib = import_lce()  # tensorflow imported as bnas imports it (Keras 2)
    from tensorflow.python.autograph.impl import api

    transpiled: list[str] = []
    convert = api._convert_actual

    def spy(entity, program_ctx):
        transpiled.append(getattr(entity, "__module__", None) or "")
        return convert(entity, program_ctx)

    monkeypatch.setattr(api, "_convert_actual", spy)
    to_lce(bnas.build(bnas.load_genotype(GENOTYPES / "digits_small.yaml")).eval(), tmp_path / "m.tflite")
    # (the model's own traced function is transpiled on request, whatever its module)
    layers = ("bnas.", "larq.", "tf_keras.src.engine.", "tf_keras.src.layers.")
    assert not [m for m in transpiled if m.startswith(layers)], transpiled
    # outside an export, autograph transpiles larq's layers again
    sign = lib.lq.quantizers.SteSign()
    lib.tf.function(lambda x: sign(x))(lib.tf.ones((2, 2)))
    assert any(m.startswith("larq.") for m in transpiled), transpiled


def test_cli_exports_digits_small_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = trained("digits_small", "digits", 60, 64)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "model.tflite"
    rc = main(
        ["export", str(GENOTYPES / "digits_small.yaml"), str(ckpt), "--format", "lce", "--out", str(out)]
        + ["--verify", "100", "--dataset", "digits"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert (
        "verify (100 validation images of digits, LCE's interpreter vs PyTorch): same class on 100/100 images"
        in printed
    )
    ops = _ops(out)
    assert ops.get("LceBconv2d") == 4, ops  # the four bireal units
    assert "CONV_2D" in ops  # the real stem and the stride-2 shortcut's 1x1 conv stay float
    x, _ = held_out_images("digits")
    assert len(x) > 300
    assert_agrees(model, run_exported(out, "lce", x), x)  # every test image


@pytest.mark.slow
def test_bireal_resnet18_on_synthetic_inputs(tmp_path: Path) -> None:
    model = dyadic(bnas.build(bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")))
    path = to_lce(model, tmp_path / "bireal.tflite")
    assert _ops(path).get("LceBconv2d") == 16
    assert _ops(path).get("REVERSE_V2") == 6  # 3 stride-2 binary convs on even maps, reversed in and out
    # 32 images, each through every layer (LCE's interpreter takes about 50 ms an image here)
    x = dyadic_inputs(32, (3, 32, 32))
    assert_agrees(model, run_exported(path, "lce", x), x, rel=1e-3)


@needs_mnist()
@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps", "bconvs"), [("bnn_mlp_2048", 40, 3), ("binary_lenet5", 150, 2)])
def test_mnist_seed_genotypes_agree_on_every_test_image(tmp_path: Path, name: str, steps: int, bconvs: int) -> None:
    model = trained(name, "mnist", steps)
    path = to_lce(model, tmp_path / f"{name}.tflite")
    # mlp: the first layer is real-input (float); lenet: the second conv and the 500-unit layer
    assert _ops(path).get("LceBconv2d") == bconvs
    x, y = held_out_images("mnist")
    assert len(x) == 10000
    out = run_exported(path, "lce", x)
    assert (out.argmax(1) == y.numpy()).mean() > 0.8  # trained, not chance
    assert_agrees(model, out, x, flip_share=FLIP_SHARE)


# --------------------------------------------------------------------------------------
# What does not export: one line naming the op
# --------------------------------------------------------------------------------------
def test_an_op_without_an_equivalent_is_named(tmp_path: Path) -> None:
    genotype = loads_genotype(
        """
name: odd_padding
input: [1, 28, 28]
num_classes: 3
body:
  - {op: binary_conv_pool, channels: 32, binarize: {activation: none, weight: xnor}}
  - {op: binary_conv_pool, channels: 32, kernel: 5, padding: 1, stride: 2}
  - {op: flatten}
head:
  - {op: linear}
"""
    )
    # 12 -> 5 with PyTorch's windows at -1, 1, ..., 7: SAME would give 6, and LCE reads a pad
    # before the sign as +1, so there is no binary conv for it
    with pytest.raises(
        ExportError,
        match=r"^bnas export --format lce: body\[1\] \(op binary_conv_pool\), module body\.1\.op\.0 "
        r"\(ScaledSignConv2d\): a binary conv whose padding \(1, 0\) x \(1, 0\) on a 12x12 map is neither "
        r"TFLite's SAME nor its mirror image has no LCE equivalent; use 'same' padding",
    ):
        to_lce(bnas.build(genotype).eval(), tmp_path / "z.tflite")
    assert not (tmp_path / "z.tflite").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion_searched", "kim2020_bnas_a"])
def test_shipped_cell_genotypes_export(tmp_path: Path, name: str) -> None:
    """Cells: zero edges, dilated stride-2 convs (stride 1, then every other pixel), factorized
    reduces, the residual projection. (darts_v2_binary, with binary separable convs, exports
    and agrees too, but its conversion takes 100 s here; test_export_onnx covers it.)"""
    genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    # one of each repeated cell: every cell kind and every transition between them stays, the
    # conversion takes a third of the time (kim2020_bnas_a: 20 cells -> 6)
    genotype = dataclasses.replace(
        genotype, body=tuple(dataclasses.replace(layer, repeat=1) for layer in genotype.body)
    )
    model = dyadic(bnas.build(genotype))
    path = to_lce(model, tmp_path / f"{name}.tflite")
    assert _ops(path).get("LceBconv2d", 0) > 0
    x = dyadic_inputs(32, tuple(genotype.input))
    assert_agrees(model, run_exported(path, "lce", x), x)
