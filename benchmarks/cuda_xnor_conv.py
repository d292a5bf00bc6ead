"""GPU half of the XNOR convolution benchmark: 1-bit tensor-core kernel vs float16 cuDNN.

For every 3x3 convolution shape N x C x H x W -> K (stride 1, padding 1) it checks that the
kernel is bit-exact against the float reference, then measures in the same run:

* baseline: ``torch.nn.functional.conv2d`` in float16, channels_last, ``cudnn.benchmark`` on;
* ours: ``cuda_backend.xnor_conv2d_packed`` as a binary layer runs inside a packed network --
  packed NHWC input, folded-BatchNorm epilogue (scale + bias) and packed output for the next
  binary layer; also the same conv writing float32 NCHW output, and the fused sign-packing
  kernel that the first binary layer needs.

Timing measures the GPU, not Python: each callable is warmed up on a side stream, then
``--repeats`` calls of it are captured in one CUDA graph, and the graph is replayed
``--batches`` times between CUDA events; ``*_us`` is the median per call over the replays,
``*_us_p90`` their 90th percentile.  The eager time (the same calls from Python back to back,
CUDA events around them, so it includes the host-side argument checks when they are the
slower part) is reported apart as ``*_eager_us``.  Both sides are timed the same way.

The 1-bit ``mma.sync`` m16n8k256 peak is measured on the same device by a register-only
kernel (``mma_peak``); each line carries our throughput as a fraction of it.  One JSON line
per shape, then a summary line: the median ratio (cuDNN time / ours) over the six batch-256
and batch-64 shapes (``ratio_shapes`` names them), the fraction of peak of 256x256x8x8->256,
and ``meets_4x_cudnn`` / ``meets_35pct_peak`` computed from those measurements.

    python benchmarks/cuda_xnor_conv.py [--repeats 20] [--batches 10] [--shapes 256x256x8x8:256 ...]
                                        [--json-out PATH]

benchmarks/xnor_conv.py calls :func:`run_cuda` for ``--device cuda``; benchmarks/packed_model.py
uses :func:`cuda_time`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import emit, machine, median_p90  # noqa: E402

from bnas.kernels import cuda_backend as cb  # noqa: E402

Shape = tuple[int, int, int, int, int]

# (N, C, H, W, K), 3x3 convolutions, stride 1, padding 1 (issue 7)
CUDA_SHAPES: list[Shape] = [
    (256, 64, 32, 32, 64),
    (256, 128, 16, 16, 128),
    (256, 256, 8, 8, 256),
    (256, 512, 4, 4, 512),
    (64, 256, 14, 14, 256),
    (64, 512, 7, 7, 512),
    (1, 256, 14, 14, 256),
    (1, 512, 7, 7, 512),
]
RATIO_BATCHES = (256, 64)  # the summary's median ratio is over the shapes of these batch sizes
PEAK_SHAPE: Shape = (256, 256, 8, 8, 256)  # the summary's fraction of peak is this shape's
TARGET_RATIO = 4.0  # issue 17: >= 4x cuDNN fp16, median over the six batch-256/64 shapes
TARGET_FRACTION_OF_PEAK = 0.35  # issue 17: >= 35 % of the measured 1-bit mma peak


def shape_name(shape: Shape) -> str:
    n, c, h, w, k = shape
    return f"{n}x{c}x{h}x{w}->{k}"


RATIO_SHAPE_NAMES = [shape_name(shape) for shape in CUDA_SHAPES if shape[0] in RATIO_BATCHES]


def cuda_time(fn: Callable[[], Any], repeats: int = 20, batches: int = 5, warmup: int = 10) -> float:
    """Median seconds per call of ``fn`` called eagerly from Python on the current stream:
    ``batches`` batches of ``repeats`` back-to-back calls timed with CUDA events, after
    ``warmup`` calls (host overhead included wherever it exceeds the GPU time)."""
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


def graph_time(fn: Callable[[], Any], calls: int = 20, replays: int = 10, warmup: int = 3) -> tuple[float, float]:
    """Median and 90th-percentile seconds per call of ``fn`` on the GPU alone: ``calls`` calls
    captured in one CUDA graph, replayed ``replays`` times between CUDA events (one sample per
    replay).  Warm-up runs on a side stream before capture, as PyTorch's CUDA-graph docs ask
    (cudnn.benchmark picks its algorithm there, lazy initialisation happens outside capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph; not timed
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return median_p90(times)


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
            t = cuda_time(partial(cb.mma_peak, blocks, threads, iters, out), repeats=1, batches=1, warmup=2)
            iters = max(256, int(iters * 0.02 / max(t, 1e-6)))
            t = cuda_time(partial(cb.mma_peak, blocks, threads, iters, out), repeats=3, batches=3, warmup=1)
            ops = blocks * (threads // 32) * iters * cb.MMA_PEAK_ILP * cb.MMA_OPS
            if ops / t > best["ops_per_s"]:
                best = {"ops_per_s": ops / t, "blocks": blocks, "threads": threads, "iters": iters}
    return best


def conv_ops(n: int, c: int, h: int, w: int, k: int, ksize: int = 3) -> int:
    """Binary ops (multiply + accumulate = 2) of a stride-1, same-padding convolution."""
    return 2 * n * h * w * k * c * ksize * ksize


class JsonLines:
    """Prints each record as a JSON line and, with a path, also writes it to that file at once
    (a run cut short keeps the lines measured so far)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._fh = open(path, "w", encoding="utf-8") if path is not None else None  # noqa: SIM115

    def __call__(self, record: dict[str, Any]) -> None:
        emit(record)
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _timed(fn: Callable[[], Any], calls: int, replays: int, errors: dict[str, str], name: str) -> tuple[float, float]:
    """graph_time, recording a failed capture under ``errors[name]`` (NaN times) instead of
    ending the run."""
    try:
        return graph_time(fn, calls, replays)
    except RuntimeError as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"[:500]
        torch.cuda.synchronize()
        return float("nan"), float("nan")


def _us(seconds: float) -> float | None:
    return None if seconds != seconds else round(seconds * 1e6, 3)  # NaN (failed capture) -> null


def _div(a: float, b: float) -> float | None:
    return None if a != a or b != b or b <= 0 else round(a / b, 4)


def measure_shape(shape: Shape, peak_ops_per_s: float, repeats: int, batches: int, dev: torch.device) -> dict[str, Any]:
    """One shape's record (see the module doc); the timings are left out when the kernel is not
    bit-exact."""
    n, c, h, w, k = shape
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

    sums = cb.tap_sums(wp, c, 3)  # computed once per weight tensor, outside the timed calls

    def ours() -> torch.Tensor:
        return cb.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, scale=scale, bias=bias, pack_output=True, tap_sums=sums)

    def ours_float() -> torch.Tensor:
        return cb.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, scale=scale, bias=bias, tap_sums=sums)

    def pack_input() -> torch.Tensor:
        return cb.pack_signs(x16)

    record: dict[str, Any] = {
        "benchmark": "xnor_conv", "device": "cuda", "shape": shape_name(shape), "n": n, "kernel": "3x3 s1 p1",
        "baseline": "F.conv2d float16 channels_last cudnn.benchmark",
        "ours": "xnor_conv2d_packed packed in -> BN epilogue -> packed out",
    }  # fmt: skip
    # the kernel must be right before it is timed
    ref = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(wt >= 0, 1.0, -1.0), None, 1, 1)
    record["exact"] = bool(torch.equal(cb.xnor_conv2d_packed(xp, wp, c, 3, 1, 1), ref))
    if not record["exact"]:
        return record
    float_out = ours_float()
    affine = ref * scale[:, None, None] + bias[:, None, None]
    record["epilogue_max_abs_err"] = float((float_out - affine).abs().max())
    record["packed_out_matches_float_out"] = bool(torch.equal(ours(), cb.pack_signs(float_out)))
    del float_out, affine, ref

    errors: dict[str, str] = {}
    t_base, t_base90 = _timed(baseline, repeats, batches, errors, "baseline")
    t_ours, t_ours90 = _timed(ours, repeats, batches, errors, "ours")
    t_float, t_float90 = _timed(ours_float, repeats, batches, errors, "ours_float_out")
    t_pack, t_pack90 = _timed(pack_input, repeats, batches, errors, "pack_input")
    e_base, e_ours = cuda_time(baseline, repeats), cuda_time(ours, repeats)
    ops = conv_ops(n, c, h, w, k)
    ours_ops_per_s = ops / t_ours if t_ours == t_ours else float("nan")
    record.update({
        "baseline_us": _us(t_base), "baseline_us_p90": _us(t_base90),
        "ours_us": _us(t_ours), "ours_us_p90": _us(t_ours90), "ratio": _div(t_base, t_ours),
        "ours_float_out_us": _us(t_float), "ours_float_out_us_p90": _us(t_float90),
        "ratio_float_out": _div(t_base, t_float),
        "pack_input_fp16_us": _us(t_pack), "pack_input_fp16_us_p90": _us(t_pack90),
        "baseline_eager_us": _us(e_base), "ours_eager_us": _us(e_ours), "ratio_eager": _div(e_base, e_ours),
        "ours_tops": _div(ops, t_ours * 1e12), "baseline_tflops": _div(ops, t_base * 1e12),
        "mma_peak_tops": round(peak_ops_per_s / 1e12, 2), "fraction_of_peak": _div(ours_ops_per_s, peak_ops_per_s),
        "timing": f"CUDA graph of {repeats} calls, {batches} replays timed with CUDA events; "
                  "median and p90 per call over the replays (eager: Python calls, CUDA events)",
    })  # fmt: skip
    if errors:
        record["graph_errors"] = errors
    return record


def summarize(records: Sequence[dict[str, Any]], peak: dict[str, Any]) -> dict[str, Any]:
    """The summary line: issue 17's two GPU targets computed from the measured records
    (``None`` where a target's shapes were not all measured)."""
    ratio_records = [r for r in records if r["shape"] in RATIO_SHAPE_NAMES]
    ratios = [r.get("ratio") for r in ratio_records]
    # the target is the median over the six default shapes: a subset of them claims nothing
    all_measured = len({r["shape"] for r in ratio_records}) == len(RATIO_SHAPE_NAMES) and None not in ratios
    median_ratio = statistics.median(ratios) if all_measured else None
    at_peak = next((r for r in records if r["shape"] == shape_name(PEAK_SHAPE)), None)
    fraction = at_peak.get("fraction_of_peak") if at_peak else None
    return {
        "benchmark": "xnor_conv", "device": "cuda", "summary": True,
        "all_exact": all(r["exact"] for r in records),
        "ratio_shapes": [r["shape"] for r in ratio_records],
        "median_ratio_batch_256_64": median_ratio, "target_ratio": TARGET_RATIO,
        "meets_4x_cudnn": None if median_ratio is None else median_ratio >= TARGET_RATIO,
        "peak_shape": shape_name(PEAK_SHAPE), "fraction_of_peak_256x256x8x8": fraction,
        "target_fraction_of_peak": TARGET_FRACTION_OF_PEAK,
        "meets_35pct_peak": None if fraction is None else fraction >= TARGET_FRACTION_OF_PEAK,
        "mma_peak_tops": round(peak["ops_per_s"] / 1e12, 2),
        "mma_peak_launch": {key: peak.get(key) for key in ("blocks", "threads", "iters")},
        "machine": machine(),
    }  # fmt: skip


def run_cuda(
    shapes: Sequence[Shape] = CUDA_SHAPES,
    repeats: int = 20,
    device: str | torch.device = "cuda",
    batches: int = 10,
    json_out: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Benchmarks every (N, C, H, W, K) shape, printing each record as a JSON line as soon as
    it is measured (and writing it to ``json_out`` when given), then the summary line; returns
    the per-shape records (see the module doc)."""
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA GPU; none is visible to torch")
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if not cb.is_supported(dev):
        raise RuntimeError(
            f"the {cb.BACKEND_NAME} kernel cannot run on {torch.cuda.get_device_name(dev)} "
            f"(needs compute capability 8.0+ and nvcc)"
        )
    sink = JsonLines(json_out)
    try:
        with torch.cuda.device(dev):
            cb.load_extension(dev)
            torch.backends.cudnn.benchmark = True
            peak = measure_mma_peak(dev)
            records = []
            for shape in shapes:
                records.append(measure_shape(shape, peak["ops_per_s"], repeats, batches, dev))
                sink(records[-1])
            sink(summarize(records, peak))
    finally:
        sink.close()
    return records


def _parse_shape(text: str) -> Shape:
    try:
        nchw, k = text.split(":")
        n, c, h, w = (int(v) for v in nchw.lower().split("x"))
        return n, c, h, w, int(k)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxCxHxW:K, e.g. 256x256x8x8:256") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="calls per CUDA graph / eager batch (default 20)")
    parser.add_argument("--batches", type=int, default=10, help="timed graph replays per callable (default 10)")
    parser.add_argument(
        "--shapes",
        type=_parse_shape,
        nargs="+",
        default=CUDA_SHAPES,
        help="NxCxHxW:K shapes (default: the issue-7 list)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batches < 1:
        parser.error("--repeats and --batches must be at least 1")
    try:
        records = run_cuda(args.shapes, args.repeats, batches=args.batches, json_out=args.json_out)
    except RuntimeError as exc:
        print(f"cuda_xnor_conv: {exc}", file=sys.stderr)
        return 2
    if not all(r["exact"] for r in records):
        print(
            "cuda_xnor_conv: the kernel is not bit-exact for "
            + ", ".join(r["shape"] for r in records if not r["exact"]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
