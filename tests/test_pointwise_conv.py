"""The float shortcut kernel (``bnas.kernels.pointwise_conv2d``): a 1x1 conv of a channels_last
map, on its 2x2/2 average pool with ``pool=2``, and the plan pass that uses it for Bi-Real's
downsample shortcuts (``AvgPool2d(2)`` -> 1x1 conv, BN folded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, run_benchmark
from torch import nn

import bnas
from bnas import kernels
from bnas.export import PackedNetwork, pack_model
from bnas.export.plan import ChannelsLastPointwiseConv2d, ImageConvMaxPool2d
from bnas.kernels import cpu_backend, pointwise_conv2d

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"
needs_avx512 = pytest.mark.skipif(
    "cpu-avx512" not in cpu_backend.supported_backends(), reason="the kernel runs on cpu-avx512 only"
)

# (N, C, H, W, K, pool, stride, ceil_mode): channel counts off the 16-lane grid, odd maps the
# pool floors or (ceil mode) ends with cut windows, fewer than 6 pixels, batches whose pixel
# blocks span images
CASES = [
    (1, 64, 56, 56, 128, 2, 1, False),
    (2, 256, 8, 8, 512, 2, 1, True),
    (3, 24, 9, 7, 40, 2, 1, False),
    (3, 24, 9, 7, 40, 2, 1, True),
    (1, 100, 5, 5, 33, 2, 1, True),
    (2, 3, 3, 4, 7, 2, 1, False),
    (1, 17, 6, 6, 70, 1, 1, False),
    (3, 64, 7, 9, 48, 1, 2, False),
    (1, 512, 1, 1, 10, 1, 1, False),
]


def case_tensors(n: int, c: int, h: int, w: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(k, c, 1, 1, generator=g), torch.randn(k, generator=g)


def float64_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, pool: int, stride: int, ceil_mode: bool
) -> torch.Tensor:
    x64 = F.avg_pool2d(x.double(), 2, ceil_mode=ceil_mode) if pool == 2 else x.double()
    return F.conv2d(x64, w.double(), None if b is None else b.double(), stride)


@needs_avx512
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_the_float64_result_to_float32_rounding(case: tuple[int, ...], with_bias: bool) -> None:
    n, c, h, w, k, pool, stride, ceil_mode = case
    x, weight, bias = case_tensors(n, c, h, w, k)
    b = bias if with_bias else None
    with kernels.use_backend("cpu-avx512"):
        ours = pointwise_conv2d(x, weight, b, pool, stride, ceil_mode)
    exact = float64_reference(x, weight, b, pool, stride, ceil_mode)
    assert ours.shape == exact.shape and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    # a sum of C float32 products: error within C roundings of the sum of magnitudes
    magnitude = float64_reference(x.abs(), weight.abs(), None if b is None else b.abs(), pool, stride, ceil_mode)
    bound = (c + 2) * torch.finfo(torch.float32).eps * magnitude
    assert ((ours.double() - exact).abs() <= bound).all()


@needs_avx512
@pytest.mark.parametrize("c", [3, 16, 40, 64])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pooled_values_are_pytorchs_avg_pool_to_the_bit(c: int, ceil_mode: bool) -> None:
    """With identity weights the conv adds exact zeros to one exact product: the output is the
    kernel's pool itself, summed in PyTorch's order (cut windows too: the map is 9 x 11)."""
    x = torch.randn(2, c, 9, 11).contiguous(memory_format=torch.channels_last)
    eye = torch.eye(c).view(c, c, 1, 1)
    with kernels.use_backend("cpu-avx512"):
        pooled = pointwise_conv2d(x, eye, None, pool=2, ceil_mode=ceil_mode)
    assert torch.equal(pooled, F.avg_pool2d(x, 2, ceil_mode=ceil_mode))


@needs_avx512
def test_result_does_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight, bias = case_tensors(2, 128, 28, 28, 256, seed=3)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv(cpu_backend.THREADS_ENV, threads)
        with kernels.use_backend("cpu-avx512"):
            results.append(pointwise_conv2d(x, weight, bias, pool=2))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_avx512
def test_weights_changed_in_place_are_seen() -> None:
    """The transposed weights are cached per tensor and version: an in-place update re-makes them."""
    x, weight, bias = case_tensors(1, 32, 8, 8, 48, seed=4)
    with kernels.use_backend("cpu-avx512"):
        before = pointwise_conv2d(x, weight, bias, pool=2)
        weight.mul_(-1)
        after = pointwise_conv2d(x, weight, bias, pool=2)
    torch.testing.assert_close(after - bias.view(1, -1, 1, 1), -(before - bias.view(1, -1, 1, 1)))


def test_other_backends_run_pytorchs_ops_bit_for_bit() -> None:
    x, weight, bias = case_tensors(2, 24, 9, 7, 40, seed=5)
    name = next((b for b in ("cpu-avx2", "cpu-popcnt") if b in cpu_backend.supported_backends()), "reference")
    with kernels.use_backend(name):
        pooled = pointwise_conv2d(x, weight, bias, pool=2, ceil_mode=True)
        strided = pointwise_conv2d(x, weight, bias, stride=2)
    assert torch.equal(pooled, F.conv2d(F.avg_pool2d(x, 2, ceil_mode=True), weight, bias))
    assert torch.equal(strided, F.conv2d(x, weight, bias, stride=2))


@pytest.mark.parametrize(
    ("shape", "weight_shape", "pool", "stride", "message"),
    [
        ((1, 8, 4, 4), (4, 8, 3, 3), 1, 1, r"\(K, C, 1, 1\) weights"),
        ((1, 8, 4, 4), (4, 6, 1, 1), 1, 1, r"\(K, C, 1, 1\) weights"),
        ((8, 4, 4), (4, 8, 1, 1), 1, 1, r"\(N, C, H, W\) input"),
        ((1, 8, 4, 4), (4, 8, 1, 1), 3, 1, "pool 1 or 2"),
        ((1, 8, 4, 4), (4, 8, 1, 1), 2, 2, r"1 after a pool"),
    ],
)
def test_bad_arguments_are_refused_by_message(
    shape: tuple[int, ...], weight_shape: tuple[int, ...], pool: int, stride: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pointwise_conv2d(torch.randn(shape), torch.randn(weight_shape), None, pool, stride)
    with pytest.raises(ValueError, match="one value per output channel"):
        pointwise_conv2d(torch.randn(1, 8, 4, 4), torch.randn(4, 8, 1, 1), torch.randn(5))
    with pytest.raises(ValueError, match="bias is on meta but the input is on cpu"):
        pointwise_conv2d(torch.randn(1, 8, 4, 4), torch.randn(4, 8, 1, 1), torch.randn(4, device="meta"))


def _plan_modules(packed: PackedNetwork) -> list[nn.Module]:
    plan = packed.plan()
    assert plan is not None
    return [plan.get_submodule(str(n.target)) for n in plan.graph.nodes if n.op == "call_module"]


def test_bireal_downsample_shortcuts_become_one_pooled_pointwise_conv_each() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18_imagenet.yaml")
    torch.manual_seed(0)
    model = randomize(bnas.build(genotype), seed=0)
    packed = pack_model(model)
    x = torch.randn(1, *genotype.input)
    called = _plan_modules(packed)
    pointwise = [m for m in called if isinstance(m, ChannelsLastPointwiseConv2d)]
    assert [m.pool for m in pointwise] == [2, 2, 2]  # the three downsampling units
    assert all(m.ceil_mode for m in pointwise)  # Bi-Real's shortcut pool keeps odd maps' last row
    assert not any(isinstance(m, nn.AvgPool2d) for m in called)  # each pool is inside its conv
    # no conv is left to torch: the 7x7 stem runs with its max-pool in one pass
    assert not any(isinstance(m, nn.Conv2d) for m in called)
    assert sum(isinstance(m, ImageConvMaxPool2d) for m in called) == 1
    with torch.no_grad():
        fused = packed(x)
        tree = packed.net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fused, tree, rtol=1e-5, atol=1e-5 * tree.abs().max().item())
    # with PyTorch's ops for the shortcuts (any backend but cpu-avx512) the plan is the tree, bit
    # for bit: the pass changes where the work runs, not what is computed
    if "cpu-avx2" not in cpu_backend.supported_backends():
        pytest.skip("no AVX2 backend to run the plan on PyTorch's shortcut ops")
    with kernels.use_backend("cpu-avx2"), torch.no_grad():
        assert torch.equal(packed(x), tree)


def test_a_pool_read_twice_stays_and_its_conv_runs_unpooled() -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.conv = nn.AvgPool2d(2), nn.Conv2d(16, 32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = self.pool(x)
            return self.conv(pooled) + pooled.mean()

    packed = PackedNetwork(TwoReaders(), None, [])
    called = _plan_modules(packed)
    assert any(isinstance(m, nn.AvgPool2d) for m in called)
    (pointwise,) = [m for m in called if isinstance(m, ChannelsLastPointwiseConv2d)]
    assert pointwise.pool == 1
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), packed.net(x))


def test_convs_that_are_not_plain_1x1_stay_pytorchs() -> None:
    net = nn.Sequential(nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 3))
    packed = PackedNetwork(net, None, [])
    assert not any(isinstance(m, ChannelsLastPointwiseConv2d) for m in _plan_modules(packed))


@needs_avx512
def test_benchmark_script_reports_both_sides_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    import statistics

    script, (*lines, summary) = run_benchmark("pointwise_conv", ["--repeats", "2"], capsys)
    assert [r["shape"] for r in lines] == [list(s[:5]) for s in script.SHAPES]
    ratios = []
    for r in lines:
        assert r["baseline_ms"] > 0 and r["ours_ms"] > 0
        ratios.append(r["baseline_ms"] / r["ours_ms"])
        assert r["ratio"] == pytest.approx(ratios[-1], rel=0.01, abs=0.01)  # from unrounded times
        assert r["max_rel_error_vs_float64"] < 1e-5
    n, c, h, w, k = lines[0]["shape"]
    assert lines[0]["macs"] == n * c * k * (h // 2) * (w // 2)  # even maps: ceil mode adds nothing
    assert summary["summary"] and summary["median_ratio"] == pytest.approx(
        statistics.median(ratios), rel=0.01, abs=0.01
    )
    if cpu_backend.int8_supported():  # the int8 engine, timed in the same rounds
        int8_ratios = []
        for r in lines:
            int8 = r["int8"]
            int8_ratios.append(r["ours_ms"] / int8["ms"])
            assert int8["ratio_vs_ours"] == pytest.approx(int8_ratios[-1], rel=0.01, abs=0.01)
            assert int8["ratio_vs_baseline"] == pytest.approx(r["baseline_ms"] / int8["ms"], rel=0.01, abs=0.01)
            assert 1e-5 < int8["max_rel_error_vs_float64"] < 0.05  # quantized: not float32's error
        assert summary["median_ratio_int8_vs_ours"] == pytest.approx(statistics.median(int8_ratios), rel=0.01, abs=0.01)
    else:
        assert "int8" not in lines[0] and "median_ratio_int8_vs_ours" not in summary
