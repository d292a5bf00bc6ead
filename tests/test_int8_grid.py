"""The int8 stem on a pixel grid (``grid=`` of ``bnas.kernels.int8_conv2d`` and
``conv2d_max_pool``; ``PackedNetwork.input_grid``): images whose values are ``(p - zero) *
scale`` for whole pixels ``p`` are quantized to those pixels, with the zero point's rounding
cancelled in the bias, so inside the image only the weights' rounding is left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn

import bnas
from bnas import kernels
from bnas.export import ExportError, pack_model
from bnas.export.plan import ImageConv2d, ImageConvMaxPool2d
from bnas.kernels import conv2d_max_pool, cpu_backend, image_conv2d, int8_conv2d
from bnas.kernels.int8 import (
    check_pixel_grid,
    grid_bias,
    grid_zero_point,
    int8_conv2d_reference,
    pixel_grid,
    quantize_weights,
)

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"
FASHION_GRID = pixel_grid([0.2860], [0.3530])  # zero 72.93: its rounding needs the bias term


def grid_images(n: int, c: int, h: int, w: int, grid: tuple[float, float], seed: int = 0) -> torch.Tensor:
    """8-bit images normalized as bnas.data does, so their values lie on ``grid``."""
    pixels = torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed)).float()
    scale, zero = grid
    mean, std = zero / 255, 1 / (255 * scale)
    return (pixels / 255 - mean) / std


def binary_weights(k: int, c: int, kh: int, kw: int, seed: int = 0) -> torch.Tensor:
    """alpha * sign(w) per output channel: exact in int8 (one magnitude per channel)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, 1, 1, 1, generator=g) + 0.5) * torch.sign(torch.randn(k, c, kh, kw, generator=g))


def test_pixel_grid_is_the_normalization_of_8_bit_pixels() -> None:
    scale, zero = pixel_grid(torch.tensor([0.1307]), torch.tensor([0.3081]))
    assert scale == pytest.approx(1 / (255 * 0.3081)) and zero == pytest.approx(255 * 0.1307)
    pixels = torch.arange(256.0)
    normalized = (pixels / 255 - 0.1307) / 0.3081
    assert torch.equal(torch.round(normalized / scale + zero), pixels)  # every pixel lands on its own code
    assert pixel_grid([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]) == pytest.approx((1 / 63.75, 127.5))
    digits = torch.arange(17.0) / 16  # the digits' 0..16 pixels on their [0, 1] scale
    scale, zero = pixel_grid([0.3], [0.4], levels=16)
    assert scale == pytest.approx(1 / (240 * 0.4)) and zero == pytest.approx(240 * 0.3)  # 15 codes a pixel
    assert torch.equal(torch.round((digits - 0.3) / 0.4 / scale + zero), 15 * torch.arange(17.0))
    with pytest.raises(ValueError, match="a pixel grid has 1 to 255 levels above 0"):
        pixel_grid([0.3], [0.4], levels=256)


