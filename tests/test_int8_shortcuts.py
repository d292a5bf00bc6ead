"""The 1x1 shortcut convs in 8-bit integers: ``bnas.kernels.pointwise_conv2d(...,
precision="int8")`` (the AVX-512 VNNI kernel against its PyTorch reference, bit for bit) and
``PackedNetwork.shortcut_precision = "int8"``, which runs the plan's pointwise convs on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn

import bnas
from bnas import kernels
from bnas.export import ExportError, PackedNetwork, pack_model
from bnas.export.plan import ChannelsLastPointwiseConv2d
from bnas.kernels import cpu_backend, pointwise_conv2d
from bnas.kernels.int8 import MAX_TAPS, image_quantization, int8_conv2d_reference, int8_pointwise_conv2d_reference

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"
needs_vnni = pytest.mark.skipif(
    "cpu-avx512" not in cpu_backend.supported_backends() or not cpu_backend.int8_supported(),
    reason="the int8 kernel runs on AVX-512 VNNI CPUs only",
)

# (N, C, H, W, K, pool, stride, ceil_mode): Bi-Real ResNet-18's three downsample shortcuts at
# 224x224 (64 -> 128 on 56x56, 128 -> 256 on 28x28, 256 -> 512 on 14x14), channel counts that
# are not whole 32-bit words (C % 4 != 0) or 16-lane vectors (K % 16 != 0), odd maps in ceil
# mode (partial windows), strided 1x1 convs without a pool, batches whose pixel blocks span
# images, and the largest input width whose int32 sums are exact (MAX_TAPS)
CASES = [
    (1, 64, 56, 56, 128, 2, 1, False),
    (1, 128, 28, 28, 256, 2, 1, False),
    (1, 256, 14, 14, 512, 2, 1, False),
    (3, 13, 9, 7, 20, 2, 1, True),
    (3, 128, 9, 7, 40, 2, 1, True),  # C % 64 == 0: AMX blocks quantize their own pixels, across images
    (2, 30, 10, 11, 17, 1, 2, False),
    (2, 7, 5, 5, 33, 2, 1, False),
    (4, 5, 3, 3, 3, 1, 1, False),
    (1, MAX_TAPS, 4, 4, 16, 2, 1, False),
]


def case_tensors(n: int, c: int, h: int, w: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # maps of different ranges in one batch: each image is quantized on its own
    x = torch.randn(n, c, h, w, generator=g) * torch.linspace(0.5, 3.0, n).view(-1, 1, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(k, c, 1, 1, generator=g) * 0.1, torch.randn(k, generator=g)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_int8_kernel_equals_its_reference_bit_for_bit(case: tuple, int8_unit: str) -> None:
    n, c, h, w, k, pool, stride, ceil = case
    x, weight, bias = case_tensors(n, c, h, w, k, seed=CASES.index(case))
    with kernels.use_backend("cpu-avx512"):
        out = pointwise_conv2d(x, weight, bias, pool, stride, ceil, precision="int8")
        as_float = pointwise_conv2d(x, weight, bias, pool, stride, ceil)
    expected = int8_pointwise_conv2d_reference(x, weight, bias, pool, stride, ceil)
    assert out.shape == as_float.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)
    # it is the conv in 8 bits: close to the float32 one, and not equal to it
    assert not torch.equal(out, as_float)
    assert (out - as_float).abs().max() <= 0.03 * as_float.abs().max()


def test_int8_kernel_runs_without_bias_and_on_every_thread_count(int8_unit: str) -> None:
    x, weight, _ = case_tensors(2, 64, 12, 12, 40)
    expected = int8_pointwise_conv2d_reference(x, weight, None, 2, 1, False)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with kernels.use_backend("cpu-avx512"):
                assert torch.equal(pointwise_conv2d(x, weight, None, 2, precision="int8"), expected)
    finally:
        torch.set_num_threads(threads)


def test_reference_quantizes_the_pooled_map_as_an_image() -> None:
    """The rules spelled out once more by hand: pool, quantize each image of the pooled map to
    uint8 by its own range, the weights per channel to int8, sum exactly, scale, add the bias."""
    x, weight, bias = case_tensors(2, 6, 4, 6, 5)
    pooled = F.avg_pool2d(x, 2)
    s, zp = image_quantization(pooled)
    for i in range(2):
        lo, hi = min(pooled[i].min().item(), 0.0), max(pooled[i].max().item(), 0.0)
        assert s[i].item() == pytest.approx((hi - lo) / 255, rel=1e-6)
        assert zp[i].item() == round(-lo / s[i].item())
    q = torch.clamp(torch.round(pooled / s) + zp, 0, 255) - zp
    w_scale = weight.abs().amax(dim=(1, 2, 3)) / 127
    wq = torch.clamp(torch.round(weight / w_scale.view(-1, 1, 1, 1)), -127, 127)
    acc = torch.einsum("nchw,kc->nkhw", q.double(), wq.flatten(1).double())
    expected = acc.float() * (s * w_scale.view(1, -1, 1, 1)) + bias.view(1, -1, 1, 1)
    assert torch.equal(int8_pointwise_conv2d_reference(x, weight, bias, 2, 1, False), expected)
    # a strided conv without a pool quantizes only the pixels it reads
    strided = int8_pointwise_conv2d_reference(x, weight, bias, 1, 2, False)
    assert torch.equal(strided, int8_conv2d_reference(x[:, :, ::2, ::2], weight, bias, (1, 1), (0, 0)))


def test_pointwise_int8_rejects_what_it_cannot_sum_exactly_and_unknown_precisions() -> None:
    x = torch.randn(1, MAX_TAPS + 1, 4, 4)
    weight = torch.randn(8, MAX_TAPS + 1, 1, 1)
    with pytest.raises(ValueError, match=f"int8 sums at most {MAX_TAPS} input channels exactly, got {MAX_TAPS + 1}"):
        pointwise_conv2d(x, weight, precision="int8")
    with pytest.raises(ValueError, match="precision 'int4' is not one of float32, int8"):
        pointwise_conv2d(x, weight, precision="int4")


def test_pointwise_int8_falls_back_to_the_reference_off_the_kernels() -> None:
    x, weight, bias = case_tensors(2, 12, 6, 6, 9)
    with kernels.use_backend("reference"):
        out = pointwise_conv2d(x, weight, bias, 2, precision="int8")
    assert torch.equal(out, int8_pointwise_conv2d_reference(x, weight, bias, 2, 1, False))
    assert out.is_contiguous(memory_format=torch.channels_last)


def _shortcut_reference(packed: PackedNetwork, x: torch.Tensor) -> torch.Tensor:
    """The packed module tree with every 1x1 float conv computed by the int8 reference (its
    input is the tree's own average pool, the kernel's values)."""
    pointwise = [m for m in packed.net.modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)]
    assert pointwise
    handles = [
        m.register_forward_hook(
            lambda m, args, out: int8_pointwise_conv2d_reference(args[0], m.weight, m.bias, 1, m.stride[0], False)
        )
        for m in pointwise
    ]
    try:
        return packed.net(x.contiguous(memory_format=torch.channels_last))
    finally:
        for handle in handles:
            handle.remove()


def _pointwise_steps(packed: PackedNetwork) -> list[ChannelsLastPointwiseConv2d]:
    plan = packed.plan()
    assert plan is not None
    return [m for m in plan.modules() if isinstance(m, ChannelsLastPointwiseConv2d)]


def test_packed_network_runs_its_shortcuts_in_int8_when_asked() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    x = torch.randn(2, *genotype.input)
    assert packed.shortcut_precision == "float32"
    with torch.no_grad():
        float_shortcuts = packed(x)
        assert [m.precision for m in _pointwise_steps(packed)] == ["float32"] * 3
        packed.shortcut_precision = "int8"
        int8_shortcuts = packed(x)
        assert [m.precision for m in _pointwise_steps(packed)] == ["int8"] * 3
        expected = _shortcut_reference(packed, x)
        torch.testing.assert_close(int8_shortcuts, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert not torch.equal(int8_shortcuts, float_shortcuts)
        packed.shortcut_precision = "float32"
        assert torch.equal(packed(x), float_shortcuts)  # the float plan is as it was
        packed.fused = False
        packed.shortcut_precision = "int8"
        assert torch.equal(packed(x), packed.net(x))  # the module tree always runs float32


def test_lowered_program_binds_the_int8_shortcuts_and_equals_the_plan(int8_unit: str) -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18_imagenet.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    packed.stem_precision = packed.shortcut_precision = "int8"
    x = torch.randn(1, *genotype.input)
    calls: list[str] = []
    kernel = cpu_backend.pointwise_conv_call

    def counted(*args: object, **kwargs: object) -> cpu_backend.KernelCall:
        calls.append(str(args[6] if len(args) > 6 else kwargs.get("precision", "float32")))
        return kernel(*args, **kwargs)  # type: ignore[arg-type]

    with torch.no_grad(), kernels.use_backend("cpu-avx512"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_backend, "pointwise_conv_call", counted)
        lowered = packed(x)
        program = packed.program("cpu-avx512")
        assert program is not None and program.bound_kernels.count("ChannelsLastPointwiseConv2d") == 3
        assert calls == ["int8"] * 3
        packed.lowered = False
        assert torch.equal(packed(x), lowered)  # the plan's torch.fx program, bit for bit


def test_shortcut_precision_is_checked_and_wide_convs_stay_float() -> None:
    packed = PackedNetwork(nn.Sequential(nn.Conv2d(8, 8, 1)), None, [])
    with pytest.raises(ExportError, match="shortcut_precision 'int4' is not one of float32, int8"):
        packed.shortcut_precision = "int4"
    assert packed.shortcut_precision == "float32"
    wide = PackedNetwork(nn.Sequential(nn.Conv2d(MAX_TAPS + 1, 8, 1), nn.Conv2d(8, 4, 1)), None, [])
    wide.shortcut_precision = "int8"
    assert [m.precision for m in _pointwise_steps(wide)] == ["float32", "int8"]
    x = torch.randn(1, MAX_TAPS + 1, 3, 3)
    with torch.no_grad():
        assert wide(x).shape == (1, 4, 3, 3)
