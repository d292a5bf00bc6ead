"""CI guard for the CUDA kernel: nvcc compiles it for sm_80, sm_90 and sm_90a (no GPU needed),
so a syntax, template or inline-PTX error never lands, and the gencode flags ``load_extension``
passes put a cubin per architecture in one object.  Skipped only when nvcc is absent.

Each architecture is compiled once in this file, warnings as errors: sm_90a by plain nvcc (no
torch headers or defines), sm_80 with sm_90 in the extension as ``load_extension`` builds it on
a machine with both GPUs (torch's flags and defines). tests/test_cuda_sass.py compiles
xnor_conv.cu for sm_90a a second time, with torch's defines, to read its SASS."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bnas.kernels import cuda_backend as cb


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


NVCC = cb._nvcc() or shutil.which("nvcc")
CUOBJDUMP = _cuobjdump()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
# The flags load_extension passes on a machine with an sm_80 and an sm_90 GPU (and an sm_75 one,
# which it leaves out): one object holding a cubin for each.
MIXED_ARCHS = cb.build_architectures([(8, 0), (9, 0), (7, 5)])
MIXED_MACHINE = cb.gencode_flags(MIXED_ARCHS)


def nvcc_compile(arch_flags: list[str], source: str, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [
        NVCC,
        "-std=c++17",
        "-O3",
        *arch_flags,
        "-Werror",
        "all-warnings",
        "-c",
        str(cb.SOURCE_DIR / source),
        "-o",
        str(out_dir / (source + ".o")),
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def _cubins(obj: Path) -> set[str]:
    if CUOBJDUMP is None:
        pytest.skip("cuobjdump not found (on PATH or in triton's package): the cubins go unlisted")
    listing = subprocess.run([CUOBJDUMP, "--list-elf", str(obj)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\.sm_(\d+[a-z]?)\.cubin", listing))


@needs_nvcc
def test_nvcc_compiles_kernels_without_torch(tmp_path):
    arch_flags = ["-gencode", "arch=compute_90a,code=sm_90a"]
    for source in ("xnor_conv.cu", "mma_peak.cu"):
        proc = nvcc_compile(arch_flags, source, tmp_path)
        assert proc.returncode == 0, f"nvcc {' '.join(arch_flags)} {source} failed:\n{proc.stderr[-3000:]}"
        assert (tmp_path / (source + ".o")).stat().st_size > 0
    assert _cubins(tmp_path / "xnor_conv.cu.o") == {"90a"}


@needs_nvcc
def test_kernel_sources_need_no_torch_headers():
    # the .cu/.cuh files compile with plain nvcc; only binding.cpp includes torch
    for path in cb.SOURCE_DIR.iterdir():
        text = path.read_text()
        has_torch = "#include <torch" in text or "#include <ATen" in text or "#include <c10" in text
        assert has_torch == (path.name == "binding.cpp"), path.name


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="this torch build has no CUDA headers")
def test_torch_extension_builds_and_loads(tmp_path, monkeypatch):
    # The full extension (binding + kernels) as load_extension builds it on a machine with an
    # sm_80 and an sm_90 GPU (and an sm_75 one, which it leaves out); no GPU needed.
    assert MIXED_MACHINE == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("MAX_JOBS", "2")
    ext = cb.build_extension(MIXED_ARCHS, extra_cuda_cflags=["-Werror", "all-warnings"])
    for name in ("conv", "pack", "mma_peak", "mma_single"):
        assert callable(getattr(ext, name))
    build = tmp_path / cb.extension_name(MIXED_ARCHS)
    cuda_flags = next(
        line for line in (build / "build.ninja").read_text().splitlines() if line.startswith("cuda_cflags")
    )
    assert "-Werror all-warnings" in cuda_flags and " ".join(MIXED_MACHINE) in cuda_flags, cuda_flags
    # one object holding a cubin for each architecture
    (obj,) = build.glob("xnor_conv.cuda.o")
    assert _cubins(obj) == {"80", "90"}
