"""One core's arithmetic peaks: what no stem kernel can beat on this CPU. Prints JSON lines.

Two register-only loops (no memory traffic), each with 12 independent accumulators so that
throughput, not latency, bounds them: AVX-512 float32 FMA (16 multiply-adds per instruction)
and AVX-512 VNNI ``vpdpbusd`` (64 8-bit multiply-adds per instruction). They are compiled with
the system C compiler and called through ctypes, timed interleaved, medians and p90 reported.

From the peaks, the shortest possible time of the stem of ``bireal_resnet18_imagenet`` (a
7x7/2 conv of 3 channels to 64 at 224x224: 118 M MACs) at each precision: the floor under
the packed network's float share at 224x224 (README, Packed export).

    python benchmarks/cpu_peak.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, load_average, machine, median_p90  # noqa: E402

from bnas.kernels import cpu_backend  # noqa: E402

ACCUMULATORS = 12
STEM_MACS = 3 * 7 * 7 * 64 * 112 * 112  # bireal_resnet18_imagenet's 7x7/2 stem conv

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#define ACC @ACC@
int64_t vnni_loop(int64_t iters) {
  __m512i acc[ACC];
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int64_t n = 0; n < iters; n++) {
    _Pragma("GCC unroll @ACC@") for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  /* keeps the loop from being folded away */
  }
  __m512i s = acc[0];
  for (int i = 1; i < ACC; i++) s = _mm512_add_epi32(s, acc[i]);
  return _mm512_reduce_add_epi32(s);
}
double fma_loop(int64_t iters) {
  __m512 acc[ACC];
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  for (int64_t n = 0; n < iters; n++) {
    _Pragma("GCC unroll @ACC@") for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = acc[0];
  for (int i = 1; i < ACC; i++) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}
"""


def build(folder: Path) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    source, library = folder / "peak.c", folder / "peak.so"
    source.write_text(SOURCE.replace("@ACC@", str(ACCUMULATORS)))
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-shared", "-fPIC"]
    subprocess.run([compiler, *flags, str(source), "-o", str(library)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(library))
    lib.vnni_loop.restype, lib.vnni_loop.argtypes = ctypes.c_int64, [ctypes.c_int64]
    lib.fma_loop.restype, lib.fma_loop.argtypes = ctypes.c_double, [ctypes.c_int64]
    return lib


def measure_peaks(repeats: int = 15, iterations: int = 2_000_000) -> dict[str, dict[str, float]]:
    """One core's float32 FMA and int8 VNNI rates, in GMAC/s: ``{loop: {"gmacs": at the median
    time, "gmacs_at_p90_time": at the p90 time, "macs_per_instruction": 16 or 64}}``. The
    caller runs on a CPU with VNNI."""
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        # loop name -> (function, multiply-adds per instruction)
        loops = {"float32_fma": (lib.fma_loop, 16), "int8_vnni": (lib.vnni_loop, 64)}
        for fn, _ in loops.values():  # warm-up: clocks and caches
            fn(iterations // 10)
        for _ in range(repeats):
            for name, (fn, _) in loops.items():
                t0 = time.perf_counter()
                fn(iterations)
                times.setdefault(name, []).append(time.perf_counter() - t0)
    peaks: dict[str, dict[str, float]] = {}
    for name, (_, macs_per_instruction) in loops.items():
        median, p90 = median_p90(times[name])
        macs = iterations * ACCUMULATORS * macs_per_instruction
        # the p90 time is the slow tail, so its rate is the low one
        peaks[name] = {
            "gmacs": round(macs / median / 1e9, 1),
            "gmacs_at_p90_time": round(macs / p90 / 1e9, 1),
            "macs_per_instruction": macs_per_instruction,
        }
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=2_000_000, help="loop trips per timed call")
    args = parser.parse_args(argv)
    if not cpu_backend.int8_supported():  # AVX-512 with VNNI, as the int8 stem kernel needs
        emit({"benchmark": "cpu_peak", "skipped": "this CPU lacks AVX-512 F or VNNI"})
        return 0
    load_before = load_average()
    peaks = measure_peaks(args.repeats, args.iterations)
    record: dict[str, object] = {"benchmark": "cpu_peak", "threads": 1}
    for name, peak in peaks.items():
        record[name] = peak
        record[f"stem_floor_ms_{name.split('_')[0]}"] = round(STEM_MACS / (peak["gmacs"] * 1e9) * 1e3, 3)
    # 4 when both instructions issue at the same rate (64 multiply-adds to 16); timing noise
    # moves it either way, so it is reported, not asserted
    record["int8_over_float32"] = round(peaks["int8_vnni"]["gmacs"] / peaks["float32_fma"]["gmacs"], 2)
    record.update({"stem_macs": STEM_MACS, "load_average_1min": [load_before, load_average()], "machine": machine()})
    emit(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
