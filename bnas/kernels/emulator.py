"""The host warp emulator of the CUDA XNOR kernel (tests only; never a fast path).

Everything in the CUDA kernel except the ``mma`` instruction is host/device C++, so
``cuda/emulator.cpp`` runs the same kernel bodies on the CPU (one fiber per CUDA thread) with
an exact software model of ``mma.m16n8k256 .b1 .and.popc``. It is compiled with the system
C++ compiler (``CXX`` or g++), cached by source hash in ``bnas.paths.cache_dir("kernels")``
(``$BNAS_CACHE/kernels``, else ``~/.cache/bnas/kernels``), and loaded with ctypes.

The ``emulated_*`` functions take the same arguments as the GPU entry points of
:mod:`bnas.kernels.cuda_backend` and share its argument checks (:mod:`bnas.kernels.conv_plan`),
so a wrong shape or stride rule shows up here too. Slow: small tensors only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import paths
from ..atomic import atomic_path
from .conv_plan import (
    CONV_DIMS,
    ConvPlan,
    ConvRunner,
    IntPair,
    as_nchw,
    check_tap_sums,
    linear_as_conv,
    plan_conv,
    run_conv,
    tap_sum_dims,
)
from .packing import words_for

__all__ = [
    "emulated_mma",
    "emulated_pack_signs",
    "emulated_pack_weights",
    "emulated_tap_sums",
    "launcher_splits",
    "launcher_tile",
    "emulated_xnor_conv2d_packed",
    "emulated_xnor_linear_packed",
    "load_emulator",
]

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
# sources hashed into the emulator cache name
_EMULATOR_SOURCES = ("common.cuh", "mma_b1.cuh", "xnor_conv.cuh", "tiles.h", "emulator.cpp")

_emu_lock = threading.Lock()
_emulator: ctypes.CDLL | None = None


def load_emulator() -> ctypes.CDLL:
    """Compiles (once, cached by source hash) and loads the host warp emulator.  Needs a C++17
    compiler (``CXX`` or g++); raises RuntimeError when there is none or the build fails."""
    global _emulator
    if _emulator is not None:
        return _emulator
    with _emu_lock:
        if _emulator is not None:
            return _emulator
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++) to build the CUDA kernel emulator")
        flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off"]
        digest = hashlib.sha256()
        for name in _EMULATOR_SOURCES:
            digest.update((SOURCE_DIR / name).read_bytes())
        digest.update(" ".join([cxx, *flags]).encode())
        cache = paths.cache_dir("kernels")
        cache.mkdir(parents=True, exist_ok=True)
        lib = cache / f"bnas_xnor_emulator_{digest.hexdigest()[:16]}.so"
        if not lib.exists():
            # a temp file with the umask's mode (not mkstemp's 0600): a shared cache stays usable
            with atomic_path(lib, "compiled kernel emulator") as tmp:
                proc = subprocess.run(
                    [cxx, *flags, "-I", str(SOURCE_DIR), "-o", str(tmp), str(SOURCE_DIR / "emulator.cpp")],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"building the CUDA kernel emulator failed:\n{proc.stderr[-4000:]}")
        _emulator = _bind_emulator(ctypes.CDLL(str(lib)))
        return _emulator


def _bind_emulator(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, cp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p
    lib.bnas_emu_mma.argtypes = [p, p, p, p]
    lib.bnas_emu_mma.restype = i32
    lib.bnas_emu_conv_dims_count.argtypes = []
    lib.bnas_emu_conv_dims_count.restype = i32
    lib.bnas_emu_conv_shape.argtypes = [p, p, cp, i32]
    lib.bnas_emu_conv_shape.restype = i32
    lib.bnas_emu_conv.argtypes = [p, i64, p, i64, p, p, p, p, p, p, i32, i32, i32, i32, cp, i32]
    lib.bnas_emu_conv.restype = i32
    lib.bnas_emu_tap_sums.argtypes = [p, i64, p, p, i64, cp, i32]
    lib.bnas_emu_tap_sums.restype = i32
    lib.bnas_emu_conv_splits.argtypes = [p, i32]
    lib.bnas_emu_conv_splits.restype = i32
    lib.bnas_emu_conv_large_tile.argtypes = [p, i32]
    lib.bnas_emu_conv_large_tile.restype = i32
    lib.bnas_emu_pack.argtypes = [p, i64, p, p, i32, i32, p, i64, cp, i32]
    lib.bnas_emu_pack.restype = i32
    lib.bnas_emu_fragment_bank_ways.argtypes = [i32]
    lib.bnas_emu_fragment_bank_ways.restype = i32
    if lib.bnas_emu_conv_dims_count() != len(CONV_DIMS):
        raise RuntimeError("emulator and conv_plan.CONV_DIMS disagree on the conv parameter list")
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _i64_array(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _emu_check(rc: int, err: ctypes.Array) -> None:
    if rc != 0:
        raise RuntimeError(f"CUDA kernel emulator: {err.value.decode(errors='replace')}")


def emulated_mma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One warp-wide ``mma.m16n8k256 .b1 .and.popc`` through the software model.  a: int32
    (32, 4) A-fragment registers per lane, b: (32, 2), c: (32, 4); returns D as (32, 4)."""
    lib = load_emulator()
    a_, b_, c_ = (t.to(torch.int32).contiguous() for t in (a, b, c))
    if a_.shape != (32, 4) or b_.shape != (32, 2) or c_.shape != (32, 4):
        raise ValueError("fragments: a (32, 4), b (32, 2), c (32, 4)")
    d = torch.empty((32, 4), dtype=torch.int32)
    lib.bnas_emu_mma(a_.data_ptr(), b_.data_ptr(), c_.data_ptr(), d.data_ptr())
    return d


