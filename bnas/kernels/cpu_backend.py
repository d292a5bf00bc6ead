"""The x86 CPU backend: a C++ extension built on first use, with three code paths.

``csrc/xnor_cpu.cpp`` is compiled once by ``torch.utils.cpp_extension.load`` into
``bnas.paths.cache_dir("extensions")`` (``$BNAS_CACHE/extensions``, else
``~/.cache/bnas/extensions``; ``$XDG_CACHE_HOME`` is honoured) and reused by later processes. The binary holds an AVX-512 VPOPCNTDQ, an AVX2 and
a plain-popcnt path; which ones this CPU can run is asked of the binary itself
(``__builtin_cpu_supports``). When nothing can be built (no C++ compiler) the caller
gets ``None`` and one warning, and the dispatcher falls back to the reference; with
``BNAS_REQUIRE_EXTENSION=1`` (CI) every such call raises :class:`ExtensionUnavailableError`
instead, so a machine without the kernels cannot pass on the reference.

Threads. A kernel call (a packed conv or linear, or packing signs) runs on
:func:`kernel_threads` threads: ``torch.get_num_threads()`` (set by ``torch.set_num_threads``,
which the CLI's ``--threads`` flags call, and at start-up by ``OMP_NUM_THREADS``), or
``$BNAS_KERNEL_THREADS`` where set, which changes the kernels only and leaves torch's float
ops alone. Small problems use fewer threads (never more than their work is worth). Which
threads (``csrc/work_pool.h``):

- by default, torch's own OpenMP team, the one its float ops use: between the float ops of a
  packed network its threads spin, so they take up a kernel's work at once.
  ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` configure them, for the kernels as for torch;
- with ``$BNAS_KERNEL_THREADS`` set, a pool of bnas's own persistent threads, in which the
  calling thread always works and a call never waits for a helper the OS has not scheduled
  (an OpenMP parallel region ends in a barrier that does wait: on a 2-core machine with one
  other busy process, a float conv on 2 threads took 2-30 ms against 1.3 ms on 1). On a shared
  machine ``torch.set_num_threads(1)`` with ``BNAS_KERNEL_THREADS=2`` keeps every op off the
  barrier and lets the kernels use a free core when there is one.

``bnas.export.PackedNetwork`` also caps each forward's threads at the cores no other process
is running on (:mod:`bnas.kernels.thread_budget`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from .. import paths
from ..errors import BnasError
from .int8 import PixelGrid, add_grid_term, grid_term, grid_zero_point, quantize_weights
from .packing import unpack_weights

_Layout = TypeVar("_Layout")

SOURCE = Path(__file__).resolve().parent / "csrc" / "xnor_cpu.cpp"
EXTENSION_NAME = "bnas_xnor_cpu"
# every header xnor_cpu.cpp includes (all of csrc's): a change to one rebuilds the extension
HEADERS = sorted(SOURCE.parent.glob("*.h"))
# -fopenmp: the kernels run on torch's OpenMP team (csrc/work_pool.h); the extension then shares
# the libgomp torch has loaded. No FMA contraction: the epilogue is exact.
CFLAGS = ["-O3", "-pthread", "-fopenmp", "-ffp-contract=off"]

# Backend name -> the extension's code-path constant name, fastest first.
ISA_OF_BACKEND = {"cpu-avx512": "ISA_AVX512", "cpu-avx2": "ISA_AVX2", "cpu-popcnt": "ISA_POPCNT"}
REQUIREMENT = {
    "cpu-avx512": "AVX-512F, AVX-512BW and AVX-512 VPOPCNTDQ",
    "cpu-avx2": "AVX2",
    "cpu-popcnt": "the POPCNT instruction",
}

_lock = threading.Lock()
_extension: ModuleType | None = None
_build_error: str | None = None
_supported: list[str] | None = None
_int8_supported: bool | None = None
_repacked: OrderedDict[tuple, tuple[int, Any]] = OrderedDict()
_REPACK_CACHE_SIZE = 256
REQUIRE_ENV = "BNAS_REQUIRE_EXTENSION"
THREADS_ENV = "BNAS_KERNEL_THREADS"


class ExtensionUnavailableError(BnasError):
    """The CPU extension could not be built or loaded while ``BNAS_REQUIRE_EXTENSION`` is set."""


class KernelThreadsError(BnasError):
    """``$BNAS_KERNEL_THREADS`` is not a whole number of threads >= 1."""


def kernel_threads() -> int:
    """Threads one kernel call may use: ``$BNAS_KERNEL_THREADS`` where set (read on every
    call), else ``torch.get_num_threads()``."""
    if THREADS_ENV not in os.environ:  # the usual case, without get's KeyError inside
        return torch.get_num_threads()
    value = os.environ[THREADS_ENV].strip()
    if not value:
        return torch.get_num_threads()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise KernelThreadsError(
            f"{THREADS_ENV}={value!r} is not a number of threads: set it to a whole number >= 1, "
            "or unset it to follow torch.get_num_threads()"
        )
    return threads


def extension_required() -> bool:
    """True when ``$BNAS_REQUIRE_EXTENSION`` is set to anything but empty or ``0``."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def _raise_if_required() -> None:
    if extension_required():
        raise ExtensionUnavailableError(
            f"the CPU XNOR kernels are unavailable ({_build_error}) and {REQUIRE_ENV} is set: "
            "install a C++ compiler (e.g. g++) and ninja, or unset it to use the slow reference"
        )


