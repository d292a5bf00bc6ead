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

The result differs from the float32 conv by the quantization of the image and the weights
(about 0.4 % of the image's range and of each channel's largest weight per term); the float
conv stays the default everywhere, and a packed network uses this only when asked
(``PackedNetwork.stem_precision = "int8"``). A 1x1 conv (a downsample shortcut) follows the same
rules with its (pooled) input map in the image's place (:func:`int8_pointwise_conv2d_reference`;
``PackedNetwork.shortcut_precision = "int8"``), and so does a linear layer (a classifier) with
each input row as an (N, C, 1, 1) map (``PackedNetwork.head_precision = "int8"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: the most taps (``in_channels * kh * kw``) an output may sum: then ``|sum| < 2**24`` (255 *
#: 127 per tap), so the int32 sum never overflows and its conversion to float32 is exact
MAX_TAPS = (2**24 - 1) // (255 * 127)


def quantize_weights(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(K, C, kh, kw) float weights -> (int8 weights of the same shape, float32 scale per output
    channel)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    wq = torch.clamp(torch.round(w / scale.view(-1, 1, 1, 1)), -127, 127).to(torch.int8)
    return wq, scale


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


def int8_conv2d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    """The kernel's result computed with PyTorch's ops (any device): the fallback where no
    kernel runs, and the kernel's test."""
    x = x.float()
    scale, zero_point = image_quantization(x)
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
