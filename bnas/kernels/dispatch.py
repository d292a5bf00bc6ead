"""Which implementation runs a call, and the public entry points that route to it.

CPU tensors go to the fastest code path of the C++ extension this CPU runs (or the one
forced with :func:`use_backend`), else to the float reference. CUDA tensors go to
``bnas.kernels.cuda_backend`` (imported lazily, only for CUDA tensors) when it imports and
reports the device as supported, else to the reference with one warning. Every backend
takes and returns the same packed format (see :mod:`bnas.kernels.packing`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, cast

import torch
from torch import Tensor

from . import cpu_backend, reference
from .conv_plan import conv_output_size
from .conv_plan import pair as _pair
from .int8 import MAX_TAPS, PixelGrid, check_pixel_grid, int8_conv2d_reference, int8_pointwise_conv2d_reference
from .packing import pack_signs_reference, pack_weights_reference, words_for

CPU_BACKENDS = ("cpu-avx512", "cpu-avx2", "cpu-popcnt")
CUDA_BACKEND = "cuda-tensor-core"
REFERENCE = "reference"
BACKENDS = CPU_BACKENDS + (REFERENCE, CUDA_BACKEND)

IntPair = int | Sequence[int]

#: the arithmetic of the float convs the kernels run: the stem's (``image_conv2d``,
#: ``PackedNetwork.stem_precision``), the 1x1 shortcuts' (``pointwise_conv2d``,
#: ``PackedNetwork.shortcut_precision``) and the classifier's (``linear``,
#: ``PackedNetwork.head_precision``)
STEM_PRECISIONS = ("float32", "int8")
POINTWISE_PRECISIONS = STEM_PRECISIONS

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("bnas_kernel_backend", default=None)
_cuda_module: ModuleType | None = None
_cuda_import_error: str | None = None
_warned_cuda_fallback = False


# --------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------
def _cuda_backend() -> ModuleType | None:
    global _cuda_module, _cuda_import_error
    if _cuda_module is None and _cuda_import_error is None:
        try:
            _cuda_module = importlib.import_module("bnas.kernels.cuda_backend")
        except (ImportError, OSError, RuntimeError) as exc:  # missing, or its build failed
            _cuda_import_error = f"{type(exc).__name__}: {exc}"
    return _cuda_module


def _cuda_supported(device: torch.device) -> bool:
    module = _cuda_backend()
    return module is not None and bool(module.is_supported(device))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force backend ``name`` inside the ``with`` block (tests, benchmarks).

    Raises at entry when this machine cannot run it, so a forced test never silently runs a
    different implementation.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in CPU_BACKENDS and name not in cpu_backend.supported_backends():
        why = cpu_backend.build_error()
        raise RuntimeError(
            f"backend {name!r} cannot run here: "
            + (
                f"the CPU extension could not be built ({why})"
                if why
                else f"this CPU lacks {cpu_backend.REQUIREMENT[name]}"
            )
        )
    if name == CUDA_BACKEND and not (torch.cuda.is_available() and _cuda_supported(torch.device("cuda"))):
        reason = _cuda_import_error or "no supported CUDA device"
        raise RuntimeError(f"backend {CUDA_BACKEND!r} cannot run here: {reason}")
    token = _forced.set(name)
    try:
        yield name
    finally:
        _forced.reset(token)


def backend(device: str | torch.device = "cpu") -> str:
    """The implementation that runs calls on ``device``: ``cpu-avx512``, ``cpu-avx2``,
    ``cpu-popcnt``, ``reference`` or ``cuda-tensor-core``."""
    return _resolve(torch.device(device))


def cpu_backend_name() -> str:
    """``backend("cpu")``, without making a device (a packed forward asks on every call)."""
    forced = _forced.get()
    if forced is None:
        available = cpu_backend.supported_backends()
        return available[0] if available else REFERENCE
    if forced == CUDA_BACKEND:
        raise ValueError(f"backend {CUDA_BACKEND!r} is forced but the tensors are on the CPU")
    return forced


def _resolve(device: torch.device) -> str:
    if device.type == "cpu":
        return cpu_backend_name()
    forced = _forced.get()
    if device.type == "cuda":
        if forced in CPU_BACKENDS:
            raise ValueError(
                f"backend {forced!r} is forced but the tensors are on {device}; "
                "move them to the CPU or force 'reference'"
            )
        if forced == REFERENCE:
            return REFERENCE
        return CUDA_BACKEND if _cuda_supported(device) else REFERENCE
    return REFERENCE


def _route(device: torch.device) -> str:
    if device.type == "cpu":
        return cpu_backend_name()
    name = _resolve(device)
    if name == REFERENCE and device.type == "cuda" and _forced.get() != REFERENCE:
        global _warned_cuda_fallback
        if not _warned_cuda_fallback:
            _warned_cuda_fallback = True
            reason = _cuda_import_error or f"{device} is not supported by the CUDA kernel"
            warnings.warn(
                f"bnas.kernels: no CUDA XNOR kernel ({reason}); using the slow float reference on the GPU",
                RuntimeWarning,
                stacklevel=3,
            )
    return name


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
def _check_words(t: Tensor, dims: int, what: str) -> None:
    if t.dtype != torch.int32:
        raise TypeError(
            f"{what} must be int32 packed words (from bnas.kernels.pack_signs / pack_weights), got {t.dtype}"
        )
    if t.dim() != dims:
        raise ValueError(f"{what} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_same_device(
    xp: Tensor, wp: Tensor, scale: Tensor | None, bias: Tensor | None, channels: int, weights: str = "packed weights"
) -> None:
    """Epilogue vectors hold one value per output channel; everything is on one device
    (``weights`` names ``wp`` in the message)."""
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise ValueError(f"{name} must hold one value per output channel ({channels}), got shape {tuple(t.shape)}")
    if xp.is_cpu and wp.is_cpu and (scale is None or scale.is_cpu) and (bias is None or bias.is_cpu):
        return
    for name, t in ((weights, wp), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != xp.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {xp.device}")


def _check_float(t: Tensor, what: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a float tensor, got {t.dtype}")


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------
def pack_signs(x: Tensor, groups: int = 1, threshold: Tensor | None = None) -> Tensor:
    """Float NCHW -> packed NHWC int32 ``(N, H, W, groups * ceil(C / groups / 32))``;
    float ``(N, F)`` -> ``(N, ceil(F / 32))``. Bit 1 where ``x >= 0``, or with ``threshold``
    (one value per channel or feature: ReActNet's RSign) where ``x >= threshold``: the signs
    of ``x - threshold``, which in float32 is ``>= 0`` exactly when ``x >= threshold`` (unless
    denormals are flushed to zero, ``torch.set_flush_denormal(True)``)."""
    _check_float(x, "pack_signs input")
    if x.dim() == 4 and (groups < 1 or x.shape[1] % groups):
        raise ValueError(f"pack_signs: {x.shape[1]} channels do not split into {groups} groups")
    if x.dim() not in (2, 4):
        raise ValueError(f"pack_signs expects NCHW or (N, F) input, got shape {tuple(x.shape)}")
    if threshold is not None:
        _check_float(threshold, "pack_signs threshold")
        if threshold.numel() != x.shape[1] or threshold.device != x.device:
            raise ValueError(
                f"pack_signs: the threshold must have one value per channel ({x.shape[1]}) on {x.device}, "
                f"got {threshold.numel()} on {threshold.device}"
            )
    name = _route(x.device)
    if name in CPU_BACKENDS:
        return cpu_backend.pack_signs(x, groups, name, threshold)
    if threshold is not None:
        x = x - threshold.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    if name == CUDA_BACKEND and _cuda_module is not None and hasattr(_cuda_module, "pack_signs"):
        return _cuda_module.pack_signs(x, groups)
    return pack_signs_reference(x, groups)


def pack_weights(w: Tensor, groups: int = 1) -> Tensor:
    """Float conv weights ``(K, C/groups, kh, kw)`` -> ``(K, kh, kw, Wg)``; linear ``(K, F)``
    -> ``(K, ceil(F / 32))``."""
    _check_float(w, "pack_weights input")
    if w.dim() == 4 and (groups < 1 or w.shape[0] % groups):
        raise ValueError(f"pack_weights: {w.shape[0]} output channels do not split into {groups} groups")
    if w.dim() not in (2, 4):
        raise ValueError(f"pack_weights expects (K, C/groups, kh, kw) or (K, F) weights, got shape {tuple(w.shape)}")
    name = _route(w.device)
    if name in CPU_BACKENDS:
        return cpu_backend.pack_weights(w, name)
    if name == CUDA_BACKEND and _cuda_module is not None and hasattr(_cuda_module, "pack_weights"):
        return _cuda_module.pack_weights(w, groups)
    return pack_weights_reference(w, groups)


def xnor_conv2d_packed(
    xp: Tensor,
    wp: Tensor,
    in_channels: int,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    pack_output: bool = False,
) -> Tensor:
    """XNOR-popcount conv2d on packed input and weights, with a fused epilogue.

    Returns ``conv2d(sign(x), sign(w)) * scale + bias`` (scale and bias per output channel,
    both optional) as a float ``(N, K, OH, OW)`` tensor (the CPU kernel writes it in
    channels_last memory), or with ``pack_output=True`` its signs packed NHWC
    ``(N, OH, OW, ceil(K / 32))`` for the next binary layer (packed for ``groups=1``).
    """
    _check_words(xp, 4, "packed input")
    _check_words(wp, 4, "packed weights")
    kernel = _pair(kernel_size, "kernel_size")
    stride_, padding_, dilation_ = (_pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"))
    xs, ws = xp.shape, wp.shape
    if groups < 1 or in_channels % groups or ws[0] % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and the {ws[0]} output channels")
    wg = words_for(in_channels // groups)
    if xs[3] != groups * wg:
        raise ValueError(
            f"packed input has {xs[3]} words per pixel; {in_channels} channels in {groups} groups need {groups * wg}"
        )
    if ws[1] != kernel[0] or ws[2] != kernel[1] or ws[3] != wg:
        raise ValueError(
            f"packed weights have shape {tuple(ws)}; expected "
            f"(K, {kernel[0]}, {kernel[1]}, {wg}) for kernel_size {kernel} and "
            f"{in_channels // groups} channels per group"
        )
    if min(stride_) < 1 or min(dilation_) < 1 or min(padding_) < 0:
        raise ValueError("stride and dilation must be >= 1 and padding >= 0")
    _check_same_device(xp, wp, scale, bias, ws[0])
    name = _route(xp.device)
    args = (xp, wp, in_channels, kernel, stride_, padding_, dilation_, groups, scale, bias, pack_output)
    if name in CPU_BACKENDS:
        return cpu_backend.xnor_conv2d_packed(*args, name)
    if name == CUDA_BACKEND and _cuda_module is not None:  # _route picks CUDA only once it is loaded
        return _cuda_module.xnor_conv2d_packed(*args)
    return reference.xnor_conv2d_packed(*args)


def xnor_conv2d_fused(
    xp: Tensor,
    wp: Tensor,
    in_channels: int,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    float_output: bool = True,
    pack_output: bool = False,
    into_residual: bool = False,
    pack_threshold: Tensor | None = None,
    rprelu: Sequence[Tensor] = (),
) -> tuple[Tensor | None, Tensor | None]:
    """One step of a packed network: ``y = conv2d(sign(x), sign(w)) * scale + bias + residual``
    (a Bi-Real unit's ``BN(conv(x)) + shortcut`` with the BN folded), then ReActNet's RPReLU
    when ``rprelu`` gives its ``(shift_in, slope, shift_out)``, returned as
    ``(y, packed signs of y)``: the float ``y`` (channels_last memory) when ``float_output``,
    else None, and its signs packed NHWC for the next binary layer when ``pack_output``, else
    None: ``pack_signs(y, threshold=pack_threshold)``, so a next layer with a threshold per
    channel (RSign) reads them as they are. ``residual`` has ``y``'s shape. ``into_residual=True`` writes ``y`` into the
    residual tensor itself (its old values are gone: for a shortcut nothing else reads). On
    the CPU kernels this is one pass over the output; other backends compute the same values
    in separate steps."""
    _check_fused_outputs(residual, float_output, pack_output, into_residual)
    name = _route(xp.device)
    if name in CPU_BACKENDS:
        # the extension checks the geometry, the residual's shape and its memory layout
        geometry = (
            *_pair(kernel_size, "kernel_size"), *_pair(stride, "stride"),
            *_pair(padding, "padding"), *_pair(dilation, "dilation"),
        )  # fmt: skip
        return cpu_backend.conv2d_fused_on_lanes(
            xp, cpu_backend.lane_weights(wp, groups, name), in_channels, wp.shape[0], geometry, groups, scale, bias,
            residual, float_output, pack_output, into_residual, name, pack_threshold, rprelu,
        )  # fmt: skip
    out = xnor_conv2d_packed(xp, wp, in_channels, kernel_size, stride, padding, dilation, groups, scale, bias)
    if residual is not None:
        out = out + residual
    if rprelu:
        from ..ops.common import rprelu as apply_rprelu  # the module's own ops: bnas.ops sits above the kernels

        out = apply_rprelu(out, *rprelu)
    if into_residual:
        out = cast(Tensor, residual).copy_(out)
    return (out if float_output else None), (pack_signs(out, threshold=pack_threshold) if pack_output else None)


def _check_fused_outputs(residual: Tensor | None, float_output: bool, pack_output: bool, into_residual: bool) -> None:
    if not (float_output or pack_output):
        raise ValueError("xnor_conv2d_fused: ask for the float output, the packed output or both")
    if into_residual and (residual is None or not float_output):
        raise ValueError("xnor_conv2d_fused: into_residual needs a residual and the float output")


class FusedConv2d:
    """:func:`xnor_conv2d_fused` with the packed weights, the geometry and the epilogue bound
    once, for a layer that runs on every forward (a packed network's plan steps).

    ``fused(xp, residual, float_output, pack_output, into_residual, pack_threshold, rprelu)`` returns what
    ``xnor_conv2d_fused(xp, wp, ...)`` returns. On the CPU a call normalises and looks up
    nothing but the code path: under 2 us of Python against 7 us for the function, which on
    2 threads was a fifth of a 7x7 step (35 us, the kernel 27 us). The weights' lane layout
    comes from the kernels' cache (``cpu_backend.lane_weights``), rebuilt when ``wp`` changes
    in place. ``output_size(h, w)`` is the output's spatial size for an ``h x w`` input,
    ``output_shape(xp)`` the output's (N, K, OH, OW) for packed input ``xp``.
    """

    def __init__(
        self,
        wp: Tensor,
        in_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        self.wp, self.in_channels, self.groups, self.scale, self.bias = wp, in_channels, groups, scale, bias
        self.out_channels = wp.shape[0]
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self._geometry = (*self.kernel_size, *self.stride, *self.padding, *self.dilation)

    @property
    def geometry(self) -> tuple[int, ...]:
        """(kh, kw, sh, sw, ph, pw, dh, dw), as the kernels take it."""
        return self._geometry

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return conv_output_size(h, w, self._geometry)

    def output_shape(self, xp: Tensor) -> tuple[int, int, int, int]:
        """(N, K, OH, OW) of the output for packed NHWC input ``xp``."""
        n, h, w = xp.shape[:3]
        return (n, self.out_channels, *self.output_size(h, w))

    def __call__(
        self,
        xp: Tensor,
        residual: Tensor | None = None,
        float_output: bool = True,
        pack_output: bool = False,
        into_residual: bool = False,
        pack_threshold: Tensor | None = None,
        rprelu: Sequence[Tensor] = (),
    ) -> tuple[Tensor | None, Tensor | None]:
        name = _route(xp.device)
        if name not in CPU_BACKENDS:
            return xnor_conv2d_fused(
                xp, self.wp, self.in_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                self.groups, self.scale, self.bias, residual, float_output, pack_output, into_residual, pack_threshold,
                rprelu,
            )  # fmt: skip
        _check_fused_outputs(residual, float_output, pack_output, into_residual)
        return cpu_backend.conv2d_fused_on_lanes(
            xp, cpu_backend.lane_weights(self.wp, self.groups, name), self.in_channels, self.out_channels, self._geometry, self.groups, self.scale, self.bias,
            residual, float_output, pack_output, into_residual, name, pack_threshold, rprelu,
        )  # fmt: skip


def xnor_linear_packed(
    xp: Tensor,
    wp: Tensor,
    in_features: int,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    pack_output: bool = False,
) -> Tensor:
    """XNOR-popcount linear on packed ``(N, words)`` input and ``(K, words)`` weights:
    ``linear(sign(x), sign(w)) * scale + bias`` as float ``(N, K)``, or packed signs
    ``(N, ceil(K / 32))`` with ``pack_output=True``."""
    _check_words(xp, 2, "packed input")
    _check_words(wp, 2, "packed weights")
    words = words_for(in_features)
    if xp.shape[1] != words or wp.shape[1] != words:
        raise ValueError(
            f"{in_features} features pack into {words} words; got input {tuple(xp.shape)} and weights {tuple(wp.shape)}"
        )
    _check_same_device(xp, wp, scale, bias, wp.shape[0])
    name = _route(xp.device)
    args = (xp, wp, in_features, scale, bias, pack_output)
    if name in CPU_BACKENDS:
        return cpu_backend.xnor_linear_packed(*args, name)
    if name == CUDA_BACKEND and _cuda_module is not None:  # _route picks CUDA only once it is loaded
        return _cuda_module.xnor_linear_packed(*args)
    return reference.xnor_linear_packed(*args)


def max_pool2d_nhwc(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair = 0) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` of a float32 map, computed in
    channels_last memory (the packed networks' float glue; on the CPU kernels every input byte
    is read once, channels in SIMD lanes). Returns channels_last memory."""
    return _max_pool(x, kernel_size, stride, padding, pack_output=False)[0]


def max_pool2d_and_pack(
    x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair = 0
) -> tuple[Tensor, Tensor]:
    """:func:`max_pool2d_nhwc` and the pooled map's signs packed NHWC (what
    ``pack_signs(pooled)`` returns), in one pass over the output on the CPU kernels: a stem's
    pool that feeds a binary conv."""
    out, packed = _max_pool(x, kernel_size, stride, padding, pack_output=True)
    return out, packed if packed is not None else pack_signs(out)


def _max_pool(
    x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, pack_output: bool
) -> tuple[Tensor, Tensor | None]:
    kernel, stride_, padding_ = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
    x = x.contiguous(memory_format=torch.channels_last)
    name = _route(x.device)
    if name in CPU_BACKENDS and x.dtype == torch.float32:
        return cpu_backend.max_pool2d_nhwc(x, kernel, stride_, padding_, name, pack_output)
    return torch.nn.functional.max_pool2d(x, kernel, stride_, padding_), None


def global_avg_pool2d(x: Tensor) -> Tensor:
    """``x.mean(dim=(2, 3))`` of a float (N, C, H, W) map: a classifier's input. On the
    cpu-avx512 kernels one light call on the channels_last map sums each channel over the
    pixels in order, then divides by H * W (PyTorch's mean sums in an order of its own: results
    agree to float rounding); elsewhere, and for other dtypes or a map without pixels,
    PyTorch's mean."""
    if x.dim() != 4:
        raise ValueError(f"global_avg_pool2d expects an (N, C, H, W) map, got {tuple(x.shape)}")
    name = _route(x.device)
    if name == "cpu-avx512" and x.dtype == torch.float32 and x.shape[2] * x.shape[3] > 0:
        return cpu_backend.global_avg_pool_nhwc(x.contiguous(memory_format=torch.channels_last), name)
    return x.mean(dim=(2, 3))


def pointwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pool: int = 1,
    stride: int = 1,
    ceil_mode: bool = False,
    precision: str = "float32",
) -> Tensor:
    """``conv2d(avg_pool2d(x, 2, ceil_mode=ceil_mode) if pool == 2 else x, weight, bias, stride)`` for a 1x1
    ``weight`` (the float downsample shortcut of a binary network: average pool, 1x1 conv, BN
    folded into the bias), returned in channels_last memory. On the cpu-avx512 kernels the
    pool is computed inside the conv, in PyTorch's summation order, and the conv sums in its
    own order (equal to PyTorch's result up to float rounding); elsewhere PyTorch's ops run.
    ``precision "int8"``: the conv in 8-bit integers by the rules of :mod:`bnas.kernels.int8`,
    the (pooled) map quantized per image as an image is (at most
    :data:`bnas.kernels.int8.MAX_TAPS` input channels); on CPUs with AVX-512 VNNI a kernel runs,
    elsewhere PyTorch's ops compute the same numbers (bit for bit)."""
    if precision not in POINTWISE_PRECISIONS:
        raise ValueError(f"pointwise_conv2d: precision {precision!r} is not one of {', '.join(POINTWISE_PRECISIONS)}")
    _check_float(x, "input")
    _check_float(weight, "weight")
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"pointwise_conv2d expects (N, C, H, W) input and (K, C, 1, 1) weights, got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if pool not in (1, 2) or stride < 1 or (pool == 2 and stride != 1):
        raise ValueError(f"pointwise_conv2d takes pool 1 or 2 and a stride >= 1 (1 after a pool), got {pool}, {stride}")
    _check_same_device(x, weight, None, bias, weight.shape[0], weights="weight")
    if precision == "int8" and x.shape[1] > MAX_TAPS:
        raise ValueError(
            f"pointwise_conv2d: int8 sums at most {MAX_TAPS} input channels exactly, got {x.shape[1]}; "
            f"use precision 'float32'"
        )
    x = x.contiguous(memory_format=torch.channels_last)
    name = _route(x.device)
    kernel_dtypes = x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    if precision == "int8":
        if name == "cpu-avx512" and kernel_dtypes and cpu_backend.int8_supported() and x.shape[0] > 0:
            return cpu_backend.pointwise_conv2d_nhwc(x, weight, bias, pool, ceil_mode, stride, name, "int8")
        out = int8_pointwise_conv2d_reference(x, weight, bias, pool, stride, ceil_mode)
        return out.contiguous(memory_format=torch.channels_last)
    if name == "cpu-avx512" and kernel_dtypes:
        return cpu_backend.pointwise_conv2d_nhwc(x, weight, bias, pool, ceil_mode, stride, name)
    if pool == 2:
        x = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=ceil_mode)
    return torch.nn.functional.conv2d(x, weight, bias, stride)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, precision: str = "float32") -> Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` for a float32 (N, C) input: a network's
    classifier. On the cpu-avx512 kernels, for up to ``cpu_backend.LINEAR_ROWS_MAX_BATCH`` rows,
    the weight rows are split among the kernels' threads (PyTorch runs a batch-1 linear layer on one
    thread), and a larger batch runs as the 1x1 conv of :func:`pointwise_conv2d`; both sum in
    orders of their own (PyTorch's result to float rounding). Elsewhere, and for other shapes
    or dtypes, PyTorch's ``linear``.

    ``precision "int8"``: the layer in 8-bit integers, as the int8 1x1 conv of
    :func:`pointwise_conv2d` on an (N, C, 1, 1) map (each row quantized as an image is, the
    weights per output row; at most :data:`bnas.kernels.int8.MAX_TAPS` inputs): the AVX-512 VNNI
    or AMX kernel, elsewhere PyTorch's ops computing the same numbers bit for bit. A 512 -> 1000
    classifier then reads 0.5 MB of weights instead of 2 MB."""
    if precision not in POINTWISE_PRECISIONS:
        raise ValueError(f"linear: precision {precision!r} is not one of {', '.join(POINTWISE_PRECISIONS)}")
    if precision == "int8":
        return _int8_linear(x, weight, bias)
    if (
        x.dim() != 2
        or weight.dim() != 2
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
        or _route(x.device) != "cpu-avx512"
    ):
        return torch.nn.functional.linear(x, weight, bias)
    if weight.shape[1] != x.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(
            f"linear expects (N, C) input, (K, C) weights and K biases, got {tuple(x.shape)}, "
            f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
        )
    _check_same_device(x, weight, None, bias, weight.shape[0], weights="weight")
    return cpu_backend.float_linear(x, weight, bias, "cpu-avx512")


def _int8_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check_float(x, "input")
    _check_float(weight, "weight")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"linear expects (N, C) input and (K, C) weights, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    rows, (out_features, in_features) = x.shape[0], weight.shape
    if in_features > MAX_TAPS:
        raise ValueError(
            f"linear: int8 sums at most {MAX_TAPS} inputs exactly, got {in_features}; use precision 'float32'"
        )
    _check_same_device(x, weight, None, bias, out_features, weights="weight")
    kernel_dtypes = x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    if _route(x.device) == "cpu-avx512" and kernel_dtypes and cpu_backend.int8_supported() and rows > 0:
        return cpu_backend.int8_linear_call(weight, bias, "cpu-avx512")(x.contiguous(), cpu_backend.kernel_threads())
    out = int8_pointwise_conv2d_reference(
        x.reshape(rows, in_features, 1, 1), weight.reshape(out_features, in_features, 1, 1), bias, 1, 1, False
    )
    return out.reshape(rows, out_features)


def int8_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    grid: PixelGrid | None = None,
) -> Tensor:
    """``conv2d(x, weight, bias, stride, padding)`` in 8-bit integers (:mod:`bnas.kernels.int8`:
    each image quantized per call to uint8, the weights per output channel to int8, the sums
    exact): a binary network's stem at about 2 to 2.7 times float32's rate. ``grid``
    ``(scale, zero)``: the images' values lie on that pixel grid (``bnas.kernels.int8.pixel_grid``
    of their normalization), and each pixel is then quantized to itself. On CPUs with AVX-512
    VNNI (and the cpu-avx512 backend) the kernel runs, elsewhere PyTorch's ops compute the same
    numbers; the two agree bit for bit. Returns channels_last memory. ``in_channels * kh * kw``
    is at most :data:`bnas.kernels.int8.MAX_TAPS` (518)."""
    stride_, padding_ = _check_image_conv(x, weight, bias, stride, padding, "int8", "int8_conv2d")
    grid_ = check_pixel_grid(grid) if grid is not None else None
    if x.shape[0] == 0:  # no image to quantize
        return torch.nn.functional.conv2d(x, weight, bias, stride_, padding_)
    if _image_kernel_runs(x, weight, "int8"):
        return cpu_backend.image_conv2d_nhwc(x, weight, bias, stride_, padding_, "int8", grid=grid_)[0]
    return int8_conv2d_reference(x, weight, bias, stride_, padding_, grid_).contiguous(
        memory_format=torch.channels_last
    )


def image_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    precision: str = "float32",
    grid: PixelGrid | None = None,
) -> Tensor:
    """``conv2d(x, weight, bias, stride, padding)`` of an image (few input channels: a binary
    network's stem), channels_last. ``precision "float32"``: on the cpu-avx512 kernels a
    direct conv with output channels in SIMD lanes (``csrc/stem_conv.h``), which sums in an
    order of its own (PyTorch's result to float rounding) and on a 3-channel stem runs about
    twice as fast as PyTorch's conv; elsewhere PyTorch's conv on the channels_last image.
    ``"int8"``: :func:`int8_conv2d`, with ``grid`` (int8 only)."""
    if precision not in STEM_PRECISIONS:
        raise ValueError(f"image_conv2d: precision {precision!r} is not one of {', '.join(STEM_PRECISIONS)}")
    if precision == "int8":
        return int8_conv2d(x, weight, bias, stride, padding, grid)
    if grid is not None:
        raise ValueError("image_conv2d: a pixel grid is for precision 'int8'")
    stride_, padding_ = _check_image_conv(x, weight, bias, stride, padding, precision, "image_conv2d")
    if x.shape[0] > 0 and _image_kernel_runs(x, weight, precision):
        return cpu_backend.image_conv2d_nhwc(x, weight, bias, stride_, padding_, precision)[0]
    return torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride_, padding_)


def conv2d_max_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: IntPair,
    padding: IntPair,
    pool_kernel: IntPair,
    pool_stride: IntPair,
    pool_padding: IntPair = 0,
    pack_output: bool = False,
    precision: str = "float32",
    grid: PixelGrid | None = None,
) -> Any:
    """``max_pool2d(conv2d(x, weight, bias, stride, padding), pool_kernel, pool_stride,
    pool_padding)`` of an image, channels_last, and with ``pack_output`` also the pooled map's
    signs packed NHWC (``(pooled, packed)``): ResNet's stem (7x7/2 conv, BN folded, 3x3/2
    max-pool). On the cpu-avx512 kernels it is one pass that keeps the conv's rows in cache
    for the pool instead of writing the conv's whole output to memory; the conv sums in an
    order of its own (float32: equal to PyTorch's conv up to float rounding). ``precision
    "int8"`` computes the conv as :func:`int8_conv2d` does (AVX-512 VNNI for the kernel), with
    the same numbers (``grid``: its pixel grid, int8 only). Elsewhere PyTorch's conv (on the
    channels_last image) and pool run."""
    if precision not in STEM_PRECISIONS:
        raise ValueError(f"conv2d_max_pool: precision {precision!r} is not one of {', '.join(STEM_PRECISIONS)}")
    if grid is not None and precision != "int8":
        raise ValueError("conv2d_max_pool: a pixel grid is for precision 'int8'")
    grid_ = check_pixel_grid(grid) if grid is not None else None
    stride_, padding_ = _check_image_conv(x, weight, bias, stride, padding, precision, "conv2d_max_pool")
    kernel = _pair(pool_kernel, "pool_kernel")
    pool_stride_, pool_padding_ = _pair(pool_stride, "pool_stride"), _pair(pool_padding, "pool_padding")
    if min(kernel) < 1 or min(pool_stride_) < 1 or any(2 * p > k for p, k in zip(pool_padding_, kernel, strict=True)):
        raise ValueError(
            f"conv2d_max_pool takes a pool kernel and stride >= 1 and a pool padding of at most half "
            f"the kernel, got {kernel}, {pool_stride_} and {pool_padding_}"
        )
    packed: Tensor | None
    if x.shape[0] > 0 and _image_kernel_runs(x, weight, precision):
        pooled, packed = cpu_backend.image_conv2d_nhwc(
            x, weight, bias, stride_, padding_, precision, (kernel, pool_stride_, pool_padding_), pack_output, grid_
        )
    else:
        if precision == "int8":
            conv = int8_conv2d(x, weight, bias, stride_, padding_, grid_)
        else:
            conv = torch.nn.functional.conv2d(
                x.contiguous(memory_format=torch.channels_last), weight, bias, stride_, padding_
            )
        pooled = torch.nn.functional.max_pool2d(conv, kernel, pool_stride_, pool_padding_).contiguous(
            memory_format=torch.channels_last
        )
        packed = pack_signs(pooled) if pack_output else None
    return (pooled, packed) if pack_output else pooled


def _check_image_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: IntPair, padding: IntPair, precision: str, what: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    _check_float(x, "input")
    _check_float(weight, "weight")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{what} expects (N, C, H, W) input and (K, C, kh, kw) weights, got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    taps = weight.shape[1] * weight.shape[2] * weight.shape[3]
    if precision == "int8" and taps > MAX_TAPS:
        raise ValueError(
            f"{what} sums at most {MAX_TAPS} taps per output (in_channels * kh * kw) in int8 so that its "
            f"int32 sums stay exact; these weights have {taps}: run this conv in float32"
        )
    stride_, padding_ = _pair(stride, "stride"), _pair(padding, "padding")
    if min(stride_) < 1 or min(padding_) < 0:
        raise ValueError(f"{what} takes a stride >= 1 and a padding >= 0, got {stride_} and {padding_}")
    _check_same_device(x, weight, None, bias, weight.shape[0], weights="weight")
    return stride_, padding_


def _image_kernel_runs(x: Tensor, weight: Tensor, precision: str) -> bool:
    return (
        _route(x.device) == "cpu-avx512"
        and x.dtype == weight.dtype == torch.float32
        and (precision != "int8" or cpu_backend.int8_supported())
    )


def real_binary_linear(
    x: Tensor, wp: Tensor, in_features: int, scale: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """``linear(x, sign(W)) * scale + bias`` for real ``(N, F)`` input and 1-bit ``(K, words)``
    weights (a binary network's first layer: real pixels, weights ``alpha * sign(W)`` with
    ``alpha`` in ``scale``). Exact up to float summation order."""
    _check_float(x, "input")
    _check_words(wp, 2, "packed weights")
    if x.dim() != 2 or x.shape[1] != in_features or wp.shape[1] != words_for(in_features):
        raise ValueError(
            f"real_binary_linear expects (N, {in_features}) input and (K, {words_for(in_features)}) packed "
            f"weights, got {tuple(x.shape)} and {tuple(wp.shape)}"
        )
    _check_same_device(x, wp, scale, bias, wp.shape[0])
    name = _route(x.device)
    if name in CPU_BACKENDS:
        return cpu_backend.real_binary_linear(x, wp, in_features, scale, bias, name)
    return reference.real_binary_linear(x, wp, in_features, scale, bias)


def xnor_conv2d(
    x: Tensor, w: Tensor, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1
) -> Tensor:
    """Exactly ``conv2d(sign(x), sign(w), None, stride, padding, dilation, groups)`` with
    ``sign(0) = +1`` (integers in a float32 tensor), computed by XNOR-popcount."""
    _check_float(x, "input")
    _check_float(w, "weight")
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(
            f"xnor_conv2d expects NCHW input and (K, C/groups, kh, kw) weights, "
            f"got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if groups < 1 or x.shape[1] % groups or x.shape[1] // groups != w.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels, weights expect {w.shape[1]} per group with groups={groups}")
    if _route(x.device) == REFERENCE:
        return reference.xnor_conv2d(
            x, w, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), groups
        )
    return xnor_conv2d_packed(
        pack_signs(x, groups),
        pack_weights(w, groups),
        x.shape[1],
        (w.shape[2], w.shape[3]),
        stride,
        padding,
        dilation,
        groups,
    )


def xnor_linear(x: Tensor, w: Tensor) -> Tensor:
    """Exactly ``linear(sign(x), sign(w))`` with ``sign(0) = +1``, by XNOR-popcount."""
    _check_float(x, "input")
    _check_float(w, "weight")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"xnor_linear expects (N, F) input and (K, F) weights, got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if _route(x.device) == REFERENCE:
        return reference.xnor_linear(x, w)
    return xnor_linear_packed(pack_signs(x), pack_weights(w), x.shape[1])
