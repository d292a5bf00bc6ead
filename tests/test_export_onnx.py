"""`bnas export --format onnx`: standard ONNX that onnxruntime runs and that predicts what the
PyTorch model predicts (skipped without the [onnx] extra); bnas without either extra (always run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from deploy_nets import (
    FLIP_SHARE,
    GENOTYPES,
    ROOT,
    assert_agrees,
    dyadic,
    dyadic_inputs,
    held_out_images,
    needs_mnist,
    quantizer_zoo,
    trained,
)

import bnas
from bnas.cli import main


def test_bnas_imports_without_the_extras() -> None:
    """The export path imports TF / larq / onnx lazily: importing bnas and its exporters loads none."""
    code = (
        "import sys, bnas, bnas.cli, bnas.export.lce, bnas.export.onnx, bnas.export.verify\n"
        "loaded = [m for m in ('tensorflow', 'larq', 'larq_compute_engine', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


from bnas.export.onnx import to_onnx  # noqa: E402  (imports onnx only when it exports)
from bnas.export.verify import compare, run_exported  # noqa: E402

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
    reason="the [onnx] extra is not installed",
)


@pytest.mark.parametrize(("fmt", "module"), [("lce", "tensorflow"), ("onnx", "onnx")])
def test_a_missing_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fmt: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError, installed or not
    genotype = GENOTYPES / "digits_small.yaml"
    ckpt = tmp_path / "model.pt"
    torch.save(bnas.build(bnas.load_genotype(genotype)).state_dict(), ckpt)
    out = tmp_path / f"m.{fmt}"
    assert main(["export", str(genotype), str(ckpt), "--format", fmt, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: bnas export --format {fmt} needs the [{fmt}] extra ({module} is not installed): "
        f"pip install 'bnas[{fmt}]'"
    )
    assert not out.exists()


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@needs_onnx
def test_binary_layers_are_sign_and_pm1_conv_with_bn_folded(tmp_path: Path) -> None:
    model = quantizer_zoo()
    path = to_onnx(model, tmp_path / "zoo.onnx")
    import onnx

    graph = onnx.load(str(path)).graph
    ops = _ops(path)
    # BNs after a conv or linear layer are folded; those before a sign (bn_conv_act) or after a
    # max-pool stay: 8 conv units with a BN first, the VGG block's BN after its pool
    assert ops["BatchNormalization"] <= 9, ops
    # sign(sign(x) + 0.5) per binary input: 8 fully binary convs, the binary linear layer and the
    # conv with real weights on binary inputs
    assert ops["Sign"] == 2 * 10, ops
    # the fully binary layers' weights are exactly +-1 (alpha and the BN sit in Mul / Add)
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    conv_weights = [weights[n.input[1]] for n in graph.node if n.op_type == "Conv" and n.input[1] in weights]
    pm1 = [w for w in conv_weights if set(abs(w).ravel().tolist()) == {1.0}]
    assert len(pm1) == 8
    x = torch.randn(300, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert_agrees(model, run_exported(path, "onnx", x), x)


@needs_onnx
def test_cli_exports_digits_small_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = trained("digits_small", "digits", 60, 64)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "model.onnx"
    rc = main(
        ["export", str(GENOTYPES / "digits_small.yaml"), str(ckpt), "--format", "onnx", "--out", str(out)]
        + ["--verify", "50", "--dataset", "digits"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "for portability, not speed" in printed
    assert "verify (50 validation images of digits, onnxruntime vs PyTorch): same class on 50/50 images" in printed
    x, _ = held_out_images("digits")
    assert_agrees(model, run_exported(out, "onnx", x), x)  # every test image


@needs_onnx
def test_bireal_resnet18_on_synthetic_inputs(tmp_path: Path) -> None:
    model = dyadic(bnas.build(bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")))
    path = to_onnx(model, tmp_path / "bireal.onnx")
    assert _ops(path)["Sign"] == 2 * 16
    x = dyadic_inputs(128, (3, 32, 32))
    # onnxruntime fuses the scale into the conv weights: rounding differs a little more here
    assert_agrees(model, run_exported(path, "onnx", x), x, rel=1e-3)


@needs_onnx
@pytest.mark.parametrize("name", ["fashion_searched", "kim2020_bnas_a", "darts_v2_binary"])
def test_shipped_cell_genotypes_export(tmp_path: Path, name: str) -> None:
    genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    model = dyadic(bnas.build(genotype))
    path = to_onnx(model, tmp_path / f"{name}.onnx")
    x = dyadic_inputs(32, tuple(genotype.input))
    assert_agrees(model, run_exported(path, "onnx", x), x)  # the batch differs from the export's


@needs_onnx
@needs_mnist()
@pytest.mark.parametrize(("name", "steps"), [("bnn_mlp_2048", 40), ("binary_lenet5", 150)])
def test_mnist_seed_genotypes_agree_on_every_test_image(tmp_path: Path, name: str, steps: int) -> None:
    model = trained(name, "mnist", steps)
    path = to_onnx(model, tmp_path / f"{name}.onnx")
    x, y = held_out_images("mnist")
    assert len(x) == 10000
    out = run_exported(path, "onnx", x)
    assert (out.argmax(1) == y.numpy()).mean() > 0.8  # trained, not chance
    assert_agrees(model, out, x, flip_share=FLIP_SHARE)


def test_compare_counts_classes_and_the_largest_difference() -> None:
    import numpy as np

    ref = np.array([[1.0, 2.0, 0.0], [3.0, -4.0, 1.0]])
    out = np.array([[1.0, 2.5, 0.0], [3.0, -4.0, 3.5]])  # image 2: class 0 -> 2
    result = compare(ref, out)
    assert (result.images, result.same_class) == (2, 1)
    assert result.max_abs_diff == 2.5
    assert result.max_rel_diff == pytest.approx(2.5 / 4.0)
    assert "same class on 1/2 images (50.00%)" in result.line()


def test_verify_without_dataset_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    genotype = GENOTYPES / "digits_small.yaml"
    ckpt = tmp_path / "model.pt"
    torch.save(bnas.build(bnas.load_genotype(genotype)).state_dict(), ckpt)
    rc = main(
        ["export", str(genotype), str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--verify", "5"]
    )
    assert rc == 2
    assert "--verify N needs --dataset NAME" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()  # checked before anything is written