def cache_dir() -> Path:
    """Where the compiled extension lives: ``paths.cache_dir("extensions")``, one folder per
    torch / Python build and, within it, one per bnas checkout (the folder of the kernel source)."""
    # One folder per torch/python build: the binary links against both.
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    # One per checkout: torch's build names the source by its absolute path, so two checkouts
    # sharing a folder rebuilt the kernels (a minute) whenever the other had built them last.
    checkout = hashlib.sha256(str(SOURCE.parent).encode()).hexdigest()[:12]
    return paths.cache_dir("extensions") / tag.replace("+", "_") / f"src-{checkout}"


def headers_key() -> str:
    """A digest of the headers the source includes. ``load`` keys its build on the source
    file and the flags only; this key, passed as a flag, makes a header edit rebuild too
    (ninja's dependency log would catch it in a new process, not within one)."""
    digest = hashlib.sha256()
    for header in HEADERS:
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


def extension() -> ModuleType | None:
    """The compiled extension, building it on first call; ``None`` if it cannot be built
    (then :class:`ExtensionUnavailableError` instead, on every call, under ``BNAS_REQUIRE_EXTENSION``)."""
    global _extension, _build_error
    if _extension is not None or _build_error is not None:
        if _extension is None:
            _raise_if_required()
        return _extension
    with _lock:
        if _extension is not None or _build_error is not None:
            if _extension is None:
                _raise_if_required()
            return _extension
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _build_error = f"the CPU kernels need an x86-64 CPU, this is {platform.machine()}"
        else:
            try:
                load = _import_cpp_extension_load()
                build_dir = cache_dir()
                build_dir.mkdir(parents=True, exist_ok=True)
                _extension = load(
                    name=EXTENSION_NAME,
                    sources=[str(SOURCE)],
                    extra_cflags=CFLAGS + [f"-DBNAS_HEADERS_KEY={headers_key()}"],
                    extra_ldflags=["-pthread", "-fopenmp"],
                    build_directory=str(build_dir),
                    verbose=False,
                )
            except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
                _build_error = _first_error_line(exc)
        if _build_error is not None:
            _raise_if_required()
            warnings.warn(
                f"bnas.kernels: the CPU XNOR kernels are unavailable ({_build_error}); using "
                "the slow float reference. Install a C++ compiler (e.g. g++) "
                "and ninja to enable them.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _extension


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops the "No CUDA runtime is found, using CUDA_HOME=..." warning that
    ``torch.utils.cpp_extension`` logs on import where a CUDA toolkit is installed but torch
    sees no GPU: building the CPU kernels needs no CUDA, so there it is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension_load() -> Callable[..., ModuleType]:
    """``torch.utils.cpp_extension.load``, imported without torch's CUDA_HOME notice."""
    log = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaRuntimeNotice()
    log.addFilter(quiet)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.removeFilter(quiet)
    return load


def _first_error_line(exc: BaseException) -> str:
    """The compiler's first ``error:`` line (the build log is long), else the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [type(exc).__name__])[0 if errors else -1]


def build_error() -> str | None:
    """Why the extension could not be built (``None`` if it was, or was not tried yet)."""
    return _build_error


def supported_backends() -> list[str]:
    """CPU backend names this machine can run, fastest first (empty without the extension)."""
    global _supported
    if _supported is None:
        ext = extension()
        _supported = (
            []
            if ext is None
            else [name for name, isa in ISA_OF_BACKEND.items() if ext.isa_supported(getattr(ext, isa))]
        )
    return _supported


def _built(name: str) -> ModuleType:
    """The extension, for backend ``name`` (a RuntimeError where it could not be built)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"backend {name!r} needs the CPU extension, which could not be built: {_build_error}")
    return ext


