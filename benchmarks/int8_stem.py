"""Binary networks' float stems in 8-bit integers: ``bnas.kernels.int8_conv2d`` against
PyTorch's float32 ``conv2d``.

Each shape is the stem conv of a shipped network, batch 1: ResNet's 7x7/2 on a 224x224 image
(``bireal_resnet18_imagenet``, 118 M MACs), the 3x3 stem at 32x32 (``bireal_resnet18``) and the
3x3/2 stem on 28x28 (``fashion_handcrafted``). The baseline is PyTorch's conv on the
channels_last image (what the packed plan runs by default); ours is the AVX-512 VNNI kernel on
the image as it comes (NCHW), quantization of the image included. Timed interleaved in one run;
every shape also reports the int8 result's largest error against the float64 conv, relative to
the output's largest magnitude. Prints one JSON line per shape and a summary line.

    python benchmarks/int8_stem.py [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402

from bnas import kernels  # noqa: E402
from bnas.kernels import cpu_backend  # noqa: E402

# (C, H, W, K, kernel, stride, padding, network)
SHAPES = [
    (3, 224, 224, 64, 7, 2, 3, "bireal_resnet18_imagenet"),
    (3, 32, 32, 64, 3, 1, 1, "bireal_resnet18"),
    (1, 28, 28, 32, 3, 2, 1, "fashion_handcrafted"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if "cpu-avx512" not in cpu_backend.supported_backends() or not cpu_backend.int8_supported():
        emit({"benchmark": "int8_stem", "skipped": "the kernel needs AVX-512 VNNI and the cpu-avx512 backend"})
        return 0
    torch.set_num_threads(args.threads)
    ratios = []
    with torch.no_grad(), kernels.use_backend("cpu-avx512"):
        for c, h, w, k, size, stride, padding, network in SHAPES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, c, h, w, generator=g)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            weight, bias = torch.randn(k, c, size, size, generator=g) * 0.1, torch.randn(k, generator=g)
            exact = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding)
            ours_out = kernels.int8_conv2d(x, weight, bias, stride, padding)
            error = ((ours_out.double() - exact).abs().max() / exact.abs().max()).item()
            macs = c * size * size * k * exact.shape[2] * exact.shape[3]
            load_before = load_average()
            times = interleaved_times(
                {
                    "pytorch": lambda: F.conv2d(x_cl, weight, bias, stride, padding),
                    "ours": lambda: kernels.int8_conv2d(x, weight, bias, stride, padding),
                },
                repeats=args.repeats,
            )
            (base, base_p90), (ours, ours_p90) = median_p90(times["pytorch"]), median_p90(times["ours"])
            ratios.append(base / ours)
            emit(
                {
                    "benchmark": "int8_stem",
                    "network": network,
                    "shape": [1, c, h, w, k, size, stride, padding],
                    "macs": macs,
                    "baseline": "torch conv2d, float32, channels_last image",
                    "ours": "bnas.kernels.int8_conv2d (AVX-512 VNNI), image quantization included",
                    "baseline_ms": round(base * 1e3, 4),
                    "ours_ms": round(ours * 1e3, 4),
                    "p90_ms": {"baseline": round(base_p90 * 1e3, 4), "ours": round(ours_p90 * 1e3, 4)},
                    "ratio": round(base / ours, 2),
                    "baseline_gmacs": round(macs / base / 1e9, 1),
                    "ours_gmacs": round(macs / ours / 1e9, 1),
                    "max_rel_error_vs_float64": float(f"{error:.2e}"),
                    "threads": args.threads,
                    "load_average_1min": [load_before, load_average()],
                    "machine": machine(),
                }
            )
    emit({"benchmark": "int8_stem", "summary": True, "median_ratio": round(statistics.median(ratios), 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
