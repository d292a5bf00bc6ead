"""``bnas export GENOTYPE CHECKPOINT --format lce --out model.tflite``: a Larq Compute Engine
flatbuffer for ARM devices (extra ``[lce]``: tensorflow-cpu, tf-keras, larq,
larq-compute-engine).

The route is general, not per genotype: the trained network's deployable twin
(:func:`~bnas.export.deploy.deploy_twin`) is traced with torch.fx, and every node of the graph
becomes its larq / Keras equivalent, in NHWC:

* a fully binary conv -> ``larq.layers.QuantConv2D`` with the activation quantizer's larq
  equivalent, ``ste_sign`` on the +-1 kernel, zero padding (``pad_values=0``), then one
  per-channel ``* scale + bias`` (alpha and the folded BN), which LCE's converter fuses into
  the ``LceBconv2d``; a fully binary linear layer -> the same 1x1 conv on a 1x1 map (LCE has
  no binary dense kernel; a ``QuantDense`` would stay float);
* binary activations on real weights -> a larq sign, then a float conv;
* real convs, linears, unfolded BNs, pools, activations, additions, concatenations, pads,
  crops and flatten -> their Keras layers (flatten first transposes NHWC back to PyTorch's
  CHW order, so the next layer's weights stay as trained).

Where TFLite's ``SAME`` padding is not PyTorch's (a stride-2 layer on an even map: TFLite pads
after, PyTorch before), a float layer pads explicitly; a binary conv cannot (LCE binarizes a
padded 0 to +1), so it runs SAME on the map reversed in H and W with its kernel reversed,
which pads where PyTorch does, and reverses the result back.

A node without an equivalent is one line naming the genotype's op and what to change.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..atomic import write_bytes_atomic
from ..genotype import Genotype
from ..ops.basic import Zero
from ..ops.cell_inputs import ResidualProjection
from ..ops.common import RPReLU
from ..ops.stem_head import GlobalAvgPool
from .deploy import LEAF_TYPES, ScaledSignConv2d, ScaledSignLinear, deploy_twin, describe, require, trace_twin
from .folding import bn_affine
from .format import ExportError
from .layers import SignConv2d, SignLinear

__all__ = ["LARQ_ACTIVATIONS", "import_lce", "to_keras", "to_lce"]

log = logging.getLogger(__name__)
FMT = "lce"

#: bnas activation quantizer -> the larq quantizer the Keras model names (all compute
#: sign(x) with sign(0) = +1 at inference; they differ only in training gradients).
LARQ_ACTIVATIONS = {
    "ste": "ste_sign",
    "approx_sign": "approx_sign",
    "swish_sign": "swish_sign",
    "identity_ste": "ste_sign(clip_value=None)",
    "stochastic": "ste_sign",  # bnas's stochastic sign is the deterministic sign in eval
    "rsign": "approx_sign",  # after subtracting the learnt threshold (ReActNet's gradient)
}

# modules mapped whole: their forward reads the input's shape in Python, which a trace cannot follow
_LEAVES = LEAF_TYPES + (GlobalAvgPool, RPReLU, Zero, ResidualProjection)


def import_lce() -> SimpleNamespace:
    """tensorflow, tf-keras, larq and larq-compute-engine, imported quietly (TF logs much on
    import), or one line naming the ``[lce]`` extra."""
    # TF's C++ logging: 3 also hides the cuFFT / cuDNN "already registered" lines that its
    # import prints at error level on machines with CUDA libraries.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf_first = "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1"
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # larq builds on the Keras 2 API (tf-keras)
    tf = require("tensorflow", "lce", FMT)
    keras = require("tf_keras", "lce", FMT)
    try:
        lq = require("larq", "lce", FMT)
    except AttributeError as exc:  # larq on Keras 3: tensorflow was imported before the variable was set
        hint = "tensorflow was imported before bnas; " if tf_first else ""
        raise ExportError(
            f"bnas export --format lce: larq needs the Keras 2 API: {hint}set TF_USE_LEGACY_KERAS=1 "
            "before tensorflow is imported"
        ) from exc
    lce = require("larq_compute_engine", "lce", FMT)
    tf.get_logger().setLevel(logging.ERROR)
    return SimpleNamespace(tf=tf, keras=keras, lq=lq, lce=lce)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The converter's C++ (MLIR) prints progress to fd 2; keep it unless conversion fails."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            tail = sink.read()[-4000:].decode(errors="replace")
            if tail.strip():
                log.error("LCE converter output:\n%s", tail)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# The modules whose layers an export builds: its own (below), larq's and tf-keras's.
_NOT_TRANSPILED = (__name__, "larq", "tf_keras")


@contextlib.contextmanager
def _without_autograph() -> Iterator[None]:
    """Keras and its SavedModel export run every subclassed layer's ``call`` through
    autograph, which transpiles it to a graph of ``tf.cond`` / ``tf.while_loop`` for
    tensor-dependent Python control flow. Neither bnas's layers nor larq's have any, and the
    transpiling was about two thirds of an export's time (the flatbuffer is the same byte for
    byte without it), so the modules that define them are left to run as written. The rule
    table is TensorFlow's internal one (pinned by the [lce] extra); where it is missing, the
    export still works, only slower."""
    try:
        from tensorflow.python.autograph.core import config, config_lib  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:  # a TensorFlow that moved its autograph internals
        yield
        return
    saved = config.CONVERSION_RULES
    config.CONVERSION_RULES = tuple(config_lib.DoNotConvert(m) for m in _NOT_TRANSPILED) + saved
    try:
        yield
    finally:
        config.CONVERSION_RULES = saved


# --------------------------------------------------------------------------------------
# Padding: PyTorch's symmetric padding (and ceil_mode) against TFLite's VALID / SAME
# --------------------------------------------------------------------------------------
Pads = tuple[tuple[int, int], tuple[int, int]]


def _dim_pads(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> tuple[int, int, int]:
    """(pad before, pad after, output size) that PyTorch's windows actually use."""
    ke = d * (k - 1) + 1
    if ceil:
        out = -(-(n + 2 * p - ke) // s) + 1
        if (out - 1) * s >= n + p:  # PyTorch drops a last window that starts in the padding
            out -= 1
    else:
        out = (n + 2 * p - ke) // s + 1
    return p, max(0, (out - 1) * s + ke - n - p), out


def _same_pads(n: int, k: int, s: int, d: int) -> tuple[int, int, int]:
    ke = d * (k - 1) + 1
    out = -(-n // s)
    total = max((out - 1) * s + ke - n, 0)
    return total // 2, total - total // 2, out


def _padding(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    ceil: bool = False,
) -> str | Pads:
    """``"valid"``, ``"same"``, or explicit ((top, bottom), (left, right)) then VALID."""
    want = [_dim_pads(size[i], kernel[i], stride[i], padding[i], dilation[i], ceil) for i in range(2)]
    if all(b == 0 and a == 0 for b, a, _ in want):
        return "valid"
    if all(want[i] == _same_pads(size[i], kernel[i], stride[i], dilation[i]) for i in range(2)):
        return "same"
    return ((want[0][0], want[0][1]), (want[1][0], want[1][1]))


def _dilated_stride(stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | None:
    """Keras takes no stride with a dilation: such a conv runs at stride 1 (same padding, so the
    windows of rows 0, s, 2s, ... are PyTorch's), then keeps every s-th row and column; it
    costs s^2 times the conv's work."""
    return stride if stride != (1, 1) and dilation != (1, 1) else None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


# --------------------------------------------------------------------------------------
# Keras layers that hold constants (defined once TF is imported)
# --------------------------------------------------------------------------------------
def _custom_layers(lib: SimpleNamespace) -> SimpleNamespace:
    tf, keras = lib.tf, lib.keras

    class Affine(keras.layers.Layer):  # type: ignore[name-defined]
        """``x * scale + offset`` with constants broadcast from the last axes (LCE fuses
        a per-channel one after a binary conv into the conv)."""

        def __init__(self, scale: np.ndarray | None, offset: np.ndarray | None, **kwargs: Any):
            super().__init__(**kwargs)
            self.scale = None if scale is None else tf.constant(scale, tf.float32)
            self.offset = None if offset is None else tf.constant(offset, tf.float32)

        def call(self, x: Any) -> Any:
            if self.scale is not None:
                x = x * self.scale
            if self.offset is not None:
                x = x + self.offset
            return x

    class Clip(keras.layers.Layer):  # type: ignore[name-defined]
        def __init__(self, lo: float, hi: float, **kwargs: Any):
            super().__init__(**kwargs)
            self.lo, self.hi = lo, hi

        def call(self, x: Any) -> Any:
            return tf.clip_by_value(x, self.lo, self.hi)

    class Pad(keras.layers.Layer):  # type: ignore[name-defined]
        """NHWC pad: constant (any value, e.g. -inf before a max-pool), or mirrored."""

        def __init__(self, pads: Pads, mode: str = "CONSTANT", value: float = 0.0, **kwargs: Any):
            super().__init__(**kwargs)
            self.pads = [[0, 0], list(pads[0]), list(pads[1]), [0, 0]]
            self.mode, self.value = mode, value

        def call(self, x: Any) -> Any:
            if self.mode == "CONSTANT":
                return tf.pad(x, self.pads, constant_values=self.value)
            return tf.pad(x, self.pads, mode=self.mode)

    class Slice(keras.layers.Layer):  # type: ignore[name-defined]
        def __init__(self, rows: tuple[int, int], cols: tuple[int, int], **kwargs: Any):
            super().__init__(**kwargs)
            self.rows, self.cols = rows, cols

        def call(self, x: Any) -> Any:
            return x[:, self.rows[0] : self.rows[1], self.cols[0] : self.cols[1], :]

    class Flip(keras.layers.Layer):  # type: ignore[name-defined]
        """Reverse H and W."""

        def call(self, x: Any) -> Any:
            return tf.reverse(x, [1, 2])

    class Subsample(keras.layers.Layer):  # type: ignore[name-defined]
        def __init__(self, stride: tuple[int, int], **kwargs: Any):
            super().__init__(**kwargs)
            self.stride = stride

        def call(self, x: Any) -> Any:
            return x[:, :: self.stride[0], :: self.stride[1], :]

    class Zeros(keras.layers.Layer):  # type: ignore[name-defined]
        """Zeros of the input's batch, (H, W) subsampled by ``stride``, ``channels`` wide."""

        def __init__(self, stride: int, channels: int, **kwargs: Any):
            super().__init__(**kwargs)
            self.stride, self.channels = stride, channels

        def call(self, x: Any) -> Any:
            s = self.stride
            return tf.tile(x[:, ::s, ::s, :1] * 0.0, [1, 1, 1, self.channels])

    return SimpleNamespace(Affine=Affine, Clip=Clip, Pad=Pad, Slice=Slice, Flip=Flip, Subsample=Subsample, Zeros=Zeros)


# --------------------------------------------------------------------------------------
# The fx graph of the twin -> a Keras functional model
# --------------------------------------------------------------------------------------
class _Unsupported(Exception):
    def __init__(self, what: str, hint: str):
        super().__init__(what)
        self.what, self.hint = what, hint


class _KerasBuilder:
    def __init__(
        self, lib: SimpleNamespace, net: nn.Module, gm: torch.fx.GraphModule, table: dict[str, dict[str, Any]]
    ):
        self.lib, self.net, self.gm, self.table = lib, net, gm, table
        self.k = lib.keras
        self.L = _custom_layers(lib)
        self.modules = dict(gm.named_modules())
        self.env: dict[torch.fx.Node, Any] = {}

    # -- helpers ---------------------------------------------------------------------
    def _hw(self, x: Any) -> tuple[int, int]:
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise _Unsupported(f"an input of shape {shape[1:]}", "this layer needs a feature map (H, W, C)")
        return int(shape[1]), int(shape[2])

    def _larq_quantizer(self, path: str) -> Any:
        name = self.table.get(path, {}).get("activation", "ste")
        larq = LARQ_ACTIVATIONS.get(name)
        if larq is None:
            raise _Unsupported(f"activation quantizer {name!r}", "use one of " + ", ".join(LARQ_ACTIVATIONS))
        if larq == "ste_sign(clip_value=None)":
            return self.lib.lq.quantizers.SteSign(clip_value=None)
        return larq

    def _sign(self, x: Any, threshold: Tensor | None, path: str) -> Any:
        """Binary activations feeding a float layer: a larq sign as its own layer."""
        if threshold is not None:
            x = self.L.Affine(None, -_np(threshold))(x)
        quantizer = self._larq_quantizer(path)
        layer = self.lib.lq.quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
        return layer(x)

    # -- modules ---------------------------------------------------------------------
    def binary_conv(self, m: ScaledSignConv2d, x: Any, path: str) -> Any:
        lq, L = self.lib.lq, self.L
        size = self._hw(x)
        if m.groups != 1:
            # a grouped bconv from LCE 0.16's converter (64 channels in 2 groups) failed to run in
            # its interpreter: a float conv on the signs computes the same, at float speed and size
            y = self._float_conv(self._sign(x, m.threshold, path), m, m.signs, None)
            return L.Affine(_np(m.scale), _np(m.bias))(y)
        if m.threshold is not None:
            x = L.Affine(None, -_np(m.threshold))(x)
        kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        subsample = _dilated_stride(stride, dilation)
        if subsample:
            stride = (1, 1)
        mode = _padding(size, kernel, stride, _pair(m.padding), dilation)
        signs = m.signs
        flip = not isinstance(mode, str)
        if not isinstance(mode, str):
            # PyTorch pads before where SAME pads after (a stride-2 conv on an even map): on the
            # map reversed in H and W, with the kernel reversed too, SAME is PyTorch's padding.
            # LCE binarizes a padded 0 to +1 (pad_values=0 is its own, exact, zero padding), so
            # explicit padding before the sign would be wrong.
            (top, bottom), (left, right) = mode
            want = [_dim_pads(size[i], kernel[i], stride[i], _pair(m.padding)[i], dilation[i], False) for i in range(2)]
            same = [_same_pads(size[i], kernel[i], stride[i], dilation[i]) for i in range(2)]
            if same != [(after, before, out) for before, after, out in want]:
                raise _Unsupported(
                    f"a binary conv whose padding ({top}, {bottom}) x ({left}, {right}) on a {size[0]}x{size[1]} map "
                    "is neither TFLite's SAME nor its mirror image",
                    "use 'same' padding (padding = dilation * (kernel - 1) / 2) or none",
                )
            x = L.Flip()(x)
            signs = signs.flip(2, 3)
            mode = "same"
        conv = lq.layers.QuantConv2D(
            m.out_channels,
            m.kernel_size,
            strides=stride,
            padding=mode,
            pad_values=0.0,
            dilation_rate=m.dilation,
            use_bias=False,
            input_quantizer=self._larq_quantizer(path),
            kernel_quantizer="ste_sign",
            kernel_constraint=None,
        )
        y = conv(x)
        conv.set_weights([_np(signs.permute(2, 3, 1, 0))])
        y = L.Affine(_np(m.scale), _np(m.bias))(y)
        y = L.Flip()(y) if flip else y
        return L.Subsample(subsample)(y) if subsample else y

    def binary_linear(self, m: ScaledSignLinear, x: Any, path: str) -> Any:
        lq, L, k = self.lib.lq, self.L, self.k
        if len(x.shape) != 2:
            raise _Unsupported(f"an input of shape {tuple(x.shape)[1:]}", "put flatten or global_avgpool before it")
        if m.threshold is not None:
            x = L.Affine(None, -_np(m.threshold))(x)
        x = k.layers.Reshape((1, 1, m.in_features))(x)
        conv = lq.layers.QuantConv2D(
            m.out_features,
            1,
            use_bias=False,
            input_quantizer=self._larq_quantizer(path),
            kernel_quantizer="ste_sign",
            kernel_constraint=None,
        )
        y = conv(x)
        conv.set_weights([_np(m.signs.t().reshape(1, 1, m.in_features, m.out_features))])
        y = k.layers.Reshape((m.out_features,))(y)
        return L.Affine(_np(m.scale), _np(m.bias))(y)

    def conv(self, m: nn.Conv2d, x: Any, path: str) -> Any:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise _Unsupported(f"padding {m.padding!r} ({m.padding_mode})", "use a conv with integer zero padding")
        if isinstance(m, SignConv2d):
            x = self._sign(x, m.threshold, path)
        return self._float_conv(x, m, m.weight, m.bias)

    def _float_conv(self, x: Any, m: nn.Conv2d | ScaledSignConv2d, weight: Tensor, bias: Tensor | None) -> Any:
        """A float conv with PyTorch's zero padding (explicit where SAME differs)."""
        k = self.k
        size = self._hw(x)
        stride = _pair(m.stride)
        subsample = _dilated_stride(stride, _pair(m.dilation))
        if subsample:
            stride = (1, 1)
        mode = _padding(size, _pair(m.kernel_size), stride, _pair(m.padding), _pair(m.dilation))
        if not isinstance(mode, str):
            x = self.L.Pad(mode)(x)
            mode = "valid"
        w = weight.detach()
        layer: Any
        if m.groups == m.in_channels and m.groups > 1:
            mult = m.out_channels // m.in_channels
            layer = k.layers.DepthwiseConv2D(
                m.kernel_size,
                m.stride,
                mode,
                depth_multiplier=mult,
                dilation_rate=m.dilation,
                use_bias=bias is not None,
            )
            kernel = w.reshape(m.in_channels, mult, *w.shape[2:]).permute(2, 3, 0, 1)
        else:
            layer = k.layers.Conv2D(
                m.out_channels,
                m.kernel_size,
                stride,
                mode,
                dilation_rate=m.dilation,
                groups=m.groups,
                use_bias=bias is not None,
            )
            kernel = w.permute(2, 3, 1, 0)
        y = layer(x)
        layer.set_weights([_np(kernel)] + ([_np(bias)] if bias is not None else []))
        return self.L.Subsample(subsample)(y) if subsample else y

    def linear(self, m: nn.Linear, x: Any, path: str) -> Any:
        if len(x.shape) != 2:
            raise _Unsupported(f"an input of shape {tuple(x.shape)[1:]}", "put flatten or global_avgpool before it")
        if isinstance(m, SignLinear):
            x = self._sign(x, m.threshold, path)
        layer = self.k.layers.Dense(m.out_features, use_bias=m.bias is not None)
        y = layer(x)
        layer.set_weights([_np(m.weight.t())] + ([_np(m.bias)] if m.bias is not None else []))
        return y

    def max_pool(self, m: nn.MaxPool2d, x: Any) -> Any:
        if _pair(m.dilation) != (1, 1) or m.return_indices:
            raise _Unsupported("a dilated max-pool", "use dilation 1")
        ks, st = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        mode = _padding(self._hw(x), ks, st, _pair(m.padding), ceil=m.ceil_mode)
        if not isinstance(mode, str):
            x = self.L.Pad(mode, value=float("-inf"))(x)
            mode = "valid"
        return self.k.layers.MaxPool2D(ks, st, mode)(x)

    def avg_pool(self, m: nn.AvgPool2d, x: Any) -> Any:
        if m.divisor_override is not None:
            raise _Unsupported("an average pool with divisor_override", "leave divisor_override unset")
        size = self._hw(x)
        ks, st = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        pad = _pair(m.padding)
        mode = _padding(size, ks, st, pad, ceil=m.ceil_mode)
        # TFLite's SAME average leaves the padding out of the count: PyTorch's count_include_pad=False
        if mode == "valid" or (mode == "same" and not m.count_include_pad):
            return self.k.layers.AveragePooling2D(ks, st, mode)(x)
        # explicit padding (also for SAME with the padding counted, which TFLite's SAME leaves out)
        rows, cols = (_dim_pads(size[i], ks[i], st[i], pad[i], 1, m.ceil_mode) for i in range(2))
        pads: Pads = ((rows[0], rows[1]), (cols[0], cols[1]))
        (top, bottom), (left, right) = pads
        y = self.k.layers.AveragePooling2D(ks, st, "valid")(self.L.Pad(pads)(x))
        # PyTorch's divisor per window: real pixels, plus the symmetric padding if counted
        counted = torch.zeros(1, 1, size[0] + top + bottom, size[1] + left + right)
        if m.count_include_pad:
            counted[
                :, :, max(0, top - pad[0]) : top + size[0] + pad[0], max(0, left - pad[1]) : left + size[1] + pad[1]
            ] = 1
        else:
            counted[:, :, top : top + size[0], left : left + size[1]] = 1
        divisor = F.avg_pool2d(counted, ks, st) * (ks[0] * ks[1])
        return self.L.Affine(_np((ks[0] * ks[1]) / divisor)[0].transpose(1, 2, 0), None)(y)

    def flatten(self, x: Any, start_dim: int = 1, end_dim: int = -1) -> Any:
        if start_dim != 1 or end_dim not in (-1, len(x.shape) - 1):
            raise _Unsupported(f"flatten({start_dim}, {end_dim})", "flatten from dimension 1 to the end")
        if len(x.shape) == 4:
            if int(x.shape[1]) * int(x.shape[2]) > 1:
                x = self.k.layers.Permute((3, 1, 2))(x)  # NHWC -> NCHW: PyTorch's feature order
            return self.k.layers.Flatten()(x)
        return x

    def prelu(self, alpha: Tensor, x: Any) -> Any:
        a = _np(alpha)
        dims = len(x.shape)
        channels = int(x.shape[-1])
        if a.size == 1:
            a = np.full((channels,), float(a.reshape(-1)[0]), np.float32)
        layer = self.k.layers.PReLU(shared_axes=[1, 2] if dims == 4 else None)
        y = layer(x)
        layer.set_weights([a.reshape((1, 1, channels) if dims == 4 else (channels,))])
        return y

    def module(self, m: nn.Module, x: Any, path: str) -> Any:
        k, L = self.k, self.L
        if isinstance(m, ScaledSignConv2d):
            return self.binary_conv(m, x, path)
        if isinstance(m, ScaledSignLinear):
            return self.binary_linear(m, x, path)
        if isinstance(m, nn.Conv2d):
            return self.conv(m, x, path)
        if isinstance(m, nn.Linear):
            return self.linear(m, x, path)
        if isinstance(m, _BatchNorm):
            s, t = bn_affine(m)
            return L.Affine(_np(s), _np(t))(x)
        if isinstance(m, nn.MaxPool2d):
            return self.max_pool(m, x)
        if isinstance(m, nn.AvgPool2d):
            return self.avg_pool(m, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.ReLU):
            return k.layers.ReLU()(x)
        if isinstance(m, nn.Hardtanh):
            return L.Clip(float(m.min_val), float(m.max_val))(x)
        if isinstance(m, nn.PReLU):
            return self.prelu(m.weight, x)
        if isinstance(m, RPReLU):
            x = L.Affine(None, -_np(m.shift_in))(x)
            return L.Affine(None, _np(m.shift_out))(self.prelu(m.slope, x))
        if isinstance(m, GlobalAvgPool):
            return k.layers.GlobalAveragePooling2D()(x)
        if isinstance(m, Zero):
            self._hw(x)
            return L.Zeros(m.stride, m.c_out)(x)
        if isinstance(m, ResidualProjection):  # BN -> (one zero row / column on odd maps) -> 2x2/2 conv
            s, t = bn_affine(m.bn)
            x = L.Affine(_np(s), _np(t))(x)
            h, w = self._hw(x)
            if h % 2 or w % 2:
                x = L.Pad(((0, h % 2), (0, w % 2)))(x)
            return self._float_conv(x, m.conv, m.conv.weight, m.conv.bias)
        raise _Unsupported(f"the layer {type(m).__name__}", "replace the op in the genotype")

    # -- functions and methods ---------------------------------------------------------
    def _axis(self, x: Any, dim: int) -> int:
        dims = len(x.shape)
        dim = dim % dims
        if dims == 4:
            return {1: 3, 2: 1, 3: 2}[dim]
        return dim

    def function(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        k, L = self.k, self.L
        target = node.target
        name = getattr(target, "__name__", str(target))
        if node.op == "call_method" and target == "mean" or target is torch.mean:
            x = args[0]
            dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if len(x.shape) == 4 and dims is not None and {d % 4 for d in dims} == {2, 3}:
                return k.layers.GlobalAveragePooling2D(keepdims=bool(kwargs.get("keepdim", False)))(x)
        elif target in (operator.add, torch.add) and len(args) == 2 and not kwargs:
            if all(hasattr(a, "shape") for a in args):
                return k.layers.Add()(list(args))
        elif target is torch.cat:
            tensors = list(args[0])
            return k.layers.Concatenate(
                axis=self._axis(tensors[0], kwargs.get("dim", args[1] if len(args) > 1 else 0))
            )(tensors)
        elif target is F.pad:
            x, pad = args[0], list(args[1] if len(args) > 1 else kwargs["pad"])
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None) or 0.0
            if len(x.shape) == 4 and len(pad) == 4 and min(pad) >= 0:
                pads: Pads = ((pad[2], pad[3]), (pad[0], pad[1]))
                if mode == "constant":
                    return L.Pad(pads, value=float(value))(x)
                if mode == "replicate" and max(pad) <= 1:  # one repeated row/column is a symmetric mirror
                    return L.Pad(pads, mode="SYMMETRIC")(x)
                if mode == "reflect":
                    return L.Pad(pads, mode="REFLECT")(x)
        elif target is operator.getitem and isinstance(args[1], tuple) and len(args[0].shape) == 4:
            index = args[1]
            h, w = self._hw(args[0])
            if len(index) == 4 and all(isinstance(s, slice) and s.step in (None, 1) for s in index):
                if index[0] == slice(None) and index[1] == slice(None):
                    rows, cols = index[2].indices(h)[:2], index[3].indices(w)[:2]
                    return L.Slice(rows, cols)(args[0])
        elif target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self.flatten(args[0], start, end)
        elif target in (torch.relu, F.relu) or (node.op == "call_method" and target == "relu"):
            return k.layers.ReLU()(args[0])
        if target is getattr:
            raise _Unsupported(f"reading {args[1]!r} of a tensor at run time", "replace the op in the genotype")
        raise _Unsupported(f"the operation {name}{self._shapes(args)}", "replace the op in the genotype")

    @staticmethod
    def _shapes(args: tuple[Any, ...]) -> str:
        return "(" + ", ".join(str(tuple(a.shape)[1:]) if hasattr(a, "shape") else repr(a) for a in args) + ")"

    def _value(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._value(v) for v in a)
        return a

    def build(self, input_shape: tuple[int, ...]) -> Any:
        k = self.k
        output = None
        for node in self.gm.graph.nodes:
            path = ""
            stack = node.meta.get("nn_module_stack")
            if node.op == "call_module":
                path = str(node.target)
            elif stack:
                path = list(stack.values())[-1][0]
            try:
                if node.op == "placeholder":
                    shape = tuple(input_shape)
                    self.env[node] = k.Input(shape[1:] + shape[:1] if len(shape) == 3 else shape)
                elif node.op == "call_module":
                    self.env[node] = self.module(self.modules[str(node.target)], self._value(node.args[0]), path)
                elif node.op in ("call_function", "call_method"):
                    self.env[node] = self.function(node, self._value(node.args), self._value(dict(node.kwargs)))
                elif node.op == "output":
                    output = self._value(node.args[0])
                else:
                    raise _Unsupported(f"a {node.op} node ({node.target})", "replace the op in the genotype")
            except _Unsupported as exc:
                raise ExportError(
                    f"bnas export --format lce: {describe(self.net, path)}: {exc.what} has no LCE equivalent; {exc.hint}"
                ) from None
        return k.Model(self.env[next(iter(self.gm.graph.nodes))], output)


def to_keras(model: nn.Module, input_shape: tuple[int, ...] | None = None, lib: SimpleNamespace | None = None) -> Any:
    """The trained ``model`` rebuilt as a larq Keras model (NHWC input) with its weights."""
    lib = lib or import_lce()
    genotype = getattr(model, "genotype", None)
    if input_shape is None:
        if not isinstance(genotype, Genotype):
            raise ExportError("bnas export --format lce: the network has no genotype; pass its input shape (C, H, W)")
        input_shape = tuple(genotype.input)
    net, table = deploy_twin(model)
    gm = trace_twin(net, FMT, _LEAVES)
    rows = {entry["path"]: entry for entry in table}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # larq: "binary weight quantizer without kernel_constraint" (inference only)
        logging.getLogger("larq").setLevel(logging.ERROR)
        with _without_autograph():
            return _KerasBuilder(lib, net, gm, rows).build(input_shape)


def to_lce(model: nn.Module, out: str | os.PathLike[str], input_shape: tuple[int, ...] | None = None) -> Path:
    """Write ``model`` as an LCE flatbuffer (``.tflite``) at ``out``, atomically."""
    lib = import_lce()
    keras_model = to_keras(model, input_shape, lib)
    try:
        with _quiet_stderr(), warnings.catch_warnings(), _without_autograph():
            warnings.simplefilter("ignore")
            flatbuffer = lib.lce.convert_keras_model(keras_model)
    except Exception as exc:
        raise ExportError(
            f"bnas export --format lce: LCE's converter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    path = Path(out)
    write_bytes_atomic(path, bytes(flatbuffer), "LCE model")
    return path
