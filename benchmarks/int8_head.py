"""A classifier in 8-bit integers against float32, by its size: ``bnas.kernels.linear(...,
precision="int8")`` against ``precision="float32"`` at batch 1 (the packed plan's two ways to run
a float linear layer; ``PackedNetwork.head_precision``).

Each shape is in -> out features: the CIFAR and MNIST heads of the shipped networks (512 -> 10,
500 -> 10), sizes between, and ResNet's 512 -> 1000. Timed interleaved in one run, warm (the
layer alone: inside a forward its weights come from further away, which favours int8's smaller
ones). The plan keeps a layer under ``bnas.export.plan.INT8_HEAD_MIN_MACS`` multiply-adds per
row in float32 (``keeps_float32``: not ``bnas.export.plan.int8_head_runs``); ``ratio`` is
float32's time over int8's, so below 1 int8 is the slower. Prints one JSON line per shape.

    python benchmarks/int8_head.py [--repeats 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402

from bnas import kernels  # noqa: E402
from bnas.export.plan import int8_head_runs  # noqa: E402
from bnas.kernels import cpu_backend  # noqa: E402

# (in_features, out_features)
SHAPES = [(500, 10), (512, 10), (512, 64), (512, 128), (512, 256), (512, 512), (512, 1000)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if "cpu-avx512" not in cpu_backend.supported_backends() or not cpu_backend.int8_supported():
        emit({"benchmark": "int8_head", "skipped": "the int8 linear kernel needs AVX-512 VNNI"})
        return 0
    torch.set_num_threads(args.threads)
    with torch.no_grad(), kernels.use_backend("cpu-avx512"):
        for fin, fout in SHAPES:
            g = torch.Generator().manual_seed(0)
            x, weight, bias = torch.randn(1, fin, generator=g), torch.randn(fout, fin, generator=g), torch.randn(fout)
            engines = {
                "float32": lambda x=x, w=weight, b=bias: kernels.linear(x, w, b, precision="float32"),
                "int8": lambda x=x, w=weight, b=bias: kernels.linear(x, w, b, precision="int8"),
            }
            load_before = load_average()
            times = interleaved_times(engines, repeats=args.repeats)
            (base, base_p90), (ours, ours_p90) = median_p90(times["float32"]), median_p90(times["int8"])
            emit(
                {
                    "benchmark": "int8_head",
                    "shape": [fin, fout],
                    "macs": fin * fout,
                    "keeps_float32": not int8_head_runs(fin, fout),
                    "baseline": "bnas.kernels.linear, float32, batch 1",
                    "ours": "bnas.kernels.linear, int8, batch 1",
                    "baseline_us": round(base * 1e6, 2),
                    "ours_us": round(ours * 1e6, 2),
                    "p90_us": {"baseline": round(base_p90 * 1e6, 2), "ours": round(ours_p90 * 1e6, 2)},
                    "ratio": round(base / ours, 2),
                    "threads": args.threads,
                    "load_average_1min": [load_before, load_average()],
                    "machine": machine(),
                }
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
