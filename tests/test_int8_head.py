"""The classifier in 8-bit integers: ``bnas.kernels.linear(..., precision="int8")`` (the int8
1x1-conv kernel on an (N, C, 1, 1) map against its PyTorch reference, bit for bit) and
``PackedNetwork.head_precision = "int8"``, which runs the plan's linear layers on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize, run_benchmark
from torch import nn

import bnas
from bnas import kernels
from bnas.export import ExportError, PackedNetwork, pack_model
from bnas.export.plan import INT8_HEAD_MIN_MACS, KernelLinear
from bnas.kernels import cpu_backend, linear
from bnas.kernels.int8 import MAX_TAPS, image_quantization, int8_pointwise_conv2d_reference

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"

# (N, C, K): ResNet's 512 -> 1000 head and CIFAR's 512 -> 10 at batch 1 and larger, inputs that
# are not whole 32-bit words or 64-byte tile rows, outputs off the 16- and 32-lane grids, the
# widest input whose int32 sums are exact, and batches of 9 rows or more (AMX, where the CPU
# has it; fewer rows run on VNNI)
CASES = [(1, 512, 1000), (3, 512, 10), (5, 13, 17), (2, 100, 33), (1, MAX_TAPS, 40), (12, 64, 20), (40, 512, 1000)]


def case_tensors(n: int, c: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # rows of different ranges: each is quantized on its own
    x = torch.randn(n, c, generator=g) * torch.linspace(0.5, 3.0, n).view(-1, 1)
    return x, torch.randn(k, c, generator=g) * 0.1, torch.randn(k, generator=g)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    (n, c), k = x.shape, weight.shape[0]
    return int8_pointwise_conv2d_reference(x.view(n, c, 1, 1), weight.view(k, c, 1, 1), bias, 1, 1, False).view(n, k)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_int8_linear_equals_its_reference_bit_for_bit(case: tuple[int, int, int], int8_unit: str) -> None:
    x, weight, bias = case_tensors(*case, seed=CASES.index(case))
    with kernels.use_backend("cpu-avx512"):
        out = linear(x, weight, bias, precision="int8")
        unbiased = linear(x, weight, None, precision="int8")
    assert out.shape == (case[0], case[2])
    assert torch.equal(out, reference(x, weight, bias))
    assert torch.equal(unbiased, reference(x, weight, None))
    # it is the layer in 8 bits: close to the float32 one, and not equal to it
    as_float = torch.nn.functional.linear(x, weight, bias)
    assert not torch.equal(out, as_float)
    assert (out - as_float).abs().max() <= 0.03 * as_float.abs().max()


def test_reference_quantizes_each_row_as_an_image() -> None:
    """Each row to uint8 by its own range, the weights per output row to int8, sum exactly,
    scale, add the bias."""
    x, weight, bias = case_tensors(3, 24, 7)
    s, zp = image_quantization(x.view(3, 24, 1, 1))
    q = torch.clamp(torch.round(x / s.view(-1, 1)) + zp.view(-1, 1), 0, 255) - zp.view(-1, 1)
    w_scale = weight.abs().amax(dim=1) / 127
    wq = torch.clamp(torch.round(weight / w_scale.view(-1, 1)), -127, 127)
    expected = (q.double() @ wq.double().t()).float() * (s.view(-1, 1) * w_scale.view(1, -1)) + bias
    assert torch.equal(reference(x, weight, bias), expected)


def test_int8_linear_falls_back_to_the_reference_off_the_kernels() -> None:
    x, weight, bias = case_tensors(2, 40, 9)
    with kernels.use_backend("reference"):
        assert torch.equal(linear(x, weight, bias, precision="int8"), reference(x, weight, bias))


def test_int8_linear_follows_weights_changed_in_place(int8_unit: str) -> None:
    """The quantized weights are cached per tensor and version: an in-place update re-makes them."""
    x, weight, bias = case_tensors(1, 64, 20)
    with kernels.use_backend("cpu-avx512"):
        before = linear(x, weight, bias, precision="int8")
        weight.mul_(-1)
        after = linear(x, weight, bias, precision="int8")
    assert torch.equal(after, reference(x, weight, bias)) and not torch.equal(after, before)


def test_int8_linear_rejects_what_it_cannot_sum_exactly_and_unknown_precisions() -> None:
    x, weight = torch.randn(1, MAX_TAPS + 1), torch.randn(8, MAX_TAPS + 1)
    with pytest.raises(ValueError, match=f"int8 sums at most {MAX_TAPS} inputs exactly, got {MAX_TAPS + 1}"):
        linear(x, weight, precision="int8")
    with pytest.raises(ValueError, match="precision 'int4' is not one of float32, int8"):
        linear(x, weight, precision="int4")
    with pytest.raises(ValueError, match=r"expects \(N, C\) input and \(K, C\) weights, got \(1, 519\) and \(8, 5\)"):
        linear(x, torch.randn(8, 5), precision="int8")


def _heads(packed: PackedNetwork) -> list[KernelLinear]:
    plan = packed.plan()
    assert plan is not None
    return [m for m in plan.modules() if isinstance(m, KernelLinear)]


def _head_reference(packed: PackedNetwork, x: torch.Tensor) -> torch.Tensor:
    """The packed module tree with its classifier computed by the int8 reference."""
    (head,) = [m for m in packed.net.modules() if type(m) is nn.Linear]
    handle = head.register_forward_hook(lambda m, args, out: reference(args[0], m.weight, m.bias))
    try:
        return packed.net(x.contiguous(memory_format=torch.channels_last))
    finally:
        handle.remove()


def test_packed_network_runs_its_head_in_int8_when_asked() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18_imagenet.yaml")  # a 512 -> 1000 head
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    x = torch.randn(2, *genotype.input)
    assert packed.head_precision == "float32"
    with torch.no_grad():
        float_head = packed(x)
        assert [m.precision for m in _heads(packed)] == ["float32"]
        packed.head_precision = "int8"
        int8_head = packed(x)
        assert [m.precision for m in _heads(packed)] == ["int8"]
        expected = _head_reference(packed, x)
        torch.testing.assert_close(int8_head, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert not torch.equal(int8_head, float_head)
        packed.head_precision = "float32"
        assert torch.equal(packed(x), float_head)  # the float plan is as it was
        packed.fused = False
        packed.head_precision = "int8"
        assert torch.equal(packed(x), packed.net(x))  # the module tree always runs float32


def test_lowered_program_binds_the_int8_head_and_equals_the_plan(int8_unit: str) -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18_imagenet.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    packed.stem_precision = packed.shortcut_precision = packed.head_precision = "int8"
    x = torch.randn(1, *genotype.input)
    bound: list[int] = []
    kernel = cpu_backend.int8_linear_call

    def counted(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> cpu_backend.KernelCall:
        bound.append(weight.shape[0])
        return kernel(weight, bias, name)

    with torch.no_grad(), kernels.use_backend("cpu-avx512"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_backend, "int8_linear_call", counted)
        lowered = packed(x)
        program = packed.program("cpu-avx512")
        assert program is not None and program.bound_kernels.count("KernelLinear") == 1
        assert bound == [1000]
        packed.lowered = False
        assert torch.equal(packed(x), lowered)  # the plan's torch.fx program, bit for bit


def test_head_precision_is_checked_and_wide_or_small_layers_stay_float() -> None:
    packed = PackedNetwork(nn.Sequential(nn.Linear(8, 8)), None, [])
    with pytest.raises(ExportError, match="head_precision 'int4' is not one of float32, int8"):
        packed.head_precision = "int4"
    assert packed.head_precision == "float32"
    # too many inputs to sum exactly; just enough multiply-adds (512 x 256); one short of them
    layers = [nn.Linear(MAX_TAPS + 1, 512), nn.Linear(512, 256), nn.Linear(256, 511), nn.Linear(511, 10)]
    assert 512 * 256 == INT8_HEAD_MIN_MACS > 256 * 511
    mixed = PackedNetwork(nn.Sequential(*layers), None, [])
    mixed.head_precision = "int8"
    assert [m.precision for m in _heads(mixed)] == ["float32", "int8", "float32", "float32"]
    with torch.no_grad():
        assert mixed(torch.randn(2, MAX_TAPS + 1)).shape == (2, 10)


def test_a_small_head_stays_float32_under_int8() -> None:
    """CIFAR's 512 -> 10 head: int8 would be slower there and only round; the network's output
    is the float32 plan's, bit for bit."""
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    x = torch.randn(2, *genotype.input)
    with torch.no_grad():
        float_head = packed(x)
        packed.head_precision = "int8"
        assert [m.precision for m in _heads(packed)] == ["float32"]
        assert torch.equal(packed(x), float_head)


@pytest.mark.skipif(not cpu_backend.int8_supported(), reason="the int8 kernels run on AVX-512 VNNI CPUs only")
def test_benchmark_script_times_both_precisions_by_size(capsys: pytest.CaptureFixture[str]) -> None:
    script, lines = run_benchmark("int8_head", ["--repeats", "2"], capsys)
    assert [tuple(r["shape"]) for r in lines] == script.SHAPES
    for r in lines:
        fin, fout = r["shape"]
        assert r["macs"] == fin * fout and r["keeps_float32"] == (fin * fout < INT8_HEAD_MIN_MACS)
        assert r["baseline_us"] > 0 and r["ours_us"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_us"] / r["ours_us"], rel=0.02, abs=0.01)
    assert [r["keeps_float32"] for r in lines][0] and not [r["keeps_float32"] for r in lines][-1]
