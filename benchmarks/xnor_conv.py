"""XNOR-popcount 3x3 convolution vs float32 ``torch.nn.functional.conv2d``.

For each shape N x C x H x W -> K (3x3, padding 1) it measures, interleaved in the same run:
the float32 ``F.conv2d`` a user would otherwise run; our kernel on pre-packed input and
weights (what a chain of binary layers pays per layer); and end to end from the float input
(packing the input signs included, weights packed once as in a deployed model). Prints one
JSON line per shape with the medians and ratios, then one summary line with the median
ratios. Every shape is also checked bit-exact against the float reference.

    python benchmarks/xnor_conv.py --device cpu [--repeats 30] [--threads 1] [--backend cpu-avx2]
    python benchmarks/xnor_conv.py --device cuda   # runs benchmarks/cuda_xnor_conv.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402

import bnas.kernels as kernels  # noqa: E402
from bnas.binarize import sign  # noqa: E402

# (N, C, H, W, K): 3x3 convolutions, stride 1, padding 1.
SHAPES = [
    (1, 64, 32, 32, 64),
    (1, 128, 16, 16, 128),
    (1, 256, 8, 8, 256),
    (1, 256, 14, 14, 256),
    (1, 512, 7, 7, 512),
    (16, 128, 16, 16, 128),
    (16, 256, 8, 8, 256),
]
TARGET_RATIO = 10.0


def cpu_engines(x: torch.Tensor, weight: torch.Tensor, xp: torch.Tensor, wp: torch.Tensor) -> dict:
    """The timed calls for one shape: float32 conv, packed conv, and packing included."""
    c = x.shape[1]
    return {
        "float32": lambda: F.conv2d(x, weight, None, 1, 1),
        "packed": lambda: kernels.xnor_conv2d_packed(xp, wp, c, 3, 1, 1),
        "end_to_end": lambda: kernels.xnor_conv2d_packed(kernels.pack_signs(x), wp, c, 3, 1, 1),
    }


def run_cpu(shapes: list[tuple[int, int, int, int, int]], repeats: int, warmup: int) -> None:
    info = machine()
    info["load_average_1min_at_start"] = load_average()
    name = kernels.backend("cpu")
    packed_ratios, e2e_ratios = [], []
    for n, c, h, w, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, w)
        weight = torch.randn(k, c, 3, 3)
        xp = kernels.pack_signs(x)
        wp = kernels.pack_weights(weight)
        exact = torch.equal(kernels.xnor_conv2d_packed(xp, wp, c, 3, 1, 1), F.conv2d(sign(x), sign(weight), None, 1, 1))
        times = interleaved_times(cpu_engines(x, weight, xp, wp), repeats, warmup)
        stats = {name: median_p90(ts) for name, ts in times.items()}
        medians = {name: m for name, (m, _) in stats.items()}
        macs = n * k * h * w * c * 9
        packed_ratio = medians["float32"] / medians["packed"]
        e2e_ratio = medians["float32"] / medians["end_to_end"]
        packed_ratios.append(packed_ratio)
        e2e_ratios.append(e2e_ratio)
        emit(
            {
                "benchmark": "xnor_conv",
                "device": "cpu",
                "backend": name,
                "shape": {"N": n, "C": c, "H": h, "W": w, "K": k, "kernel": 3, "stride": 1, "padding": 1},
                "float32_conv2d_ms": round(medians["float32"] * 1e3, 4),
                "xnor_packed_ms": round(medians["packed"] * 1e3, 4),
                "xnor_end_to_end_ms": round(medians["end_to_end"] * 1e3, 4),
                "p90_ms": {name: round(p90 * 1e3, 4) for name, (_, p90) in stats.items()},
                "ratio_packed": round(packed_ratio, 2),
                "ratio_end_to_end": round(e2e_ratio, 2),
                "float32_gmacs": round(macs / medians["float32"] / 1e9, 1),
                "xnor_packed_gmacs": round(macs / medians["packed"] / 1e9, 1),
                "exact": exact,
                "repeats": repeats,
                "machine": info,
            }
        )
    median_packed = statistics.median(packed_ratios)
    emit(
        {
            "benchmark": "xnor_conv",
            "device": "cpu",
            "backend": name,
            "summary": True,
            "shapes": len(shapes),
            "median_ratio_packed": round(median_packed, 2),
            "median_ratio_end_to_end": round(statistics.median(e2e_ratios), 2),
            "target_ratio_packed": TARGET_RATIO,
            "target_met": median_packed >= TARGET_RATIO,
            "load_average_1min_at_end": load_average(),
            "machine": info,
        }
    )


def run_cuda_if_available(shapes: list[tuple[int, int, int, int, int]]) -> None:
    path = Path(__file__).resolve().parent / "cuda_xnor_conv.py"
    if not path.exists():
        emit(
            {
                "benchmark": "xnor_conv",
                "device": "cuda",
                "available": False,
                "reason": "the CUDA kernel benchmark (benchmarks/cuda_xnor_conv.py) is not part of this checkout",
            }
        )
        return
    if not torch.cuda.is_available():
        emit(
            {
                "benchmark": "xnor_conv",
                "device": "cuda",
                "available": False,
                "reason": "no CUDA GPU is visible to torch on this machine",
            }
        )
        return
    spec = importlib.util.spec_from_file_location("cuda_xnor_conv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run_cuda(shapes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch/OpenMP threads for both sides (default: torch's default)"
    )
    parser.add_argument(
        "--backend", choices=list(kernels.BACKENDS), help="force a kernel backend (default: the fastest this CPU runs)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        run_cuda_if_available(SHAPES)
        return
    if args.backend:
        with kernels.use_backend(args.backend):
            run_cpu(SHAPES, args.repeats, args.warmup)
    else:
        run_cpu(SHAPES, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
