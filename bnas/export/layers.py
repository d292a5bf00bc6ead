"""The packed inference layers a binary network becomes: XNOR-popcount convs and linears with a
per-channel ``* scale + bias`` epilogue, and float layers on ``sign(x - threshold)``.

They hold only buffers (no parameters): the network is for inference only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..binarize import sign
from ..kernels import pack_signs, real_binary_linear, xnor_conv2d_packed, xnor_linear_packed

__all__ = ["PackedConv2d", "PackedLinear", "PackedWeightLinear", "SignConv2d", "SignLinear"]


def _as_channel_view(v: Tensor, dims: int) -> Tensor:
    return v.view((1, -1) + (1,) * (dims - 2))


class PackedConv2d(nn.Module):
    """``conv2d(sign(x - threshold), sign(W)) * scale + bias`` by XNOR-popcount."""

    weight_packed: Tensor
    scale: Tensor
    bias: Tensor
    threshold: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        threshold: bool,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        words = -(-(in_channels // groups) // 32)
        self.register_buffer("weight_packed", torch.zeros(out_channels, *self.kernel_size, words, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels))
        self.register_buffer("threshold", torch.zeros(in_channels) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - _as_channel_view(self.threshold.to(x.dtype), x.dim())
        out = xnor_conv2d_packed(
            pack_signs(x, self.groups),
            self.weight_packed,
            self.in_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.scale,
            self.bias,
        )
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"threshold={self.threshold is not None}"
        )


class PackedLinear(nn.Module):
    """``linear(sign(x - threshold), sign(W)) * scale + bias`` by XNOR-popcount."""

    weight_packed: Tensor
    scale: Tensor
    bias: Tensor
    threshold: Tensor | None

    def __init__(self, in_features: int, out_features: int, threshold: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_packed", torch.zeros(out_features, -(-in_features // 32), dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        self.register_buffer("threshold", torch.zeros(in_features) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise RuntimeError(f"packed linear expects (N, {self.in_features}) inputs, got {tuple(x.shape)}")
        if self.threshold is not None:
            x = x - self.threshold.to(x.dtype)
        out = xnor_linear_packed(pack_signs(x), self.weight_packed, self.in_features, self.scale, self.bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, threshold={self.threshold is not None}"


class PackedWeightLinear(nn.Module):
    """``linear(x, sign(W)) * scale + bias`` for REAL input and 1-bit weights: a binary
    network's first layer (real pixels, weights ``alpha * sign(W)``; ``alpha`` and a folded BN
    in ``scale`` and ``bias``). The weights take 1 bit each instead of 32, and the kernel reads
    1/32 of the bytes a float layer reads."""

    weight_packed: Tensor
    scale: Tensor
    bias: Tensor

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_packed", torch.zeros(out_features, -(-in_features // 32), dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise RuntimeError(f"packed-weight linear expects (N, {self.in_features}) inputs, got {tuple(x.shape)}")
        out = real_binary_linear(x, self.weight_packed, self.in_features, self.scale, self.bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, real input, 1-bit weights"


class SignConv2d(nn.Conv2d):
    """A float conv on ``sign(x - threshold)``: binary activations, real weights."""

    threshold: Tensor | None

    def __init__(self, *args: Any, threshold: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.in_channels) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - _as_channel_view(self.threshold.to(x.dtype), x.dim())
        return super().forward(sign(x))


class SignLinear(nn.Linear):
    """A float linear layer on ``sign(x - threshold)``: binary activations, real weights."""

    threshold: Tensor | None

    def __init__(self, *args: Any, threshold: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.in_features) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - self.threshold.to(x.dtype)
        return super().forward(sign(x))
