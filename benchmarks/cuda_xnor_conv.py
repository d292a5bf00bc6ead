"""GPU half of the XNOR convolution benchmark: 1-bit tensor-core kernel vs float16 cuDNN.

For every 3x3 convolution shape N x C x H x W -> K (stride 1, padding 1) it measures, in the
same run and with CUDA events after warm-up:

* baseline: ``torch.nn.functional.conv2d`` in float16, channels_last, ``cudnn.benchmark`` on;
* ours: ``cuda_backend.xnor_conv2d_packed`` as a binary layer runs inside a packed network --
  packed NHWC input, folded-BatchNorm epilogue (scale + bias) and packed output for the next
  binary layer; also the same conv writing float32 NCHW output, and the fused sign-packing
  kernel that the first binary layer needs;

and prints one JSON line per shape with the ratio and our throughput as a fraction of the
1-bit ``mma.sync`` peak, which the same run measures with a register-only microbenchmark.

    python benchmarks/cuda_xnor_conv.py [--repeats 20] [--shapes 256x256x8x8:256 ...]

benchmarks/xnor_conv.py calls :func:`run_cuda` for ``--device cuda``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import emit, machine  # noqa: E402

from bnas.kernels import cuda_backend as cb  # noqa: E402

# (N, C, H, W, K), 3x3 convolutions, stride 1, padding 1 (issue 7)
CUDA_SHAPES: list[tuple[int, int, int, int, int]] = [
    (256, 64, 32, 32, 64),
    (256, 128, 16, 16, 128),
    (256, 256, 8, 8, 256),
    (256, 512, 4, 4, 512),
    (64, 256, 14, 14, 256),
    (64, 512, 7, 7, 512),
    (1, 256, 14, 14, 256),
    (1, 512, 7, 7, 512),
]


def cuda_time(fn: Callable[[], Any], repeats: int = 20, batches: int = 5, warmup: int = 10) -> float:
    """Median seconds per call of ``fn`` on the current stream: ``batches`` batches of
    ``repeats`` back-to-back calls timed with CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / repeats)
    return statistics.median(times)