def isa_of(name: str) -> int:
    """The extension's instruction-set code of code path ``name``, as its calls take it."""
    return int(getattr(_built(name), ISA_OF_BACKEND[name]))


def lane_weights(wp: Tensor, groups: int, name: str) -> Tensor:
    """Weights in the kernel's lane layout, cached: a network reuses the same packed weights
    on every call. Entries are keyed on the tensor's identity, checked against its version
    counter (an in-place update bumps it), and dropped when the tensor is freed, so
    temporary weights (``xnor_conv2d`` on float tensors) do not pile up."""
    return _cached_layout(
        wp, ("lanes", groups, name), lambda: _built(name).repack_weights(wp.contiguous(), groups, isa_of(name))
    )


def _cached_layout(wp: Tensor, layout: tuple, make: Callable[[], _Layout]) -> _Layout:
    key = (id(wp),) + layout
    hit = _repacked.get(key)
    if hit is not None and hit[0] == wp._version:
        return hit[1]
    out = make()
    if hit is None:
        weakref.finalize(wp, _repacked.pop, key, None)
    _repacked[key] = (wp._version, out)
    if len(_repacked) > _REPACK_CACHE_SIZE:
        _repacked.popitem(last=False)
    return out


def pack_weights(w: Tensor, name: str) -> Tensor:
    """Float (K, Cg, kh, kw) weights are an NCHW image batch of K: packing them gives
    (K, kh, kw, Wg) directly; (K, F) gives (K, words)."""
    return _built(name).pack_signs(w, 1, isa_of(name), kernel_threads(), None)


def pack_signs(x: Tensor, groups: int, name: str, threshold: Tensor | None = None) -> Tensor:
    """Float NCHW -> packed NHWC, or (N, F) -> (N, words), with code path ``name``: bit 1 where
    ``x >= 0``, or ``x >= threshold`` per channel (feature) when given."""
    return _built(name).pack_signs(x, groups, isa_of(name), kernel_threads(), threshold)


def pack_signs_call(name: str) -> Callable[..., Tensor]:
    """:func:`pack_signs` as ``call(x, groups, threads, threshold=None)``."""
    pack, isa = _built(name).pack_signs, isa_of(name)
    return lambda x, groups, threads, threshold=None: pack(x, groups, isa, threads, threshold)


def xnor_conv2d_packed(
    xp: Tensor,
    wp: Tensor,
    in_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    scale: Tensor | None,
    bias: Tensor | None,
    pack_output: bool,
    name: str,
) -> Tensor:
    """Packed conv with code path ``name``: float output (N, K, OH, OW) in channels_last
    memory (the kernel writes NHWC), or packed NHWC words."""
    return _built(name).conv2d_packed(
        xp.contiguous(),
        lane_weights(wp, groups, name),
        in_channels,
        wp.shape[0],
        kernel_size[0],
        kernel_size[1],
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        groups,
        scale,
        bias,
        pack_output,
        isa_of(name),
        kernel_threads(),
    )


def xnor_linear_packed(
    xp: Tensor, wp: Tensor, in_features: int, scale: Tensor | None, bias: Tensor | None, pack_output: bool, name: str
) -> Tensor:
    """Packed linear with code path ``name`` (a 1x1 convolution over N samples)."""
    return _built(name).linear_packed(
        xp.contiguous(),
        lane_weights(wp, 1, name),
        in_features,
        wp.shape[0],
        scale,
        bias,
        pack_output,
        isa_of(name),
        kernel_threads(),
    )


def fused_conv_call(
    lanes: Tensor,
    static: tuple[Any, ...],
    name: str,
    pack_threshold: Tensor | None = None,
    rprelu: Sequence[Tensor] = (),
) -> tuple[Callable[..., Any], tuple[Any, ...], tuple[Any, ...]]:
    """:func:`conv2d_fused_on_lanes` split for a caller that binds a layer once and calls it on
    every forward (``bnas.export.program``): the extension's function, the arguments before the
    residual (``lanes``, then ``static`` = in and out channels, the 8 geometry values, groups,
    scale, bias) and those after the three output flags (``pack_threshold``, ``rprelu``, the
    code path); the thread count comes last. ``call(xp, *head, residual, float_output,
    pack_output, into_residual, *tail, threads)`` is ``conv2d_fused_on_lanes``'s call."""
    return _built(name).conv2d_packed_fused, (lanes, *static), (pack_threshold, list(rprelu), isa_of(name))


