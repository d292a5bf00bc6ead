"""CUDA backend of the XNOR kernels: implicit-GEMM convolution on 1-bit tensor cores.

The kernel (bnas/kernels/cuda/) runs ``mma.sync.m16n8k256 .b1 .and.popc`` on sm_80 and newer
GPUs.  It is built on first use with ``torch.utils.cpp_extension`` for the GPU present and
cached.  The dispatcher in :mod:`bnas.kernels` imports this module lazily, for CUDA tensors
only, and calls:

* :func:`is_supported` -- whether CUDA tensors on ``device`` can take this backend;
* :func:`pack_signs`, :func:`pack_weights`, :func:`xnor_conv2d_packed`,
  :func:`xnor_linear_packed`, :func:`xnor_conv2d`, :func:`xnor_linear` -- the same
  signatures as the CPU entry points (packed format: see bnas/kernels/__init__.py).

Because a GPU is rarely at hand while bnas is developed, everything in the kernel except the
``mma`` instruction is host/device C++, and a host *warp emulator* (cuda/emulator.cpp) runs the
same kernel bodies on the CPU with an exact software model of the instruction.  The
``emulated_*`` functions below give the tests that path; they take the same arguments and
share the argument checks with the GPU path, so a wrong shape or stride rule shows up there
too.  The emulator is slow (one fiber per CUDA thread): small tensors only.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..atomic import atomic_path
from .packing import words_for

BACKEND_NAME = "cuda-tensor-core"
MIN_CAPABILITY = (8, 0)   # mma.sync .b1 .and.popc and cp.async

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
# sources hashed into the emulator cache name (the CUDA build is tracked by ninja depfiles)
_EMULATOR_SOURCES = ("common.cuh", "mma_b1.cuh", "xnor_conv.cuh", "tiles.h", "emulator.cpp")

# Order of the integers handed to the C++ side (mirrors enum ConvDim in cuda/xnor_conv.cuh).
CONV_DIMS = ("N", "H", "W", "C", "groups", "K", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "out_groups")
MAX_TAPS = 64

IntPair = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------
# Argument checks and shapes, shared by the GPU path and the emulator
def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t[0], t[1]


@dataclass(frozen=True)
class ConvPlan:
    """The integers of one packed convolution, in CONV_DIMS order, plus output sizes."""

    dims: tuple[int, ...]
    out_h: int
    out_w: int
    out_words: int   # packed-output words per pixel

    @property
    def n(self) -> int:
        return self.dims[0]

    @property
    def k(self) -> int:
        return self.dims[5]


def plan_conv(x_packed: torch.Tensor, w_packed: torch.Tensor, in_channels: int, kernel_size: IntPair,
              stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
              out_groups: int = 1) -> ConvPlan:
    """Checks packed operands against the convolution parameters; raises ValueError saying
    what does not match."""
    if x_packed.dtype != torch.int32 or w_packed.dtype != torch.int32:
        raise ValueError("packed activations and weights must be int32 tensors (use pack_signs / pack_weights)")
    if x_packed.dim() != 4 or w_packed.dim() != 4:
        raise ValueError(f"packed conv operands must be 4-D: activations (N, H, W, G*Wg), weights (K, KH, KW, Wg); "
                         f"got {tuple(x_packed.shape)} and {tuple(w_packed.shape)}")
    if groups < 1 or in_channels < 1 or in_channels % groups:
        raise ValueError(f"in_channels={in_channels} must be a positive multiple of groups={groups}")
    n, h, w, gw = (int(v) for v in x_packed.shape)
    k, kh, kw, wg = (int(v) for v in w_packed.shape)
    cg_words = words_for(in_channels // groups)
    if gw != groups * cg_words:
        raise ValueError(f"packed activations have {gw} words per pixel; {in_channels} channels in {groups} groups "
                         f"need {groups * cg_words}")
    if wg != cg_words:
        raise ValueError(f"packed weights have {wg} words per tap; {in_channels // groups} channels per group need {cg_words}")
    if _pair(kernel_size, "kernel_size") != (kh, kw):
        raise ValueError(f"packed weights hold a {kh}x{kw} kernel, kernel_size says {kernel_size}")
    if k % groups:
        raise ValueError(f"{k} filters are not divisible by groups={groups}")
    if out_groups < 1 or k % out_groups:
        raise ValueError(f"{k} filters are not divisible by out_groups={out_groups}")
    if kh * kw > MAX_TAPS:
        raise ValueError(f"kernel {kh}x{kw} has more than {MAX_TAPS} taps, which the CUDA XNOR kernel does not support")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1 and padding >= 0")
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the {kh}x{kw} kernel (dilation {dh}x{dw}) does not fit the {h}x{w} input with padding {ph}x{pw}")
    dims = (n, h, w, in_channels, groups, k, kh, kw, sh, sw, ph, pw, dh, dw, out_groups)
    return ConvPlan(dims, oh, ow, out_groups * words_for(k // out_groups))


def _epilogue_vector(v: Optional[torch.Tensor], k: int, name: str, device: torch.device) -> Optional[torch.Tensor]:
    if v is None:
        return None
    if v.numel() != k:
        raise ValueError(f"{name} must have one value per output channel ({k}), got {v.numel()}")
    return v.detach().reshape(k).to(device=device, dtype=torch.float32).contiguous()


def _linear_as_conv(x_packed: torch.Tensor, w_packed: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x_packed.dim() != 2 or w_packed.dim() != 2:
        raise ValueError(f"packed linear operands must be 2-D: activations (N, ceil(F/32)), weights (K, ceil(F/32)); "
                         f"got {tuple(x_packed.shape)} and {tuple(w_packed.shape)}")
    return x_packed.reshape(x_packed.shape[0], 1, 1, x_packed.shape[1]), w_packed.reshape(w_packed.shape[0], 1, 1, w_packed.shape[1])


def _as_nchw(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 4:
        return x
    raise ValueError(f"{what} must be 2-D (N, F) or 4-D (N, C, H, W), got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------
# The CUDA extension
_build_lock = threading.Lock()
_extension: Any = None
_build_error: Optional[str] = None


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _toolkit_paths() -> tuple[list[str], list[str]]:
    """Include and library directories of the CUDA toolkit when torch's CUDA_HOME guess lacks
    them (torch derives CUDA_HOME from the nvcc on PATH, which may be a wrapper script)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "include" / "cuda_runtime_api.h").exists():
        return [], []
    nvcc = _nvcc()
    if nvcc is None:
        return [], []
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.cu"
        probe.write_text("__global__ void probe() {}\n")
        proc = subprocess.run([nvcc, "--dryrun", "-c", str(probe)], capture_output=True, text=True, cwd=tmp)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            return [str(top / "include")], [f"-L{top / 'lib64'}"]
    return [], []


