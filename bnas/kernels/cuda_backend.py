"""CUDA backend of the XNOR kernels: implicit-GEMM convolution on 1-bit tensor cores.

The kernel (bnas/kernels/cuda/) runs ``mma.sync.m16n8k256 .b1 .and.popc`` on sm_80 and newer
GPUs.  It is built on first use with ``torch.utils.cpp_extension`` for the GPU present and
cached.  The dispatcher in :mod:`bnas.kernels` imports this module lazily, for CUDA tensors
only, and calls:

* :func:`is_supported` -- whether CUDA tensors on ``device`` can take this backend;
* :func:`pack_signs`, :func:`pack_weights`, :func:`xnor_conv2d_packed`,
  :func:`xnor_linear_packed`, :func:`xnor_conv2d`, :func:`xnor_linear` -- the same
  signatures as the CPU entry points (packed format: see bnas/kernels/__init__.py).

Without a GPU, the kernel's own code runs on the CPU in the host warp emulator
(:mod:`bnas.kernels.emulator`, tests only); both share the argument checks of
:mod:`bnas.kernels.conv_plan`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from .conv_plan import (
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

BACKEND_NAME = "cuda-tensor-core"
MIN_CAPABILITY = (8, 0)  # mma.sync .b1 .and.popc and cp.async

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"  # rebuilt by ninja when a source changes


# ------------------------------------------------------------------------------------------
# The CUDA extension
_build_lock = threading.Lock()
_extension: Any = None
_build_error: str | None = None


def _nvcc() -> str | None:
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
        proc = subprocess.run(
            [nvcc, "--dryrun", "-c", str(probe)], capture_output=True, text=True, cwd=tmp, check=False
        )
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            return [str(top / "include")], [f"-L{top / 'lib64'}"]
    return [], []


def _visible_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every CUDA device visible to torch, in device order."""
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def build_architectures(capabilities: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The distinct capabilities of ``capabilities`` that can run the kernel (8.0 and newer),
    sorted: one extension holds machine code for each, so every such GPU of the machine runs it."""
    return sorted({(int(major), int(minor)) for major, minor in capabilities if (major, minor) >= MIN_CAPABILITY})


def gencode_flags(capabilities: Iterable[tuple[int, int]]) -> list[str]:
    """One ``-gencode=arch=compute_XY,code=sm_XY`` per distinct architecture (no PTX: the
    extension is built for exactly the GPUs present, each gets its own cubin)."""
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in sorted(set(capabilities))]


def extension_name(capabilities: Iterable[tuple[int, int]]) -> str:
    """Name of the extension built for ``capabilities``: it encodes the architecture set, so
    builds for different sets do not overwrite each other in torch's extension cache."""
    archs = sorted(set(capabilities))
    if not archs:
        raise ValueError("no GPU architecture to build the XNOR CUDA kernel for")
    return "bnas_xnor_cuda_sm" + "_".join(f"{a}{b}" for a, b in archs)


def is_supported(device: str | torch.device | None = None) -> bool:
    """True when tensors on ``device`` can run the tensor-core kernel: a CUDA device of compute
    capability 8.0 or newer, a CUDA compiler to build the kernel, and no earlier failed build."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    if _build_error is not None or (_extension is None and _nvcc() is None):
        return False
    return torch.cuda.get_device_capability(dev) >= MIN_CAPABILITY


def build_extension(
    capabilities: tuple[int, int] | Sequence[tuple[int, int]],
    verbose: bool = False,
    extra_cuda_cflags: Sequence[str] = (),
) -> Any:
    """Compiles and loads the extension for the given GPU architectures (one capability such as
    (9, 0), or a list of them: one cubin each) with torch.utils.cpp_extension (cached in its
    build directory under a name that encodes the architectures; rebuilt when a source
    changes).  Needs nvcc, not a GPU.  ``extra_cuda_cflags`` go to nvcc after the defaults
    (the tests add ``-Werror all-warnings``)."""
    from torch.utils.cpp_extension import load

    if len(capabilities) == 2 and all(isinstance(v, int) for v in capabilities):
        archs = [cast(tuple[int, int], tuple(capabilities))]
    else:
        archs = sorted({(int(c[0]), int(c[1])) for c in cast(Sequence[tuple[int, int]], capabilities)})
    includes, ldflags = _toolkit_paths()
    return load(
        name=extension_name(archs),
        sources=[str(SOURCE_DIR / "binding.cpp"), str(SOURCE_DIR / "xnor_conv.cu"), str(SOURCE_DIR / "mma_peak.cu")],
        extra_include_paths=[str(SOURCE_DIR), *includes],
        extra_cflags=["-O3"],  # torch sets the C++ standard its headers need
        # an explicit -gencode keeps torch from adding its own arch list (TORCH_CUDA_ARCH_LIST)
        extra_cuda_cflags=["-O3", "-std=c++17", *gencode_flags(archs), *extra_cuda_cflags],
        extra_ldflags=ldflags,
        verbose=verbose,
    )


def load_extension(device: str | torch.device | None = None) -> Any:
    """Builds (first call, cached) and returns the CUDA extension.  One build covers every
    visible GPU of compute capability 8.0 or newer (one cubin per distinct architecture), so
    each of them can run it; ``device`` itself must be such a GPU.  Raises RuntimeError saying
    what is missing; after a failed build every later call raises the same error at once."""
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
            _build_error = (
                "no CUDA compiler (nvcc) found: set CUDA_HOME or put nvcc on PATH to build the XNOR CUDA kernel"
            )
            raise RuntimeError(_build_error)
        archs = build_architectures([*_visible_capabilities(), capability])
        try:
            _extension = build_extension(archs)
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
    x4 = as_nchw(x, "x")
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
    del groups  # the weights of a grouped conv already hold C/groups input channels
    return pack_signs(w, 1)


def _gpu_runner(tap_sums: torch.Tensor) -> ConvRunner:
    def run(
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor | None,
        out_packed: torch.Tensor | None,
        plan: ConvPlan,
    ) -> None:
        load_extension(x.device).conv(x, w, scale, bias, out, out_packed, list(plan.dims), tap_sums)

    return run


def tap_sums(w_packed: torch.Tensor, in_channels: int, kernel_size: IntPair, groups: int = 1) -> torch.Tensor:
    """The per (filter, tap) sums of the +-1 weights, int32 (K, KH*KW), that the conv kernel's
    epilogue needs.  ``xnor_conv2d_packed`` computes them once per packed weight tensor (kept
    while the tensor lives and is not modified in place) unless they are passed as ``tap_sums=``."""
    _check_cuda(w_packed, "w_packed")
    dims = tap_sum_dims(w_packed, in_channels, kernel_size, groups)
    out = torch.empty((int(w_packed.shape[0]), dims[6] * dims[7]), dtype=torch.int32, device=w_packed.device)
    load_extension(w_packed.device).tap_sums(w_packed.contiguous(), out, list(dims))
    return out


def xnor_conv2d_packed(
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
    tap_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """XNOR convolution of packed operands on tensor cores.

    Returns float32 (N, K, OH, OW) holding ``conv2d(sign(x), sign(w)) * scale + bias`` (scale
    and bias optional, per output channel), or with ``pack_output=True`` the signs of that
    result packed for the next binary layer, int32 (N, OH, OW, out_groups*ceil(K/out_groups/32)).
    ``tap_sums``: :func:`tap_sums` of ``w_packed``, to skip recomputing them.
    """
    _check_cuda(x_packed, "x_packed")
    _check_cuda(w_packed, "w_packed")
    plan = plan_conv(x_packed, w_packed, in_channels, kernel_size, stride, padding, dilation, groups, out_groups)
    if tap_sums is not None:
        _check_cuda(tap_sums, "tap_sums")
        check_tap_sums(tap_sums, plan)
        tap_sums = tap_sums.contiguous()
    else:
        tap_sums = _cached_tap_sums(w_packed, plan)
    return run_conv(_gpu_runner(tap_sums), x_packed, w_packed, plan, scale, bias, pack_output)


# Tap sums per packed weight tensor: a packed layer's weights stay the same tensor from call to
# call, so the sums are computed once.  They are kept here, not on the tensor (torch.save would
# write them into a saved model), keyed by the tensor's id and dropped when it is freed; they
# are recomputed when the tensor is modified in place (its version counter) or read as another
# conv.
_tap_sum_cache: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}


def _cached_tap_sums(w_packed: torch.Tensor, plan: ConvPlan) -> torch.Tensor:
    c, groups, kh, kw = plan.dims[3], plan.dims[4], plan.dims[6], plan.dims[7]
    key = (w_packed.data_ptr(), w_packed._version, c, groups, kh, kw)
    hit = _tap_sum_cache.get(id(w_packed))
    if hit is not None and hit[0] == key:
        return hit[1]
    sums = tap_sums(w_packed, c, (kh, kw), groups)
    if id(w_packed) not in _tap_sum_cache:
        weakref.finalize(w_packed, _tap_sum_cache.pop, id(w_packed), None)
    _tap_sum_cache[id(w_packed)] = (key, sums)
    return sums


def xnor_linear_packed(
    x_packed: torch.Tensor,
    w_packed: torch.Tensor,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    pack_output: bool = False,
) -> torch.Tensor:
    """``linear(sign(x), sign(w)) * scale + bias`` from packed (N, ceil(F/32)) and (K, ceil(F/32))
    operands (a 1x1 convolution on a 1x1 map); float32 (N, K) or packed (N, ceil(K/32))."""
    x4, w4 = linear_as_conv(x_packed, w_packed, in_features)
    out = xnor_conv2d_packed(x4, w4, in_features, 1, scale=scale, bias=bias, pack_output=pack_output)
    return out.reshape(out.shape[0], -1)


def xnor_conv2d(
    x: torch.Tensor, w: torch.Tensor, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1
) -> torch.Tensor:
    """Exactly ``conv2d(sign(x), sign(w), None, stride, padding, dilation, groups)`` (float32)."""
    return xnor_conv2d_packed(
        pack_signs(x, groups),
        pack_weights(w, groups),
        int(x.shape[1]),
        (int(w.shape[2]), int(w.shape[3])),
        stride,
        padding,
        dilation,
        groups,
    )


def xnor_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exactly ``linear(sign(x), sign(w))`` (float32)."""
    return xnor_linear_packed(pack_signs(x), pack_weights(w), int(x.shape[1]))


def mma_peak(blocks: int, threads: int, iters: int, out: torch.Tensor) -> None:
    """Launches the register-only 1-bit mma throughput kernel (see benchmarks/cuda_xnor_conv.py)."""
    _check_cuda(out, "out")
    load_extension(out.device).mma_peak(out, blocks, threads, iters)


MMA_PEAK_ILP = 8  # independent mma chains per warp in the peak kernel (kMmaPeakIlp)
MMA_OPS = 2 * 16 * 8 * 256  # binary ops (multiply + add) of one m16n8k256 instruction