def measure_mma_peak(device: torch.device) -> dict[str, Any]:
    """Best 1-bit mma.sync m16n8k256 .and.popc throughput (binary ops/s, 2 per AND-popcount
    MAC) of a register-only kernel over a few launch shapes."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    best: dict[str, Any] = {"ops_per_s": 0.0}
    for blocks_per_sm in (2, 4, 8):
        for threads in (128, 256, 512):
            blocks = sms * blocks_per_sm
            out = torch.empty(blocks * threads, dtype=torch.int32, device=device)
            iters = 256
            # calibrate to ~20 ms per launch so launch overhead is negligible
            t = cuda_time(lambda: cb.mma_peak(blocks, threads, iters, out), repeats=1, batches=1, warmup=2)
            iters = max(256, int(iters * 0.02 / max(t, 1e-6)))
            t = cuda_time(lambda: cb.mma_peak(blocks, threads, iters, out), repeats=3, batches=3, warmup=1)
            ops = blocks * (threads // 32) * iters * cb.MMA_PEAK_ILP * cb.MMA_OPS
            if ops / t > best["ops_per_s"]:
                best = {"ops_per_s": ops / t, "blocks": blocks, "threads": threads, "iters": iters}
    return best


def conv_ops(n: int, c: int, h: int, w: int, k: int, ksize: int = 3) -> int:
    """Binary ops (multiply + accumulate = 2) of a stride-1, same-padding convolution."""
    return 2 * n * h * w * k * c * ksize * ksize


def run_cuda(shapes: Sequence[tuple[int, int, int, int, int]] = CUDA_SHAPES, repeats: int = 20,
             device: str | torch.device = "cuda") -> list[dict[str, Any]]:
    """Benchmarks every (N, C, H, W, K) shape, printing each record as a JSON line as soon as
    it is measured; returns the records (see the module doc)."""
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA GPU; none is visible to torch")
    dev = torch.device(device)
    if not cb.is_supported(dev):
        raise RuntimeError(f"the {cb.BACKEND_NAME} kernel cannot run on {torch.cuda.get_device_name(dev)} "
                           f"(needs compute capability 8.0+ and nvcc)")
    cb.load_extension(dev)
    torch.backends.cudnn.benchmark = True
    peak = measure_mma_peak(dev)
    info = machine()
    records = []
    for n, c, h, w, k in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(n, c, h, w, device=dev, generator=gen)
        wt = torch.randn(k, c, 3, 3, device=dev, generator=gen)
        scale = torch.rand(k, device=dev, generator=gen) + 0.5
        bias = torch.randn(k, device=dev, generator=gen)

        x16 = x.half().contiguous(memory_format=torch.channels_last)
        w16 = wt.half().contiguous(memory_format=torch.channels_last)
        xp, wp = cb.pack_signs(x), cb.pack_weights(wt)

        def baseline() -> torch.Tensor:
            return F.conv2d(x16, w16, None, 1, 1)

        def ours() -> torch.Tensor:
            return cb.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, scale=scale, bias=bias, pack_output=True)

        def ours_float() -> torch.Tensor:
            return cb.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, scale=scale, bias=bias)

        def pack_input() -> torch.Tensor:
            return cb.pack_signs(x16)

        # the kernel must be right before it is timed
        check = cb.xnor_conv2d_packed(xp, wp, c, 3, 1, 1)
        ref = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(wt >= 0, 1.0, -1.0), None, 1, 1)
        if not torch.equal(check, ref):
            raise RuntimeError(f"XNOR conv result differs from the float reference for {n}x{c}x{h}x{w}->{k}")

        t_base = cuda_time(baseline, repeats)
        t_ours = cuda_time(ours, repeats)
        t_float = cuda_time(ours_float, repeats)
        t_pack = cuda_time(pack_input, repeats)
        ops = conv_ops(n, c, h, w, k)
        records.append({
            "benchmark": "xnor_conv", "device": "cuda", "shape": f"{n}x{c}x{h}x{w}->{k}", "kernel": "3x3 s1 p1",
            "baseline": "F.conv2d float16 channels_last cudnn.benchmark",
            "ours": "xnor_conv2d_packed packed in -> BN epilogue -> packed out",
            "baseline_us": t_base * 1e6, "ours_us": t_ours * 1e6, "ratio": t_base / t_ours,
            "ours_float_out_us": t_float * 1e6, "ratio_float_out": t_base / t_float,
            "pack_input_fp16_us": t_pack * 1e6,
            "ours_tops": ops / t_ours / 1e12, "baseline_tflops": ops / t_base / 1e12,
            "mma_peak_tops": peak["ops_per_s"] / 1e12, "fraction_of_peak": ops / t_ours / peak["ops_per_s"],
            "mma_peak_launch": {key: peak[key] for key in ("blocks", "threads", "iters")},
            "machine": info,
        })
        emit(records[-1])
    return records


def _parse_shape(text: str) -> tuple[int, int, int, int, int]:
    try:
        nchw, k = text.split(":")
        n, c, h, w = (int(v) for v in nchw.lower().split("x"))
        return n, c, h, w, int(k)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxCxHxW:K, e.g. 256x256x8x8:256") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="calls per timed batch (default 20)")
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", default=CUDA_SHAPES,
                        help="NxCxHxW:K shapes (default: the issue-7 list)")
    args = parser.parse_args(argv)
    try:
        records = run_cuda(args.shapes, args.repeats)
    except RuntimeError as exc:
        print(f"cuda_xnor_conv: {exc}", file=sys.stderr)
        return 2
    ratios = [r["ratio"] for r in records if r["shape"].split("x")[0] != "1"]
    emit({"benchmark": "xnor_conv", "device": "cuda", "summary": True,
          "median_ratio_batch_256_64": statistics.median(ratios) if ratios else None,
          "fraction_of_peak_256x256x8x8": next((r["fraction_of_peak"] for r in records
                                                if r["shape"] == "256x256x8x8->256"), None)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
