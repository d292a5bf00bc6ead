"""The float classifier kernels: ``bnas.kernels.linear`` (``x @ w.T + b`` with the weight rows
split among threads at small batch, a 1x1-conv GEMM at larger ones) and
``bnas.kernels.global_avg_pool2d`` (the head's ``mean(dim=(2, 3))``), and the plan passes that
run a packed network's large float ``nn.Linear`` and its global average pool on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn

import bnas
from bnas import kernels
from bnas.export import PackedNetwork, pack_model
from bnas.export.plan import GlobalAvgPool2d, KernelLinear
from bnas.kernels import cpu_backend, global_avg_pool2d, linear

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"
needs_avx512 = pytest.mark.skipif(
    "cpu-avx512" not in cpu_backend.supported_backends(), reason="the kernel runs on cpu-avx512 only"
)

# (N, C, K): 1-3 rows on the row kernel (weight rows not a multiple of 4, channels off the
# 16-lane grid, fewer than 16 channels), 4 and more on the 1x1-conv kernel, and the ImageNet head
CASES = [(1, 512, 1000), (2, 37, 9), (3, 5, 6), (1, 16, 1), (4, 100, 33), (7, 512, 70), (1, 2048, 10)]


def case_tensors(n: int, c: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(k, c, generator=g), torch.randn(k, generator=g)


@needs_avx512
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_the_float64_result_to_float32_rounding(
    case: tuple[int, int, int], with_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, c, k = case
    x, weight, bias = case_tensors(n, c, k)
    b = bias if with_bias else None
    ext = cpu_backend.extension()
    assert ext is not None
    paths: list[str] = []
    for kernel in ("linear_rows", "pointwise_conv_nhwc"):
        original = getattr(ext, kernel)
        monkeypatch.setattr(ext, kernel, lambda *a, _f=original, _k=kernel: paths.append(_k) or _f(*a))
    with kernels.use_backend("cpu-avx512"):
        ours = linear(x, weight, b)
    assert paths == ["linear_rows" if n <= cpu_backend.LINEAR_ROWS_MAX_BATCH else "pointwise_conv_nhwc"]
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert ours.shape == (n, k) and ours.dtype == torch.float32 and ours.is_contiguous()
    # a sum of C float32 products and a bias: within C + 1 roundings of the sum of magnitudes
    magnitude = F.linear(x.abs().double(), weight.abs().double(), None if b is None else b.abs().double())
    bound = (c + 2) * torch.finfo(torch.float32).eps * magnitude
    assert ((ours.double() - exact).abs() <= bound).all()


@needs_avx512
@pytest.mark.parametrize("n", [1, 3, 9])
def test_result_does_not_depend_on_the_thread_count(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight, bias = case_tensors(n, 512, 1000, seed=1)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv(cpu_backend.THREADS_ENV, threads)
        with kernels.use_backend("cpu-avx512"):
            results.append(linear(x, weight, bias))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_avx512
def test_a_row_gives_the_same_result_alone_as_in_a_small_batch() -> None:
    x, weight, bias = case_tensors(3, 200, 50, seed=2)
    with kernels.use_backend("cpu-avx512"):
        batch = linear(x, weight, bias)
        alone = [linear(x[i : i + 1], weight, bias) for i in range(3)]
    for i in range(3):
        assert torch.equal(batch[i : i + 1], alone[i])


@needs_avx512
def test_weights_changed_in_place_are_seen_on_both_kernels() -> None:
    """The 1x1-conv path caches its transposed weights per tensor and version."""
    for n in (1, 6):
        x, weight, _ = case_tensors(n, 64, 48, seed=3)
        with kernels.use_backend("cpu-avx512"):
            before = linear(x, weight)
            weight.mul_(-1)
            after = linear(x, weight)
        assert torch.equal(after, -before)


@needs_avx512
def test_empty_batches_and_empty_inputs() -> None:
    _, weight, bias = case_tensors(1, 8, 5, seed=4)
    with kernels.use_backend("cpu-avx512"):
        assert linear(torch.randn(0, 8), weight, bias).shape == (0, 5)
        assert torch.equal(linear(torch.randn(2, 0), torch.randn(5, 0), bias), bias.expand(2, 5))


def test_other_backends_shapes_and_dtypes_run_pytorchs_linear_bit_for_bit() -> None:
    x, weight, bias = case_tensors(2, 40, 24, seed=5)
    name = next((b for b in ("cpu-avx2", "cpu-popcnt") if b in cpu_backend.supported_backends()), "reference")
    with kernels.use_backend(name):
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    x3 = torch.randn(2, 3, 40)
    assert torch.equal(linear(x3, weight, bias), F.linear(x3, weight, bias))
    assert torch.equal(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))


@needs_avx512
def test_bad_arguments_are_refused_by_message() -> None:
    with kernels.use_backend("cpu-avx512"):
        with pytest.raises(ValueError, match=r"\(N, C\) input, \(K, C\) weights and K biases"):
            linear(torch.randn(2, 8), torch.randn(4, 6))
        with pytest.raises(ValueError, match=r"\(N, C\) input, \(K, C\) weights and K biases"):
            linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))
        with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
            linear(torch.randn(2, 8), torch.randn(4, 8, device="meta"))


def _plan_modules(packed: PackedNetwork) -> list[nn.Module]:
    plan = packed.plan()
    assert plan is not None
    return [plan.get_submodule(str(n.target)) for n in plan.graph.nodes if n.op == "call_module"]


def test_the_heads_run_on_the_kernel() -> None:
    for name, features in (("bireal_resnet18_imagenet", (512, 1000)), ("bireal_resnet18", (512, 10))):
        genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
        torch.manual_seed(0)
        packed = pack_model(randomize(bnas.build(genotype), seed=0))
        called = _plan_modules(packed)
        heads = [m for m in called if isinstance(m, KernelLinear)]
        assert [(h.linear.in_features, h.linear.out_features) for h in heads] == [features]
        assert not any(type(m) is nn.Linear for m in called)
        x = torch.randn(2, *genotype.input)
        with torch.no_grad():
            fused = packed(x)
            tree = packed.net(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(fused, tree, rtol=1e-5, atol=1e-5 * tree.abs().max().item())


def test_the_plan_follows_the_layers_weights_and_keeps_pytorchs_numbers_elsewhere() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 10))
    packed = PackedNetwork(net, None, [])
    called = _plan_modules(packed)
    assert [type(m) for m in called] == [nn.Flatten, KernelLinear, nn.ReLU, KernelLinear]
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), net(x))
        net[1].weight.mul_(2)
        net[1].bias.mul_(2)
        torch.testing.assert_close(packed(x), net(x))
    name = next((b for b in ("cpu-avx2", "cpu-popcnt") if b in cpu_backend.supported_backends()), "reference")
    with kernels.use_backend(name), torch.no_grad():
        assert torch.equal(packed(x), net(x))


# (N, C, H, W): the ImageNet head's 7x7 map, channels off the 16-lane grid, one pixel, a batch
POOL_CASES = [(1, 512, 7, 7), (2, 37, 3, 5), (3, 17, 1, 1), (4, 1000, 2, 2)]


@needs_avx512
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_global_pool_kernel_matches_the_float64_mean(
    case: tuple[int, int, int, int], channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(*case, generator=torch.Generator().manual_seed(6))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ext = cpu_backend.extension()
    assert ext is not None
    calls: list[int] = []
    original = ext.global_avg_pool_nhwc
    monkeypatch.setattr(ext, "global_avg_pool_nhwc", lambda *a: calls.append(1) or original(*a))
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv(cpu_backend.THREADS_ENV, threads)
        with kernels.use_backend("cpu-avx512"):
            results.append(global_avg_pool2d(x))
    assert calls == [1, 1, 1]
    ours = results[0]
    assert torch.equal(ours, results[1]) and torch.equal(ours, results[2])  # thread count: no effect
    assert ours.shape == case[:2] and ours.dtype == torch.float32 and ours.is_contiguous()
    pixels = case[2] * case[3]
    exact = x.double().mean(dim=(2, 3))
    # HW - 1 float32 additions and a division: within HW + 1 roundings of the mean of magnitudes
    bound = (pixels + 1) * torch.finfo(torch.float32).eps * x.abs().double().mean(dim=(2, 3))
    assert ((ours.double() - exact).abs() <= bound).all()
    # each channel is summed over the pixels in order, then divided
    first = x[0, 0].flatten()
    in_order = torch.zeros((), dtype=torch.float32)
    for value in first:
        in_order = in_order + value
    assert ours[0, 0] == in_order / pixels


def test_global_pool_elsewhere_is_pytorchs_mean_and_bad_input_is_refused() -> None:
    x = torch.randn(2, 40, 3, 3).contiguous(memory_format=torch.channels_last)
    name = next((b for b in ("cpu-avx2", "cpu-popcnt") if b in cpu_backend.supported_backends()), "reference")
    with kernels.use_backend(name):
        assert torch.equal(global_avg_pool2d(x), x.mean(dim=(2, 3)))
    assert torch.equal(global_avg_pool2d(x.double()), x.double().mean(dim=(2, 3)))
    assert global_avg_pool2d(torch.randn(0, 8, 2, 2)).shape == (0, 8)
    assert torch.isnan(global_avg_pool2d(torch.randn(1, 8, 0, 3))).all()  # no pixels: PyTorch's NaN
    with pytest.raises(ValueError, match=r"global_avg_pool2d expects an \(N, C, H, W\) map, got \(2, 8\)"):
        global_avg_pool2d(torch.randn(2, 8))


class MeanHeads(nn.Module):
    """Heads on one map: the global average pool of ``global_avgpool``, a mean that keeps its
    dimensions (left to PyTorch), and means over the last two dimensions of a 5-d tensor
    (the trace cannot tell it from a map: PyTorch's mean over the same dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.conv(x)
        volume = y.unsqueeze(1).expand(-1, 2, -1, -1, -1)
        return y.mean(dim=(2, 3)), y.mean(dim=(2, 3), keepdim=True), volume.mean(dim=(2, 3)), volume.mean(dim=(-2, -1))


def test_the_plan_runs_the_heads_global_pool_on_the_kernel() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    plan = packed.plan()
    assert plan is not None
    assert sum(isinstance(m, GlobalAvgPool2d) for m in _plan_modules(packed)) == 1
    assert not [n for n in plan.graph.nodes if n.op == "call_method" and n.target == "mean"]
    heads = PackedNetwork(MeanHeads(), None, [])
    heads_plan = heads.plan()
    assert heads_plan is not None
    assert [type(m) for m in _plan_modules(heads)].count(GlobalAvgPool2d) == 3
    kept = [n for n in heads_plan.graph.nodes if n.op == "call_method" and n.target == "mean"]
    assert len(kept) == 1 and kept[0].kwargs.get("keepdim") is True
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        for ours, tree in zip(heads(x), heads.net(x), strict=True):
            torch.testing.assert_close(ours, tree)
