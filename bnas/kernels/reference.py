"""The float reference every kernel must match bit for bit, for the float and packed APIs.

``xnor_conv2d(x, w) == conv2d(sign(x), sign(w))`` with ``sign(0) = +1`` and zero padding
contributing 0; the packed variants unpack, run the same float convolution and apply the
epilogue ``out * scale + bias`` (two roundings, in that order), then optionally pack signs.
It runs on any device, which makes it the fallback when no kernel is available.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..binarize import sign
from .packing import pack_signs_reference, unpack_signs, unpack_weights


def xnor_conv2d(
    x: Tensor, w: Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int
) -> Tensor:
    return F.conv2d(sign(x.float()), sign(w.float()), None, stride, padding, dilation, groups)


def xnor_linear(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(sign(x.float()), sign(w.float()))


def _epilogue(out: Tensor, scale: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    if scale is not None:
        out = out * scale.float().reshape(shape)
    if bias is not None:
        out = out + bias.float().reshape(shape)
    return out


def xnor_conv2d_packed(
    xp: Tensor,
    wp: Tensor,
    in_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    pack_output: bool = False,
) -> Tensor:
    x = unpack_signs(xp, in_channels, groups)
    w = unpack_weights(wp, in_channels // groups)
    out = _epilogue(F.conv2d(x, w, None, stride, padding, dilation, groups), scale, bias, 1)
    return pack_signs_reference(out) if pack_output else out


def xnor_linear_packed(
    xp: Tensor,
    wp: Tensor,
    in_features: int,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    pack_output: bool = False,
) -> Tensor:
    x = unpack_signs(xp, in_features)
    w = unpack_weights(wp, in_features)
    out = _epilogue(F.linear(x, w), scale, bias, 1)
    return pack_signs_reference(out) if pack_output else out


def real_binary_linear(x: Tensor, wp: Tensor, in_features: int, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """Real input times the unpacked +-1 weights, then the epilogue."""
    out = F.linear(x.float(), unpack_weights(wp, in_features).to(x.device))
    return _epilogue(out, scale, bias, 1)