# Channels a group for which a grouped conv on float input runs on the float map, by code
# path. The AVX-512 kernel takes 1, 2, 4, 8 or 16; with 16 the packed path's popcount of a
# group's word is as fast or faster on some shapes (benchmarks/grouped_conv.py: 1 to 8
# channels a group run faster on the float map in every shape there). The AVX2 kernel (8
# lanes, a table popcount) is 3.4-5.8x faster than the packed path on DARTS's depthwise convs
# and 0.8-1.0x on EBNAS's groups of 4 and 8 (`--backend cpu-avx2`), so there only depthwise
# convs use it. Elsewhere it is a scalar loop, slower than the packed path (packed
# ebnas_cifar10 on cpu-popcnt: 31 ms a forward against 99 ms on the float map).
FLOAT_MAP_GROUP_CHANNELS = {"cpu-avx512": (1, 2, 4, 8), "cpu-avx2": (1,)}


def grouped_on_float_map(in_channels: int, out_channels: int, groups: int, name: str = "cpu-avx512") -> bool:
    """Whether a grouped binary conv of this shape on float input runs on the float map
    (:func:`grouped_conv_call`) on code path ``name``: more than one group, as many outputs as
    inputs, and ``FLOAT_MAP_GROUP_CHANNELS[name]`` channels a group (a depthwise conv is one)."""
    per_group = in_channels // groups if groups > 0 else 0
    return (
        groups > 1
        and in_channels == out_channels == groups * per_group
        and per_group in FLOAT_MAP_GROUP_CHANNELS.get(name, ())
    )


def grouped_conv_call(
    wp: Tensor,
    channels_per_group: int,
    geometry: tuple[int, ...],
    scale: Tensor | None,
    bias: Tensor | None,
    name: str,
    pack_threshold: Tensor | None = None,
    rprelu: Sequence[Tensor] = (),
) -> tuple[Callable[..., Any], tuple[Any, ...], tuple[Any, ...]]:
    """A grouped binary conv of 1, 2, 4, 8 or 16 channels a group, as many outputs as inputs
    (packed weights ``wp``, ``geometry`` = (kh, kw, sh, sw, ph, pw, dh, dw)), on a float map, split as
    :func:`fused_conv_call` splits its call: ``call(x, *head, residual, float_output,
    pack_output, into_residual, *tail, threads)`` returns what ``conv2d_packed_fused`` returns
    for ``x``'s packed signs, bit for bit, from the float map itself (output channels in SIMD
    lanes, where the packed path holds a group's few bits in a word of their own). The
    weights' signs are unpacked once and cached."""
    kh, kw = geometry[:2]
    words = _cached_layout(
        wp, ("grouped", channels_per_group), lambda: _grouped_weight_words(wp, channels_per_group, kh, kw)
    )
    channels = wp.shape[0]
    return (
        _built(name).grouped_conv_fused,
        (words, channels, channels_per_group, *geometry, scale, bias),
        (pack_threshold, list(rprelu), isa_of(name)),
    )