def is_supported(device: Union[str, torch.device, None] = None) -> bool:
    """True when tensors on ``device`` can run the tensor-core kernel: a CUDA device of compute
    capability 8.0 or newer, a CUDA compiler to build the kernel, and no earlier failed build."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    if _build_error is not None or (_extension is None and _nvcc() is None):
        return False
    return torch.cuda.get_device_capability(dev) >= MIN_CAPABILITY


def build_extension(capability: tuple[int, int], verbose: bool = False) -> Any:
    """Compiles and loads the extension for one GPU architecture (e.g. (9, 0)) with
    torch.utils.cpp_extension (cached in its build directory; rebuilt when a source changes).
    Needs nvcc, not a GPU."""
    from torch.utils.cpp_extension import load

    cc = f"{capability[0]}{capability[1]}"
    includes, ldflags = _toolkit_paths()
    return load(
        name=f"bnas_xnor_cuda_sm{cc}",
        sources=[str(SOURCE_DIR / "binding.cpp"), str(SOURCE_DIR / "xnor_conv.cu"), str(SOURCE_DIR / "mma_peak.cu")],
        extra_include_paths=[str(SOURCE_DIR), *includes],
        extra_cflags=["-O3"],   # torch sets the C++ standard its headers need
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{cc},code=sm_{cc}"],
        extra_ldflags=ldflags,
        verbose=verbose,
    )


def load_extension(device: Union[str, torch.device, None] = None) -> Any:
    """Builds (first call, cached) and returns the CUDA extension for the GPU of ``device``.
    Raises RuntimeError saying what is missing; after a failed build every later call raises
    the same error at once."""
    global _extension, _build_error
    if _extension is not None:
        return _extension
    with _build_lock:
        if _extension is not None:
            return _extension
        if _build_error is not None:
            raise RuntimeError(_build_error)
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: the cuda-tensor-core backend needs an sm_80+ GPU")
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        capability = torch.cuda.get_device_capability(dev)
        if capability < MIN_CAPABILITY:
            raise RuntimeError(f"GPU compute capability {capability} is below 8.0: no 1-bit mma.sync .and.popc")
        if _nvcc() is None:
            _build_error = "no CUDA compiler (nvcc) found: set CUDA_HOME or put nvcc on PATH to build the XNOR CUDA kernel"
            raise RuntimeError(_build_error)
        try:
            _extension = build_extension(capability)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            _build_error = f"building the XNOR CUDA kernel failed: {exc}"
            raise RuntimeError(_build_error) from exc
        return _extension


def _check_cuda(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the {BACKEND_NAME} backend, got {t.device}")


def pack_signs(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """sign(x) (sign(0) = +1) packed along channels: (N, C, H, W) -> int32 (N, H, W, G*Wg);
    (N, F) -> (N, ceil(F/32)).  Any strides; float32, float16 or bfloat16 are read as they are."""
    _check_cuda(x, "x")
    x4 = _as_nchw(x, "x")
    if x4.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x4 = x4.float()
    n, c, h, w = (int(v) for v in x4.shape)
    if groups < 1 or c % groups:
        raise ValueError(f"channels ({c}) must be divisible by groups ({groups})")
    out = torch.empty((n, h, w, groups * words_for(c // groups)), dtype=torch.int32, device=x.device)
    load_extension(x.device).pack(x4, out, groups)
    return out if x.dim() == 4 else out.reshape(n, -1)


def pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Conv weights (K, C/groups, KH, KW) -> int32 (K, KH, KW, Wg); linear (K, F) -> (K, ceil(F/32))."""
    _check_cuda(w, "w")
    del groups   # the weights of a grouped conv already hold C/groups input channels
    return pack_signs(w, 1)


