"""8-bit integer arithmetic for a float conv that reads the image (a binary network's stem).

The rules, shared by the AVX-512 VNNI and AMX kernels (``csrc/stem_conv.h``) and
:func:`int8_conv2d_reference`, which computes the same float32 operations in PyTorch, so all three
agree bit for bit:

- each image of the batch, per call, asymmetric (so an image's result does not depend on
  the others in its batch): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
  ``s = (hi - lo) / 255`` (1 for an all-zero image), ``zp = clamp(round(-lo / s), 0, 255)``,
  ``q = clamp(round(x / s) + zp, 0, 255)``, rounding half to even; zero padding is ``zp``, which
  stands for 0.0 exactly;
- the weights, per output channel, symmetric: ``w_scale = max |w| / 127`` (1 for an all-zero
  channel), ``wq = clamp(round(w / w_scale), -127, 127)``;
- ``out = float(sum((q - zp) * wq)) * (s * w_scale) + bias``: the sum is exact in integers, then
  one multiply and one add, each rounded to float32.

With a **pixel grid** ``(scale, zero)`` (``grid=`` of :func:`bnas.kernels.int8_conv2d` and
``conv2d_max_pool``; ``PackedNetwork.input_grid``), the caller says that every value of the
image is ``(p - zero) * scale`` for a whole ``p`` in [0, 255]: an 8-bit image normalized as
``(p / 255 - mean) / std`` has ``scale = 1 / (255 * std)`` and ``zero = 255 * mean``
(:func:`pixel_grid`, which also takes fewer levels than 255). Every image then takes ``s = scale`` and ``zp = clamp(round(zero), 0,
255)`` instead of its own range, so ``q`` is the pixel ``p`` itself, and the bias gains
``(float32((zp - zero) * scale) * w_scale[k]) * float32(sum(wq[k]))`` (:func:`grid_bias`), which
cancels the zero point's rounding: for every window inside the image the only error left is
the weights' rounding (none for weights of one magnitude per output channel, such as a binary
first layer's ``alpha * sign(w)``). A window over the padding keeps an error of ``zp - zero``
steps (at most half) per padded tap. Values off the grid round to it, as without one, and
values outside it clamp to its ends.

The result differs from the float32 conv by the quantization of the image and the weights
(about 0.4 % of the image's range and of each channel's largest weight per term); the float
conv stays the default everywhere, and a packed network uses this only when asked
(``PackedNetwork.stem_precision = "int8"``). A 1x1 conv (a downsample shortcut) follows the same
rules with its (pooled) input map in the image's place (:func:`int8_pointwise_conv2d_reference`;
``PackedNetwork.shortcut_precision = "int8"``), and so does a linear layer (a classifier) with
each input row as an (N, C, 1, 1) map (``PackedNetwork.head_precision = "int8"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: the most taps (``in_channels * kh * kw``) an output may sum: then ``|sum| < 2**24`` (255 *
#: 127 per tap), so the int32 sum never overflows and its conversion to float32 is exact
MAX_TAPS = (2**24 - 1) // (255 * 127)


def quantize_weights(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """(K, C, kh, kw) float weights -> (int8 weights of the same shape, float32 scale per output
    channel). With ``bits`` other than 8, the same rule on ``bits``-bit symmetric integers
    (int32), to measure how finely a network needs its weights."""
    levels = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    scale = w.abs().amax(dim=(1, 2, 3)) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    wq = torch.clamp(torch.round(w / scale.view(-1, 1, 1, 1)), -levels, levels)
    return wq.to(torch.int8 if bits <= 8 else torch.int32), scale


def image_quantization(x: Tensor) -> tuple[Tensor, Tensor]:
    """The scale and zero point of each image of the (N, C, H, W) batch ``x``, as float32
    tensors of shape (N, 1, 1, 1) (the zero points whole numbers in [0, 255])."""
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    flat = x.reshape(x.shape[0], -1)
    lo = torch.minimum(flat.amin(dim=1), zero).view(-1, 1, 1, 1)
    hi = torch.maximum(flat.amax(dim=1), zero).view(-1, 1, 1, 1)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero_point


#: ``(scale, zero)``: the image's values are ``(p - zero) * scale`` for whole ``p`` in [0, 255]
PixelGrid = tuple[float, float]


def pixel_grid(mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, levels: int = 255) -> PixelGrid:
    """The pixel grid of images normalized per channel as ``(p / levels - mean) / std`` for whole
    pixels ``p`` in [0, levels] (as ``bnas.data`` loads 8-bit images: ``levels`` 255; the
    digits' 0..16 pixels: 16): ``(1 / (m * levels * std), m * levels * mean)`` with ``m = 255 //
    levels``, so a pixel ``p`` is the code ``m * p``; the finer codes put the rounded zero point
    (what a padded tap reads) within ``1 / (2 m)`` of a pixel step of the true one. One grid
    serves the whole image, so every channel must share its mean and std."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 255:
        raise ValueError(f"a pixel grid has 1 to 255 levels above 0 (whole), got {levels!r}")
    means = [float(m) for m in (mean.flatten().tolist() if isinstance(mean, Tensor) else mean)]
    stds = [float(s) for s in (std.flatten().tolist() if isinstance(std, Tensor) else std)]
    if not means or len(set(means)) != 1 or len(set(stds)) != 1 or len(stds) != len(means):
        raise ValueError(
            f"a pixel grid needs one mean and one std for every channel, got mean {means} and std {stds}: "
            "run the int8 stem without a grid (each image quantized by its own range)"
        )
    codes = 255 // levels * levels
    return check_pixel_grid((1.0 / (codes * stds[0]), codes * means[0]))


def check_pixel_grid(grid: Sequence[float]) -> PixelGrid:
    """``grid`` as a ``(scale, zero)`` pair of floats, or a ValueError saying what is wrong."""
    values = tuple(grid)
    if (
        len(values) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        or not values[0] > 0
        or not 0 <= values[1] <= 255
    ):
        raise ValueError(f"a pixel grid is (scale, zero) with a finite scale > 0 and a zero in [0, 255], got {grid!r}")
    return float(values[0]), float(values[1])


def grid_zero_point(grid: PixelGrid) -> int:
    """The whole zero point that stands for the grid's ``zero`` (its nearest, half to even)."""
    return int(min(255.0, max(0.0, round(grid[1]))))


def grid_bias(weight: Tensor, bias: Tensor | None, grid: PixelGrid) -> Tensor:
    """The bias an int8 conv on pixel grid ``grid`` runs with: ``bias`` plus the term that cancels
    the rounding of the grid's zero point (the module docstring's rule), in float32."""
    wq, w_scale = quantize_weights(weight)
    return add_grid_term(bias, grid_term(w_scale, wq.sum(dim=(1, 2, 3), dtype=torch.int32), grid))


def grid_term(w_scale: Tensor, w_sum: Tensor, grid: PixelGrid) -> Tensor:
    """That term per output channel, from the weights' float32 scales and int32 sums (what the
    kernels' weight layout caches)."""
    shift = torch.tensor((grid_zero_point(grid) - grid[1]) * grid[0], dtype=torch.float32, device=w_scale.device)
    return (w_scale * shift) * w_sum.float()


def add_grid_term(bias: Tensor | None, term: Tensor) -> Tensor:
    """``bias + term`` in float32 (``term`` alone for no bias): the one sum the kernels and the
    reference both use, so they agree bit for bit."""
    return term if bias is None else bias.detach().float() + term


def int8_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    grid: PixelGrid | None = None,
) -> Tensor:
    """The kernel's result computed with PyTorch's ops (any device): the fallback where no
    kernel runs, and the kernel's test. ``grid``: the images' pixel grid (module docstring)."""
    x = x.float()
    if grid is None:
        scale, zero_point = image_quantization(x)
    else:
        scale = torch.full((x.shape[0], 1, 1, 1), grid[0], dtype=torch.float32, device=x.device)
        zero_point = torch.full_like(scale, float(grid_zero_point(grid)))
        bias = grid_bias(weight, bias, grid)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    wq, w_scale = quantize_weights(weight)
    # integers below 2**24 in float64: the conv's sums are exact whatever their order
    acc = F.conv2d((q - zero_point).double(), wq.double().to(x.device), None, stride, padding)
    out = acc.float() * (scale * w_scale.to(x.device).view(1, -1, 1, 1))
    if bias is not None:
        out = out + bias.float().view(1, -1, 1, 1)
    return out


def int8_pointwise_conv2d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, pool: int, stride: int, ceil_mode: bool
) -> Tensor:
    """``conv2d(avg_pool2d(x, 2, ceil_mode=ceil_mode) if pool == 2 else x, weight, bias,
    stride)`` for a 1x1 ``weight`` in 8-bit integers, the (pooled) map quantized as an image,
    computed with PyTorch's ops (any device): the int8 pointwise kernel's fallback and test.
    The pool runs on the channels_last map, the kernel's summation order; a strided conv
    quantizes only the pixels it reads."""
    x = x.float().contiguous(memory_format=torch.channels_last)
    x = F.avg_pool2d(x, 2, ceil_mode=ceil_mode) if pool == 2 else x[:, :, ::stride, ::stride]
    return int8_conv2d_reference(x, weight, bias, (1, 1), (0, 0))
