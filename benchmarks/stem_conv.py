"""Binary networks' float stems: bnas's stem kernels against PyTorch's float32 ``conv2d``.

Each shape is the stem of a shipped network, batch 1: ResNet's 7x7/2 conv on a 224x224 image
and the 3x3/2 max-pool after it (``bireal_resnet18_imagenet``, 118 M MACs), the 3x3 stem at
32x32 (``bireal_resnet18``) and the 3x3/2 stem on 28x28 (``fashion_handcrafted``). Engines,
timed interleaved in one run:

- ``pytorch``: PyTorch's conv on the channels_last image, then for the pooled stem bnas's
  channels_last max-pool kernel with the packed signs (what the packed plan ran before);
- ``float32``: the direct conv of the stem kernels, ``bnas.kernels.image_conv2d``, and for the
  pooled stem ``bnas.kernels.conv2d_max_pool``, the conv and the pool in one pass (what the
  packed plan runs by default);
- ``int8``: the conv in 8-bit integers on the image as it comes (NCHW), quantization included,
  with the pool in the same pass for the pooled stem (``PackedNetwork.stem_precision = "int8"``),
  on AMX tiles where the CPU has AMX-INT8 (``int8_unit``), else on AVX-512 VNNI;
- ``int8_vnni`` (AMX CPUs only): the same int8 conv kept on the VNNI kernel
  (``cpu_backend.amx_int8(False)``), the same numbers bit for bit, with ``amx_vs_vnni``, the
  ratio of the two.

Every engine's result is checked against the float64 conv (largest error relative to the
output's largest magnitude). Prints one JSON line per shape and a summary line.

    python benchmarks/stem_conv.py [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402

from bnas import kernels  # noqa: E402
from bnas.kernels import cpu_backend  # noqa: E402

# (C, H, W, K, kernel, stride, padding, max-pool (kernel, stride, padding) or None, network)
SHAPES = [
    (3, 224, 224, 64, 7, 2, 3, (3, 2, 1), "bireal_resnet18_imagenet"),
    (3, 32, 32, 64, 3, 1, 1, None, "bireal_resnet18"),
    (1, 28, 28, 32, 3, 2, 1, None, "fashion_handcrafted"),
]


def engines(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int, pool: tuple | None
) -> dict[str, Callable[[], Any]]:
    x_cl = x.contiguous(memory_format=torch.channels_last)
    if pool is None:
        fns: dict[str, Callable[[], Any]] = {
            "pytorch": lambda: F.conv2d(x_cl, weight, bias, stride, padding),
            "float32": lambda: kernels.image_conv2d(x, weight, bias, stride, padding),
            "int8": lambda: kernels.int8_conv2d(x, weight, bias, stride, padding),
        }
    else:
        fns = {
            "pytorch": lambda: kernels.max_pool2d_and_pack(F.conv2d(x_cl, weight, bias, stride, padding), *pool),
            "float32": lambda: kernels.conv2d_max_pool(x, weight, bias, stride, padding, *pool, pack_output=True),
            "int8": lambda: kernels.conv2d_max_pool(
                x, weight, bias, stride, padding, *pool, pack_output=True, precision="int8"
            ),
        }
    if cpu_backend.amx_int8_enabled():
        fns["int8_vnni"] = on_vnni(fns["int8"])
    return fns


def on_vnni(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with the int8 convs kept off AMX."""

    def call() -> Any:
        with cpu_backend.amx_int8(False):
            return fn()

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if "cpu-avx512" not in cpu_backend.supported_backends() or not cpu_backend.int8_supported():
        emit({"benchmark": "stem_conv", "skipped": "the kernels need AVX-512 VNNI and the cpu-avx512 backend"})
        return 0
    torch.set_num_threads(args.threads)
    ratios: dict[str, list[float]] = {"float32": [], "int8": [], "int8_vnni": []}
    with torch.no_grad(), kernels.use_backend("cpu-avx512"):
        for c, h, w, k, size, stride, padding, pool, network in SHAPES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, c, h, w, generator=g)
            weight, bias = torch.randn(k, c, size, size, generator=g) * 0.1, torch.randn(k, generator=g)
            exact = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding)
            macs = c * size * size * k * exact.shape[2] * exact.shape[3]
            if pool is not None:
                exact = F.max_pool2d(exact, *pool)
            fns = engines(x, weight, bias, stride, padding, pool)
            errors = {}
            for name, fn in fns.items():
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                errors[name] = float(f"{((out.double() - exact).abs().max() / exact.abs().max()).item():.2e}")
            load_before = load_average()
            times = interleaved_times(fns, repeats=args.repeats)
            ms = {name: median_p90(samples) for name, samples in times.items()}
            record: dict[str, Any] = {
                "benchmark": "stem_conv",
                "network": network,
                "shape": [1, c, h, w, k, size, stride, padding],
                "max_pool": list(pool) if pool is not None else None,
                "macs": macs,
                "baseline": "torch conv2d, float32, channels_last image"
                + (" + bnas max_pool2d_and_pack" if pool is not None else ""),
                "baseline_ms": round(ms["pytorch"][0] * 1e3, 4),
                "baseline_gmacs": round(macs / ms["pytorch"][0] / 1e9, 1),
            }
            for name in ("float32", "int8", "int8_vnni"):
                if name not in ms:
                    continue
                ratio = ms["pytorch"][0] / ms[name][0]
                ratios[name].append(ratio)
                record[name] = {
                    "ms": round(ms[name][0] * 1e3, 4),
                    "p90_ms": round(ms[name][1] * 1e3, 4),
                    "ratio": round(ratio, 2),
                    "gmacs": round(macs / ms[name][0] / 1e9, 1),
                }
            record["int8_unit"] = "amx" if cpu_backend.amx_int8_enabled() else "vnni"
            if "int8_vnni" in ms:
                record["amx_vs_vnni"] = round(ms["int8_vnni"][0] / ms["int8"][0], 2)
            record.update(
                {
                    "p90_ms": {"baseline": round(ms["pytorch"][1] * 1e3, 4)},
                    "max_rel_error_vs_float64": errors,
                    "threads": args.threads,
                    "load_average_1min": [load_before, load_average()],
                    "machine": machine(),
                }
            )
            emit(record)
    emit(
        {
            "benchmark": "stem_conv",
            "summary": True,
            "median_ratio": {name: round(statistics.median(r), 2) for name, r in ratios.items() if r},
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
