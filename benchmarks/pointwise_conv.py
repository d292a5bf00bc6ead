"""Bi-Real ResNet-18's float downsample shortcuts: ``bnas.kernels.pointwise_conv2d`` against
PyTorch's ``avg_pool2d`` + 1x1 ``conv2d``.

Each shape N x C x H x W -> K is a shortcut of ``bireal_resnet18`` (32x32 input) or
``bireal_resnet18_imagenet`` (224x224): a 2x2/2 average pool in ceil mode, then a 1x1 conv with
the folded BN as its bias, channels_last float32 (what the packed network's plan ran before,
and what it runs now). On CPUs with AVX-512 VNNI a third engine, ``int8``, runs the same
shortcut in 8-bit integers (``precision="int8"``: ``PackedNetwork.shortcut_precision``, opt-in).
Timed interleaved in one run; every shape is also checked against the float64 result. Prints
one JSON line per shape and a summary line with the median ratios.

    python benchmarks/pointwise_conv.py [--repeats 200] [--threads 1]
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

# (N, C, H, W, K, network)
SHAPES = [
    (1, 64, 32, 32, 128, "bireal_resnet18"),
    (1, 128, 16, 16, 256, "bireal_resnet18"),
    (1, 256, 8, 8, 512, "bireal_resnet18"),
    (1, 64, 56, 56, 128, "bireal_resnet18_imagenet"),
    (1, 128, 28, 28, 256, "bireal_resnet18_imagenet"),
    (1, 256, 14, 14, 512, "bireal_resnet18_imagenet"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if "cpu-avx512" not in cpu_backend.supported_backends():
        emit({"benchmark": "pointwise_conv", "skipped": "the kernel needs the cpu-avx512 backend"})
        return 0
    torch.set_num_threads(args.threads)
    int8 = cpu_backend.int8_supported()
    ratios, int8_ratios = [], []
    with torch.no_grad(), kernels.use_backend("cpu-avx512"):
        for n, c, h, w, k, network in SHAPES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
            weight, bias = torch.randn(k, c, 1, 1, generator=g), torch.randn(k, generator=g)
            exact = F.conv2d(F.avg_pool2d(x.double(), 2, ceil_mode=True), weight.double(), bias.double())
            ours_out = kernels.pointwise_conv2d(x, weight, bias, pool=2, ceil_mode=True)
            error = ((ours_out.double() - exact).abs().max() / exact.abs().max()).item()
            macs = c * k * n * ((h + 1) // 2) * ((w + 1) // 2)
            engines = {
                "pytorch": lambda x=x, w=weight, b=bias: F.conv2d(F.avg_pool2d(x, 2, ceil_mode=True), w, b),
                "ours": lambda x=x, w=weight, b=bias: kernels.pointwise_conv2d(x, w, b, pool=2, ceil_mode=True),
            }
            if int8:
                engines["int8"] = lambda x=x, w=weight, b=bias: kernels.pointwise_conv2d(
                    x, w, b, pool=2, ceil_mode=True, precision="int8"
                )
            load_before = load_average()
            times = interleaved_times(engines, repeats=args.repeats)
            (base, base_p90), (ours, ours_p90) = median_p90(times["pytorch"]), median_p90(times["ours"])
            ratios.append(base / ours)
            line: dict[str, object] = {
                "benchmark": "pointwise_conv",
                "network": network,
                "shape": [n, c, h, w, k],
                "macs": macs,
                "baseline": "torch avg_pool2d(2, ceil_mode) + conv2d 1x1, channels_last",
                "ours": "bnas.kernels.pointwise_conv2d (cpu-avx512)",
                "baseline_ms": round(base * 1e3, 4),
                "ours_ms": round(ours * 1e3, 4),
                "p90_ms": {"baseline": round(base_p90 * 1e3, 4), "ours": round(ours_p90 * 1e3, 4)},
                "ratio": round(base / ours, 2),
                "ours_gmacs": round(macs / ours / 1e9, 1),
                "max_rel_error_vs_float64": float(f"{error:.2e}"),
                "threads": args.threads,
                "load_average_1min": [load_before, load_average()],
                "machine": machine(),
            }
            if int8:
                int8_out = kernels.pointwise_conv2d(x, weight, bias, pool=2, ceil_mode=True, precision="int8")
                int8_error = ((int8_out.double() - exact).abs().max() / exact.abs().max()).item()
                int8_ms, int8_p90 = median_p90(times["int8"])
                int8_ratios.append(ours / int8_ms)
                line["int8"] = {
                    "ms": round(int8_ms * 1e3, 4),
                    "p90_ms": round(int8_p90 * 1e3, 4),
                    "ratio_vs_baseline": round(base / int8_ms, 2),
                    "ratio_vs_ours": round(ours / int8_ms, 2),
                    "max_rel_error_vs_float64": float(f"{int8_error:.2e}"),
                }
            emit(line)
    summary: dict[str, object] = {
        "benchmark": "pointwise_conv",
        "summary": True,
        "median_ratio": round(statistics.median(ratios), 2),
    }
    if int8:
        summary["median_ratio_int8_vs_ours"] = round(statistics.median(int8_ratios), 2)
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