def _grouped_weight_words(wp: Tensor, channels_per_group: int, kh: int, kw: int) -> Tensor:
    """Packed (K, kh, kw, 1) weights of ``channels_per_group`` channels a group -> (kh, kw, K
    rounded up to 16) int32: per tap, output channel k's word has bit c set where the sign of
    its weight on its group's channel c is +1 (zero words past K)."""
    signs = unpack_weights(wp, channels_per_group)  # (K, Cg, kh, kw) of +-1
    place = torch.tensor([1 << c for c in range(channels_per_group)], dtype=torch.int32).view(1, -1, 1, 1)
    words = ((signs > 0).to(torch.int32) * place).sum(dim=1, dtype=torch.int32)  # (K, kh, kw)
    k = words.shape[0]
    lanes = torch.zeros(kh, kw, (k + 15) // 16 * 16, dtype=torch.int32)
    lanes[:, :, :k] = words.permute(1, 2, 0)
    return lanes


def conv2d_fused_on_lanes(
    xp: Tensor,
    lanes: Tensor,
    in_channels: int,
    out_channels: int,
    geometry: tuple[int, ...],
    groups: int,
    scale: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    float_output: bool,
    pack_output: bool,
    into_residual: bool,
    name: str,
    pack_threshold: Tensor | None = None,
    rprelu: Sequence[Tensor] = (),
) -> tuple[Tensor | None, Tensor | None]:
    """Packed conv + epilogue + residual (+ RPReLU, given its shift_in, slope and shift_out)
    with code path ``name`` on weights in its lane layout (:func:`lane_weights`), ``geometry``
    = (kh, kw, sh, sw, ph, pw, dh, dw): (float channels_last output or None, packed NHWC
    signs, of ``y >= pack_threshold`` per channel when given, or None)."""
    return _built(name).conv2d_packed_fused(
        xp.contiguous(), lanes, in_channels, out_channels, *geometry, groups, scale, bias, residual,
        float_output, pack_output, into_residual, pack_threshold, list(rprelu), isa_of(name), kernel_threads(),
    )  # fmt: skip


def real_binary_linear(
    x: Tensor, wp: Tensor, in_features: int, scale: Tensor | None, bias: Tensor | None, name: str
) -> Tensor:
    """Real (N, F) input times 1-bit (K, words) weights, ``* scale + bias``, with code path
    ``name`` (the weights' 16-channel masks are built once and cached)."""
    return real_binary_linear_call(wp, in_features, scale, bias, name)(x, 1)


def packed_linear_call(
    wp: Tensor,
    in_features: int,
    scale: Tensor | None,
    bias: Tensor | None,
    name: str,
    threshold: Tensor | None = None,
) -> KernelCall:
    """A binary linear layer (``PackedLinear``) as ``call(x, threads)``: the float (N, F) rows'
    signs packed (against ``threshold`` per feature when given), then
    :func:`xnor_linear_packed` on them, as the module's calls make it (the weights' lane layout
    cached; the threshold's values read at every call)."""
    ext, isa = _built(name), isa_of(name)
    lanes = lane_weights(wp, 1, name)
    args = (lanes, in_features, wp.shape[0], scale, bias, isa, threshold)

    def call(x: Tensor, threads: int) -> Any:
        return ext.linear_packed(ext.pack_signs(x, 1, isa, threads, threshold), *args[:5], False, isa, threads)

    return KernelCall("linear_packed_float", args, call)


def real_binary_linear_call(
    wp: Tensor, in_features: int, scale: Tensor | None, bias: Tensor | None, name: str
) -> KernelCall:
    """:func:`real_binary_linear` with these weights (``PackedWeightLinear``) as ``call(x,
    threads)`` (one thread: the kernel takes no thread count)."""
    ext, isa = _built(name), isa_of(name)
    masks = _cached_layout(
        wp, ("masks", in_features, name), lambda: ext.repack_real_weights(wp.contiguous(), in_features)
    )
    args = (masks, wp.shape[0], scale, bias, isa)
    return KernelCall("real_binary_linear", args, lambda x, threads: ext.real_binary_linear(x, *args))


def max_pool2d_nhwc(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    name: str,
    pack_output: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Max-pool of a channels_last float32 map with code path ``name``: (the pooled map, its
    signs packed NHWC in the same pass when ``pack_output``, else None)."""
    out, packed = _built(name).max_pool2d_nhwc(
        x, *kernel_size, *stride, *padding, isa_of(name), kernel_threads(), pack_output
    )
    return out, packed


def global_avg_pool_nhwc(x: Tensor, name: str) -> Tensor:
    """(N, C) means over the pixels of a channels_last float32 map, with code path ``name``."""
    return _built(name).global_avg_pool_nhwc(x, kernel_threads())


class KernelCall:
    """A kernel call bound once for a caller that makes it on every forward
    (``bnas.export.program``): ``call(x, threads)`` is the function it was made for, with the
    same arguments (the weights' layout made then, the bias read at every call). ``kind`` names
    the extension's entry point and ``args`` holds what the call passes after the input (the
    thread count comes last), so that the extension's ``ProgramRunner`` makes the same call
    from C++; ``take`` (0 or 1) keeps one tensor of a call that returns two (-1: all)."""

    __slots__ = ("kind", "args", "take", "_call")

    def __init__(self, kind: str, args: tuple[Any, ...], call: Callable[[Tensor, int], Any], take: int = -1):
        self.kind, self.args, self.take, self._call = kind, args, take, call

    def __call__(self, x: Tensor, threads: int) -> Any:
        return self._call(x, threads)

    def taking(self, index: int) -> KernelCall:
        """This call keeping only tensor ``index`` of the two it returns."""
        call = self._call
        return KernelCall(self.kind, self.args, lambda x, threads: call(x, threads)[index], index)


def max_pool_call(
    kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], name: str, pack_output: bool
) -> KernelCall:
    """:func:`max_pool2d_nhwc` as ``call(x, threads)``: (the pooled map, its packed signs) with
    ``pack_output``, else the pooled map alone."""
    ext, isa = _built(name), isa_of(name)
    geometry = (*kernel_size, *stride, *padding, isa)

    def call(x: Tensor, threads: int) -> Any:
        return ext.max_pool2d_nhwc(x, *geometry, threads, pack_output)

    pooled = KernelCall("max_pool2d_nhwc", (*geometry, pack_output), call)
    return pooled if pack_output else pooled.taking(0)


def global_avg_pool_call(name: str) -> KernelCall:
    """:func:`global_avg_pool_nhwc` as ``call(x, threads)``."""
    return KernelCall("global_avg_pool_nhwc", (), _built(name).global_avg_pool_nhwc)


def pointwise_conv2d_nhwc(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pool: int,
    ceil_mode: bool,
    stride: int,
    name: str,
    precision: str = "float32",
) -> Tensor:
    """1x1 conv (``weight`` (K, C, 1, 1)) of a channels_last float32 map, on its 2x2/2 average
    pool (``ceil_mode`` as in ``avg_pool2d``, no padding) when ``pool`` is 2, ``+ bias``;
    AVX-512 only (``name`` ``cpu-avx512``), in ``precision`` "float32" or "int8" (VNNI; the
    rules of ``bnas.kernels.int8``, the pooled map quantized as an image). The weights' layout
    is built once and cached."""
    return pointwise_conv_call(weight, bias, pool, ceil_mode, stride, name, precision)(x, kernel_threads())


def pointwise_conv_call(
    weight: Tensor,
    bias: Tensor | None,
    pool: int,
    ceil_mode: bool,
    stride: int,
    name: str,
    precision: str = "float32",
) -> KernelCall:
    """:func:`pointwise_conv2d_nhwc` with these weights as ``call(x, threads)``, on ``x`` made
    channels_last first (no copy when it is; a slice of a padded map, as a factorized reduce
    takes, is not)."""
    if name != "cpu-avx512":
        raise ValueError(f"pointwise_conv2d_nhwc runs on cpu-avx512 only, not {name}")
    out_channels = weight.shape[0]
    if precision == "int8":
        lanes, w_scale, w_sum = _cached_layout(weight, ("int8",), lambda: _int8_layout(weight))
        int8_conv = _built(name).int8_pointwise_conv_nhwc
        int8_args = (lanes, w_scale, w_sum, out_channels, bias, pool, ceil_mode, stride)
        return KernelCall(
            "int8_pointwise_conv_nhwc",
            int8_args,
            lambda x, threads: int8_conv(x.contiguous(memory_format=torch.channels_last), *int8_args, threads),
        )
    transposed = _cached_layout(weight, ("pointwise",), lambda: _pointwise_layout(weight))
    conv = _built(name).pointwise_conv_nhwc
    args = (transposed, out_channels, bias, pool, ceil_mode, stride)
    return KernelCall(
        "pointwise_conv_nhwc",
        args,
        lambda x, threads: conv(x.contiguous(memory_format=torch.channels_last), *args, threads),
    )


# Up to this many input rows a float linear layer runs on the row kernel (weight rows split
# among threads, each read once); from 4 rows the 1x1-conv kernel, which reuses each weight
# vector for 6 inputs, is faster (a 512 -> 1000 layer, 1 thread: 0.097 ms at 5 rows against
# 0.114 ms at 4 on the row kernel).
LINEAR_ROWS_MAX_BATCH = 3


def float_linear(x: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> Tensor:
    """``x (N, C) @ weight (K, C).T + bias`` in float32 on the AVX-512 kernels (``name``
    ``cpu-avx512``): up to ``LINEAR_ROWS_MAX_BATCH`` rows with the weight rows split among the
    kernels' threads, more as a 1x1 conv of an (N, C, 1, 1) map (its transposed weights built
    once and cached)."""
    if name != "cpu-avx512":
        raise ValueError(f"float_linear runs on cpu-avx512 only, not {name}")
    ext = _built(name)
    x = x.contiguous()
    n, (k, c) = x.shape[0], weight.shape
    if n <= LINEAR_ROWS_MAX_BATCH:
        return linear_rows_call(weight, bias, name)(x, kernel_threads())
    transposed = _cached_layout(weight, ("pointwise",), lambda: _pointwise_layout(weight))
    out = ext.pointwise_conv_nhwc(x.view(n, c, 1, 1), transposed, k, bias, 1, False, 1, kernel_threads())
    return out.view(n, k)  # an (N, K, 1, 1) channels_last map is (N, K) in memory


def int8_linear_call(weight: Tensor, bias: Tensor | None, name: str) -> KernelCall:
    """``x (N, C) @ weight (K, C).T + bias`` in 8-bit integers as ``call(x, threads)``: the int8
    1x1 conv of an (N, C, 1, 1) map (:func:`pointwise_conv_call`), each row quantized as an
    image; the weights' layout is built once per weight tensor and cached."""
    if name != "cpu-avx512":
        raise ValueError(f"int8 linear runs on cpu-avx512 only, not {name}")
    out_channels, in_channels = weight.shape
    # keyed on the 2-d weight itself: a (K, C, 1, 1) view made per call would miss the cache
    lanes, w_scale, w_sum = _cached_layout(
        weight, ("int8",), lambda: _int8_layout(weight.detach().reshape(out_channels, in_channels, 1, 1))
    )
    int8_conv = _built(name).int8_pointwise_conv_nhwc
    args = (lanes, w_scale, w_sum, out_channels, bias, 1, False, 1)

    def call(x: Tensor, threads: int) -> Tensor:
        rows = x.shape[0]
        out = int8_conv(x.view(rows, in_channels, 1, 1), *args, threads)
        return out.view(rows, out_channels)  # an (N, K, 1, 1) channels_last map is (N, K) in memory

    return KernelCall("int8_linear", args, call)


def linear_rows_call(weight: Tensor, bias: Tensor | None, name: str) -> KernelCall:
    """:func:`float_linear` for up to ``LINEAR_ROWS_MAX_BATCH`` contiguous rows, with these
    weights, as ``call(x, threads)``."""
    if name != "cpu-avx512":
        raise ValueError(f"float_linear runs on cpu-avx512 only, not {name}")
    rows, args = _built(name).linear_rows, (weight, bias)
    return KernelCall("linear_rows", args, lambda x, threads: rows(x, *args, threads))


def _pointwise_layout(weight: Tensor) -> Tensor:
    """(K, C, 1, 1) or (K, C) -> (C, K rounded up to 16), zero columns past K: the kernel's weight rows."""
    out_channels, in_channels = weight.shape[:2]
    padded = torch.zeros(in_channels, (out_channels + 15) // 16 * 16, dtype=torch.float32)
    padded[:, :out_channels] = weight.detach().reshape(out_channels, in_channels).t()
    return padded


def int8_supported() -> bool:
    """Whether this CPU runs the int8 image conv (AVX-512 VNNI); False without the extension."""
    global _int8_supported
    if _int8_supported is None:
        ext = extension()
        _int8_supported = ext is not None and bool(ext.int8_supported())
    return _int8_supported


def amx_int8_supported() -> bool:
    """Whether this CPU and kernel run Intel AMX-INT8 tiles (False without the extension). The
    int8 convs (the image conv, the 1x1 shortcuts) then use them: the same exact int32 sums as
    the VNNI kernels, so the same results bit for bit, from a faster matrix unit."""
    ext = extension()
    return ext is not None and bool(ext.amx_int8_supported())


def amx_int8_enabled() -> bool:
    """Whether the int8 convs use AMX tiles now: :func:`amx_int8_supported` and the process's
    setting (:func:`amx_int8`, ``BNAS_AMX``) allows them."""
    ext = extension()
    return ext is not None and bool(ext.amx_int8_enabled())


@contextlib.contextmanager
def amx_int8(enabled: bool) -> Iterator[None]:
    """Within the block, let the int8 convs use AMX tiles (where :func:`amx_int8_supported`) or
    keep them on the VNNI kernels; the setting is the process's (``BNAS_AMX=0`` in the
    environment starts it off). The benchmarks time both in one process with it."""
    ext = _built("cpu-avx512")
    previous = ext.set_amx_int8_enabled(enabled)
    try:
        yield
    finally:
        ext.set_amx_int8_enabled(previous)


def image_conv2d_nhwc(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    precision: str,
    pool: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None,
    pack_output: bool = False,
    grid: PixelGrid | None = None,
) -> tuple[Tensor, Tensor | None]:
    """A conv of a float32 image (NCHW or channels_last) by (K, C, kh, kw) float weights on the
    AVX-512 kernels (``csrc/stem_conv.h``), in ``precision`` "float32" or "int8" (VNNI; the
    rules of ``bnas.kernels.int8``, with ``grid`` the images' pixel grid), and with ``pool``
    (kernel, stride, padding) the max-pool of its output in the same pass: (the output,
    channels_last; with ``pack_output`` its signs packed NHWC, else None). The weights' layout
    is made once per tensor and version."""
    return image_conv_call(weight, bias, stride, padding, precision, pool, pack_output, grid)(x, kernel_threads())


def image_conv_call(
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    precision: str,
    pool: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None,
    pack_output: bool = False,
    grid: PixelGrid | None = None,
) -> KernelCall:
    """:func:`image_conv2d_nhwc` with these weights as ``call(x, threads)``; with ``grid`` its
    bias is :func:`bnas.kernels.int8.grid_bias` (from the cached weight layout), made here, so
    the call reads the bias as it is now (a program remakes its calls when the bias changes)."""
    out_channels, _, kh, kw = weight.shape
    if grid is not None and precision != "int8":
        raise ValueError(f"a pixel grid is for the int8 image conv, not {precision!r}")
    if precision == "int8":
        lanes, w_scale, w_sum = _cached_layout(weight, ("int8",), lambda: _int8_layout(weight))
        layout: tuple[Tensor | None, ...] = (lanes, w_scale, w_sum)
    else:
        layout = (_cached_layout(weight, ("image",), lambda: _float_image_layout(weight)), None, None)
    (pool_kernel, pool_stride, pool_padding) = pool if pool is not None else ((0, 0), (0, 0), (0, 0))
    geometry = (out_channels, kh, kw, *stride, *padding, *pool_kernel, *pool_stride, *pool_padding, pack_output)
    quantization = (0.0, 0)  # each image by its own range
    if grid is not None:
        w_scale, w_sum = cast(Tensor, layout[1]), cast(Tensor, layout[2])
        term = _cached_layout(weight, ("int8-grid", grid), lambda: grid_term(w_scale, w_sum, grid))
        bias = add_grid_term(bias, term)
        quantization = (grid[0], grid_zero_point(grid))
    conv = _built("cpu-avx512").image_conv_nhwc
    args = (*layout, bias, *geometry, *quantization)
    return KernelCall("image_conv_nhwc", args, lambda x, threads: conv(x, *args, threads))


def _window_rows(weight: Tensor, row_values: int) -> Tensor:
    """(K, C, kh, kw) -> (kh, row_values, K rounded up to 16) in the weights' dtype: per window
    row, the weights of each of its kw * C values in an NHWC row (tap kx, channel c at kx * C
    + c), zero past kw * C and past K."""
    k, c, kh, kw = weight.shape
    rows = torch.zeros(kh, row_values, (k + 15) // 16 * 16, dtype=weight.dtype)
    rows[:, : kw * c, :k] = weight.permute(2, 3, 1, 0).reshape(kh, kw * c, k)
    return rows


def _float_image_layout(weight: Tensor) -> Tensor:
    """(K, C, kh, kw) -> the float32 kernel's (kh, kw * C, Kp) weights."""
    _, c, _, kw = weight.shape
    return _window_rows(weight.detach().float(), kw * c)


def _int8_layout(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(K, C, kh, kw) float -> (the int8 kernel's (kh, quads, Kp, 4) weights, float32 scales,
    int32 sums): each window row padded to whole 32-bit words, each word's 4 weights per output
    channel."""
    wq, w_scale = quantize_weights(weight)
    _, c, kh, kw = wq.shape
    quads = (kw * c + 3) // 4
    rows = _window_rows(wq, quads * 4)
    lanes = rows.reshape(kh, quads, 4, rows.shape[2]).permute(0, 1, 3, 2).contiguous()
    return lanes, w_scale.contiguous(), wq.sum(dim=(1, 2, 3), dtype=torch.int32)