def test_pixel_grid_and_its_check_refuse_what_one_grid_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"one mean and one std for every channel, got mean \[0.485, 0.456"):
        pixel_grid([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    for bad in [(0.0, 10.0), (-1.0, 10.0), (0.01, 256.0), (0.01, -0.5), (float("nan"), 1.0), (0.01,), ("a", 1)]:
        with pytest.raises(ValueError, match="a pixel grid is \\(scale, zero\\) with a finite scale > 0"):
            check_pixel_grid(bad)  # type: ignore[arg-type]
    assert grid_zero_point((0.01, 72.93)) == 73 and grid_zero_point((0.01, 0.4)) == 0


def test_the_bias_term_is_the_zero_points_rounding_times_each_channels_weight_sum() -> None:
    weight = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(6, generator=torch.Generator().manual_seed(2))
    scale, zero = FASHION_GRID
    wq, w_scale = quantize_weights(weight)
    by_hand = bias.double() + (73 - zero) * scale * w_scale.double() * wq.double().sum(dim=(1, 2, 3))
    torch.testing.assert_close(grid_bias(weight, bias, FASHION_GRID).double(), by_hand, rtol=1e-6, atol=1e-7)
    assert torch.equal(grid_bias(weight, None, (scale, 73.0)), torch.zeros(6))  # a whole zero: no term


@pytest.mark.parametrize(
    ("n", "c", "hw", "k", "kernel", "stride", "padding"),
    [(2, 1, 28, 20, 5, 1, 0), (2, 1, 28, 32, 3, 2, 1), (1, 3, 40, 64, 7, 2, 3), (3, 2, 9, 5, 3, 1, 1)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_on_a_grid_equals_its_float_reference_bit_for_bit(
    n: int, c: int, hw: int, k: int, kernel: int, stride: int, padding: int, channels_last: bool, int8_unit: str
) -> None:
    x = grid_images(n, c, hw, hw, FASHION_GRID)
    x = x + 0.3 * FASHION_GRID[0] * torch.randn_like(x)  # off the grid too: both round alike
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(k, c, kernel, kernel, generator=g), torch.randn(k, generator=g)
    pair = (stride, stride), (padding, padding)
    with kernels.use_backend("cpu-avx512"):
        out = int8_conv2d(x, weight, bias, stride, padding, grid=FASHION_GRID)
        pooled = conv2d_max_pool(x, weight, None, stride, padding, 3, 2, 1, precision="int8", grid=FASHION_GRID)
    assert torch.equal(out, int8_conv2d_reference(x, weight, bias, *pair, FASHION_GRID))
    reference = int8_conv2d_reference(x, weight, None, *pair, FASHION_GRID)
    assert torch.equal(pooled, F.max_pool2d(reference, 3, 2, 1))
    assert not torch.equal(out, int8_conv2d(x, weight, bias, stride, padding))  # the grid is used


def test_other_backends_compute_the_same_numbers_on_a_grid() -> None:
    x = grid_images(2, 1, 12, 12, FASHION_GRID)
    weight = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    with kernels.use_backend("reference"):
        out = int8_conv2d(x, weight, None, 1, 1, grid=FASHION_GRID)
    assert torch.equal(out, int8_conv2d_reference(x, weight, None, (1, 1), (1, 1), FASHION_GRID))


def test_on_its_grid_an_image_is_exact_where_the_weights_are() -> None:
    """Binary first-layer weights (alpha * sign) are exact in int8, so on the pixel grid a conv
    without padding is the float64 conv to float32 rounding; by each image's own range it is not."""
    x = grid_images(3, 1, 28, 28, FASHION_GRID, seed=5)
    x[0] = x[0].clamp(max=(200 - FASHION_GRID[1]) * FASHION_GRID[0])  # an image short of white
    weight, bias = binary_weights(20, 1, 5, 5), torch.randn(20, generator=torch.Generator().manual_seed(6))
    exact = F.conv2d(x.double(), weight.double(), bias.double())
    on_grid = int8_conv2d(x, weight, bias, 1, 0, grid=FASHION_GRID).double()
    by_range = int8_conv2d(x, weight, bias, 1, 0).double()
    largest = exact.abs().max()
    assert (on_grid - exact).abs().max() <= 1e-6 * largest
    assert (by_range - exact).abs().max() > 1e-4 * largest


def test_with_padding_only_windows_over_the_padding_keep_an_error() -> None:
    x = grid_images(2, 1, 16, 16, FASHION_GRID, seed=7)
    weight = binary_weights(8, 1, 3, 3, seed=8)
    exact = F.conv2d(x.double(), weight.double(), None, 1, 1)
    error = (int8_conv2d(x, weight, None, 1, 1, grid=FASHION_GRID).double() - exact).abs()
    largest = exact.abs().max()
    assert error[:, :, 1:-1, 1:-1].max() <= 1e-6 * largest  # inside: exact to float rounding
    # a padded tap errs by the zero point's rounding (73 - 72.93 steps) times its weight
    alpha = weight.abs().amax(dim=(1, 2, 3)).double().view(1, -1)
    bound = 5 * (73 - FASHION_GRID[1]) * FASHION_GRID[0] * alpha + 1e-6 * largest  # at most 5 padded taps
    assert (error[:, :, 0, :].amax(dim=2) <= bound).all()
    assert error[:, :, 0, :].max() > 1e-4 * largest  # and it is there


def test_a_grid_is_for_int8_and_is_checked() -> None:
    x, weight = torch.randn(1, 1, 8, 8), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="image_conv2d: a pixel grid is for precision 'int8'"):
        image_conv2d(x, weight, None, 1, 1, "float32", grid=FASHION_GRID)
    with pytest.raises(ValueError, match="conv2d_max_pool: a pixel grid is for precision 'int8'"):
        conv2d_max_pool(x, weight, None, 1, 1, 2, 2, grid=FASHION_GRID)
    with pytest.raises(ValueError, match="a pixel grid is \\(scale, zero\\)"):
        int8_conv2d(x, weight, None, 1, 1, grid=(0.0, 1.0))


def test_packed_network_runs_its_int8_stem_on_the_input_grid() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "fashion_handcrafted.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    x = grid_images(4, *genotype.input, FASHION_GRID, seed=9)
    assert packed.input_grid is None
    with torch.no_grad():
        float_stem = packed(x)
        packed.input_grid = FASHION_GRID
        assert torch.equal(packed(x), float_stem)  # nothing changes in float32
        packed.stem_precision = "int8"
        on_grid = packed(x)
        plan = packed.plan()
        assert plan is not None
        (stem,) = [m for m in plan.modules() if isinstance(m, (ImageConv2d, ImageConvMaxPool2d))]
        assert stem.grid == FASHION_GRID and "grid=" in repr(stem)
        conv = next(m for m in packed.net.modules() if type(m) is nn.Conv2d)
        handle = conv.register_forward_hook(
            lambda m, args, out: int8_conv2d_reference(args[0], m.weight, m.bias, m.stride, m.padding, FASHION_GRID)
        )
        try:
            expected = packed.net(x.contiguous(memory_format=torch.channels_last))
        finally:
            handle.remove()
        torch.testing.assert_close(on_grid, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        packed.lowered = False  # the fx plan takes the grid as the lowered program does
        assert torch.equal(packed(x), on_grid)
        packed.lowered = True
        packed.input_grid = None
        assert not torch.equal(packed(x), on_grid)  # by each image's range again


@pytest.mark.skipif(
    "cpu-avx512" not in cpu_backend.supported_backends() or not cpu_backend.int8_supported(),
    reason="the bound int8 stem runs on AVX-512 VNNI CPUs only",
)
def test_the_lowered_program_remakes_the_grid_bias_when_the_bias_changes_in_place() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")
    torch.manual_seed(0)
    packed = pack_model(randomize(bnas.build(genotype), seed=0))
    packed.stem_precision, packed.input_grid = "int8", FASHION_GRID
    x = grid_images(1, *genotype.input, FASHION_GRID, seed=10)
    conv = next(m for m in packed.net.modules() if type(m) is nn.Conv2d and m.in_channels == 3)
    if conv.bias is None:  # BatchNorm folding gives the stem a bias; give it one otherwise
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels), requires_grad=False)
    with torch.no_grad():
        before = packed(x)
        conv.bias.add_(1.0)
        after = packed(x)
        packed.lowered = False
        assert torch.equal(after, packed(x))
    assert not torch.equal(before, after)


def test_input_grid_is_checked() -> None:
    genotype = bnas.load_genotype(GENOTYPES / "fashion_handcrafted.yaml")
    packed = pack_model(bnas.build(genotype))
    with pytest.raises(ExportError, match="input_grid: a pixel grid is \\(scale, zero\\)"):
        packed.input_grid = (1.0, 300.0)
    assert packed.input_grid is None
    packed.input_grid = [0.5, 3]
    assert packed.input_grid == (0.5, 3.0)