def _conv_packed(run: Any, x_packed: torch.Tensor, w_packed: torch.Tensor, plan: ConvPlan,
                 scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], pack_output: bool) -> torch.Tensor:
    dev = x_packed.device
    scale_t = _epilogue_vector(scale, plan.k, "scale", dev)
    bias_t = _epilogue_vector(bias, plan.k, "bias", dev)
    if pack_output:
        out = torch.empty((plan.n, plan.out_h, plan.out_w, plan.out_words), dtype=torch.int32, device=dev)
        run(x_packed.contiguous(), w_packed.contiguous(), scale_t, bias_t, None, out, plan)
    else:
        out = torch.empty((plan.n, plan.k, plan.out_h, plan.out_w), dtype=torch.float32, device=dev)
        run(x_packed.contiguous(), w_packed.contiguous(), scale_t, bias_t, out, None, plan)
    return out


def _run_gpu(x, w, scale, bias, out, out_packed, plan: ConvPlan) -> None:
    load_extension(x.device).conv(x, w, scale, bias, out, out_packed, list(plan.dims))


def xnor_conv2d_packed(x_packed: torch.Tensor, w_packed: torch.Tensor, in_channels: int, kernel_size: IntPair,
                       stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                       scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                       pack_output: bool = False, out_groups: int = 1) -> torch.Tensor:
    """XNOR convolution of packed operands on tensor cores.

    Returns float32 (N, K, OH, OW) holding ``conv2d(sign(x), sign(w)) * scale + bias`` (scale
    and bias optional, per output channel), or with ``pack_output=True`` the signs of that
    result packed for the next binary layer, int32 (N, OH, OW, out_groups*ceil(K/out_groups/32)).
    """
    _check_cuda(x_packed, "x_packed")
    _check_cuda(w_packed, "w_packed")
    plan = plan_conv(x_packed, w_packed, in_channels, kernel_size, stride, padding, dilation, groups, out_groups)
    return _conv_packed(_run_gpu, x_packed, w_packed, plan, scale, bias, pack_output)


def xnor_linear_packed(x_packed: torch.Tensor, w_packed: torch.Tensor, in_features: int,
                       scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                       pack_output: bool = False) -> torch.Tensor:
    """``linear(sign(x), sign(w)) * scale + bias`` from packed (N, ceil(F/32)) and (K, ceil(F/32))
    operands (a 1x1 convolution on a 1x1 map); float32 (N, K) or packed (N, ceil(K/32))."""
    x4, w4 = _linear_as_conv(x_packed, w_packed, in_features)
    out = xnor_conv2d_packed(x4, w4, in_features, 1, scale=scale, bias=bias, pack_output=pack_output)
    return out.reshape(out.shape[0], -1)