_PACK_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def emulated_pack_signs(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The fused pack kernel run by the emulator (CPU tensors, any strides).  float16 and
    bfloat16 are read as they are, like the GPU kernel reads them; other dtypes as float32."""
    lib = load_emulator()
    x4 = as_nchw(x.detach(), "x")
    if x4.dtype not in _PACK_DTYPES:
        x4 = x4.to(torch.float32)
    n, c, h, w = (int(v) for v in x4.shape)
    if groups < 1 or c % groups:
        raise ValueError(f"channels ({c}) must be divisible by groups ({groups})")
    out = torch.empty((n, h, w, groups * words_for(c // groups)), dtype=torch.int32)
    # the emulator bounds-checks against the whole storage the strides may touch
    span = x4.untyped_storage().nbytes() // x4.element_size() - x4.storage_offset()
    sizes, strides = _i64_array(x4.shape), _i64_array(x4.stride())
    err = ctypes.create_string_buffer(512)
    _emu_check(
        lib.bnas_emu_pack(
            x4.data_ptr(),
            span,
            sizes.data_ptr(),
            strides.data_ptr(),
            groups,
            _PACK_DTYPES[x4.dtype],
            out.data_ptr(),
            out.numel(),
            err,
            len(err),
        ),
        err,
    )
    return out if x.dim() == 4 else out.reshape(n, -1)


def emulated_pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    del groups
    return emulated_pack_signs(w, 1)


def emulated_tap_sums(w_packed: torch.Tensor, in_channels: int, kernel_size: IntPair, groups: int = 1) -> torch.Tensor:
    """``cuda_backend.tap_sums`` run by the emulator: int32 (K, KH*KW)."""
    lib = load_emulator()
    dims = _i64_array(tap_sum_dims(w_packed, in_channels, kernel_size, groups))
    out = torch.empty((int(w_packed.shape[0]), int(dims[6]) * int(dims[7])), dtype=torch.int32)
    w = w_packed.contiguous()
    err = ctypes.create_string_buffer(512)
    _emu_check(
        lib.bnas_emu_tap_sums(w.data_ptr(), w.numel(), dims.data_ptr(), out.data_ptr(), out.numel(), err, len(err)), err
    )
    return out


def launcher_splits(plan: ConvPlan, sm_count: int) -> int:
    """The split-K depth slices the GPU launcher picks for ``plan`` on ``sm_count`` SMs (1 = none)."""
    dims = _i64_array(plan.dims)  # kept alive across the call
    return int(load_emulator().bnas_emu_conv_splits(dims.data_ptr(), sm_count))


def launcher_tile(plan: ConvPlan, sm_count: int) -> str:
    """The tile the GPU launcher picks for ``plan`` on ``sm_count`` SMs: ``"large"`` (128x128)
    or ``"small"`` (64x64)."""
    dims = _i64_array(plan.dims)  # kept alive across the call
    return "large" if load_emulator().bnas_emu_conv_large_tile(dims.data_ptr(), sm_count) == 1 else "small"


def _emu_runner(
    tile: str | None, vw: int, sm_count: int, tap_sums: torch.Tensor | None = None, splits: int = 0
) -> ConvRunner:
    tile_code = {None: -1, "small": 0, "large": 1}[tile]

    def run(
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor | None,
        out_packed: torch.Tensor | None,
        plan: ConvPlan,
    ) -> None:
        lib = load_emulator()
        dims = _i64_array(plan.dims)
        err = ctypes.create_string_buffer(512)
        rc = lib.bnas_emu_conv(
            x.data_ptr(),
            x.numel(),
            w.data_ptr(),
            w.numel(),
            _ptr(tap_sums),
            _ptr(scale),
            _ptr(bias),
            _ptr(out),
            _ptr(out_packed),
            dims.data_ptr(),
            tile_code,
            vw,
            sm_count,
            splits,
            err,
            len(err),
        )
        _emu_check(rc, err)

    return run


def emulated_xnor_conv2d_packed(
    x_packed: torch.Tensor,
    w_packed: torch.Tensor,
    in_channels: int,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    pack_output: bool = False,
    out_groups: int = 1,
    *,
    tile: str | None = None,
    vw: int = 0,
    sm_count: int = 132,
    tap_sums: torch.Tensor | None = None,
    splits: int = 0,
) -> torch.Tensor:
    """``cuda_backend.xnor_conv2d_packed`` run by the emulator on CPU tensors.  ``tile`` forces the
    "small" or "large" configuration (default: the launcher's rule for ``sm_count`` SMs),
    ``vw`` the words per global->shared copy (1, 2, 4; 0 = the launcher's rule); ``tap_sums``
    as from :func:`emulated_tap_sums` (computed here when omitted); ``splits`` the split-K
    depth slices (0 = the launcher's rule when ``tile`` is None, else 1; 2..8 force split-K on
    the small tile)."""
    plan = plan_conv(x_packed, w_packed, in_channels, kernel_size, stride, padding, dilation, groups, out_groups)
    if tap_sums is not None:
        check_tap_sums(tap_sums, plan)
        tap_sums = tap_sums.contiguous()
    runner = _emu_runner(tile, vw, sm_count, tap_sums, splits)
    return run_conv(runner, x_packed, w_packed, plan, scale, bias, pack_output)


def emulated_xnor_linear_packed(
    x_packed: torch.Tensor,
    w_packed: torch.Tensor,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    pack_output: bool = False,
    *,
    tile: str | None = None,
    vw: int = 0,
) -> torch.Tensor:
    x4, w4 = linear_as_conv(x_packed, w_packed, in_features)
    out = emulated_xnor_conv2d_packed(
        x4, w4, in_features, 1, scale=scale, bias=bias, pack_output=pack_output, tile=tile, vw=vw
    )
    return out.reshape(out.shape[0], -1)