def xnor_conv2d(x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1, padding: IntPair = 0,
                dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """Exactly ``conv2d(sign(x), sign(w), None, stride, padding, dilation, groups)`` (float32)."""
    return xnor_conv2d_packed(pack_signs(x, groups), pack_weights(w, groups), int(x.shape[1]),
                              (int(w.shape[2]), int(w.shape[3])), stride, padding, dilation, groups)


def xnor_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exactly ``linear(sign(x), sign(w))`` (float32)."""
    return xnor_linear_packed(pack_signs(x), pack_weights(w), int(x.shape[1]))


def mma_peak(blocks: int, threads: int, iters: int, out: torch.Tensor) -> None:
    """Launches the register-only 1-bit mma throughput kernel (see benchmarks/cuda_xnor_conv.py)."""
    _check_cuda(out, "out")
    load_extension(out.device).mma_peak(out, blocks, threads, iters)


MMA_PEAK_ILP = 8            # independent mma chains per warp in the peak kernel (kMmaPeakIlp)
MMA_OPS = 2 * 16 * 8 * 256  # binary ops (multiply + add) of one m16n8k256 instruction


# ------------------------------------------------------------------------------------------
# The host warp emulator (tests)
_emu_lock = threading.Lock()
_emulator: Optional[ctypes.CDLL] = None


def _cache_dir() -> Path:
    root = os.environ.get("BNAS_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bnas", "kernels")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
        lib = _cache_dir() / f"bnas_xnor_emulator_{digest.hexdigest()[:16]}.so"
        if not lib.exists():
            # a temp file with the umask's mode (not mkstemp's 0600): a shared cache stays usable
            with atomic_path(lib, "compiled kernel emulator") as tmp:
                proc = subprocess.run([cxx, *flags, "-I", str(SOURCE_DIR), "-o", str(tmp), str(SOURCE_DIR / "emulator.cpp")],
                                      capture_output=True, text=True)
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
    lib.bnas_emu_conv.argtypes = [p, i64, p, i64, p, p, p, p, p, i32, i32, i32, cp, i32]
    lib.bnas_emu_conv.restype = i32
    lib.bnas_emu_pack.argtypes = [p, i64, p, p, i32, p, i64, cp, i32]
    lib.bnas_emu_pack.restype = i32
    lib.bnas_emu_fragment_bank_ways.argtypes = [i32]
    lib.bnas_emu_fragment_bank_ways.restype = i32
    if lib.bnas_emu_conv_dims_count() != len(CONV_DIMS):
        raise RuntimeError("emulator and cuda_backend.CONV_DIMS disagree on the conv parameter list")
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
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


def emulated_pack_signs(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The fused pack kernel run by the emulator (float32 CPU tensors, any strides)."""
    lib = load_emulator()
    x4 = _as_nchw(x.detach().to(torch.float32), "x")
    n, c, h, w = (int(v) for v in x4.shape)
    if groups < 1 or c % groups:
        raise ValueError(f"channels ({c}) must be divisible by groups ({groups})")
    out = torch.empty((n, h, w, groups * words_for(c // groups)), dtype=torch.int32)
    # the emulator bounds-checks against the whole storage the strides may touch
    span = x4.untyped_storage().nbytes() // 4 - x4.storage_offset()
    sizes, strides = _i64_array(x4.shape), _i64_array(x4.stride())
    err = ctypes.create_string_buffer(512)
    _emu_check(lib.bnas_emu_pack(x4.data_ptr(), span, sizes.data_ptr(), strides.data_ptr(), groups,
                                 out.data_ptr(), out.numel(), err, len(err)), err)
    return out if x.dim() == 4 else out.reshape(n, -1)


def emulated_pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    del groups
    return emulated_pack_signs(w, 1)


def _emu_runner(tile: Optional[str], vw: int, sm_count: int):
    tile_code = {None: -1, "small": 0, "large": 1}[tile]

    def run(x, w, scale, bias, out, out_packed, plan: ConvPlan) -> None:
        lib = load_emulator()
        dims = _i64_array(plan.dims)
        err = ctypes.create_string_buffer(512)
        rc = lib.bnas_emu_conv(x.data_ptr(), x.numel(), w.data_ptr(), w.numel(), _ptr(scale), _ptr(bias),
                               _ptr(out), _ptr(out_packed), dims.data_ptr(), tile_code, vw, sm_count, err, len(err))
        _emu_check(rc, err)

    return run


def emulated_xnor_conv2d_packed(x_packed: torch.Tensor, w_packed: torch.Tensor, in_channels: int,
                                kernel_size: IntPair, stride: IntPair = 1, padding: IntPair = 0,
                                dilation: IntPair = 1, groups: int = 1,
                                scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                                pack_output: bool = False, out_groups: int = 1, *, tile: Optional[str] = None,
                                vw: int = 0, sm_count: int = 132) -> torch.Tensor:
    """:func:`xnor_conv2d_packed` run by the emulator on CPU tensors.  ``tile`` forces the
    "small" or "large" configuration (default: the launcher's rule for ``sm_count`` SMs),
    ``vw`` the words per global->shared copy (1, 2, 4; 0 = the launcher's rule)."""
    plan = plan_conv(x_packed, w_packed, in_channels, kernel_size, stride, padding, dilation, groups, out_groups)
    return _conv_packed(_emu_runner(tile, vw, sm_count), x_packed, w_packed, plan, scale, bias, pack_output)


def emulated_xnor_linear_packed(x_packed: torch.Tensor, w_packed: torch.Tensor, in_features: int,
                                scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                                pack_output: bool = False, *, tile: Optional[str] = None, vw: int = 0) -> torch.Tensor:
    x4, w4 = _linear_as_conv(x_packed, w_packed, in_features)
    out = emulated_xnor_conv2d_packed(x4, w4, in_features, 1, scale=scale, bias=bias, pack_output=pack_output,
                                      tile=tile, vw=vw)
    return out.reshape(out.shape[0], -1)

