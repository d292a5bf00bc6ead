"""Threads for a packed network on the CPU (issue 15): 1 thread against 2, and what a busy
neighbour does to the 2-thread call.

    python benchmarks/packed_threads.py [--genotype G.yaml ...] [--repeats 60] [--competitor] [--int8-grid]

For each genotype (default: Bi-Real ResNet-18 at 224x224, then at 32x32), batch 1, the packed
model (``bnas.export.pack_model(bnas.build(g).eval())``, BN statistics randomised as a trained
network has) is timed with ``torch.set_num_threads(1)`` and ``(2)`` interleaved in one run:
baseline = 1 thread, ours = 2 threads as a user gets them (the kernels on torch's OpenMP
team, each forward capped at the cores free, ``bnas.kernels.thread_budget``), ratio =
baseline / ours (target 1.7 at 224x224 on an idle machine). Also timed, for comparison:
``fixed_2_threads``, the same with the cap turned off (``packed.adaptive_threads = False``);
``pool_2_threads``, the kernels on bnas's own pool (``BNAS_KERNEL_THREADS=2``) beside torch's
2 threads; ``kernels_only_2_threads``, torch's float ops on 1 thread and the kernels on the
pool's 2; and a float torch conv (the network's first 3x3 Bi-Real conv shape) on 1 and 2
threads. Each timed call follows ``--untimed`` (default 5) untimed calls of the same variant:
the first calls after a change of thread count pay for waking and resizing torch's team,
which a program that keeps its thread count does not (measured at load 1.2, 2 threads over
1 at 224x224: 1.27-1.28x after 1 untimed call, 1.65-1.69x after 5; in two separate
processes, ``benchmarks/packed_model.py --threads 1`` and ``--threads 2``: 1.79x).

``--competitor`` starts a busy-looping Python process for the duration of the run (the
machine then has one core fewer than the threads asked for, as a shared machine often has)
and reports the spread of the 2-thread calls: p90 / median, target at most 2, for the packed
model and for the float conv.

``--int8-grid`` times the packed model in the opt-in int8 configuration of
``benchmarks/packed_model.py``'s ``int8_all_grid`` twin (stem, 1x1 shortcuts and classifier in
8-bit integers, the stem on a pixel grid) instead of float32.

Prints one JSON line per genotype: medians and p90 in ms, the load average before and after,
whether the 1- and 2-thread outputs are bit-identical, the kernel backend and the thread
settings of the environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402
from packed_model import INPUT_GRID, randomize_batchnorm  # noqa: E402

import bnas  # noqa: E402
from bnas.export import pack_model  # noqa: E402
from bnas.kernels import backend  # noqa: E402
from bnas.kernels.thread_budget import PROCESS_BUDGET  # noqa: E402

GENOTYPES = ROOT / "search_spaces" / "genotypes"
DEFAULT_GENOTYPES = [GENOTYPES / "bireal_resnet18_imagenet.yaml", GENOTYPES / "bireal_resnet18.yaml"]
RATIO_TARGET = 1.7  # 2 threads over 1, at 224x224 on an idle machine
TAIL_TARGET = 2.0  # p90 / median of the 2-thread call with a busy neighbour
THREADS_ENV = "BNAS_KERNEL_THREADS"
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", THREADS_ENV)


def first_binary_conv_shape(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Input and weight shape of the model's first 3x3 binary conv (a forward hook)."""
    from bnas.binarize import BinaryConv2d

    found: list[tuple[list[int], list[int]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: found.append((list(inp[0].shape), list(mod.weight.shape))))
        for m in model.modules()
        if isinstance(m, BinaryConv2d) and m.kernel_size == (3, 3)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    if not found:
        raise SystemExit("packed_threads.py: the genotype has no 3x3 binary conv to size the float conv by")
    return found[0]


def with_threads(n: int, fn: Any, kernel_threads: int | None = None) -> Any:
    """fn on n torch threads; the XNOR kernels on kernel_threads (bnas's pool) where given,
    else on torch's n."""

    def call() -> Any:
        torch.set_num_threads(n)
        if kernel_threads is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = str(kernel_threads)
        return fn()

    return call


def start_competitor() -> subprocess.Popen:
    """A Python process that spins until it is killed; returns once it is running."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1.0)  # let it start and be counted in the load average
    return proc


def spread(samples: list[float]) -> dict[str, float]:
    med, p90 = median_p90(samples)
    return {"median_ms": round(med * 1e3, 3), "p90_ms": round(p90 * 1e3, 3), "p90_over_median": round(p90 / med, 2)}


def run(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}  # as started (the timing sets THREADS_ENV)
    genotype = bnas.load_genotype(path)
    torch.manual_seed(0)
    model = bnas.build(genotype).eval()
    randomize_batchnorm(model)
    packed = pack_model(model)
    if args.int8_grid:
        packed.stem_precision = packed.shortcut_precision = packed.head_precision = "int8"
        packed.input_grid = INPUT_GRID
    x = torch.randn(args.batch, *genotype.input)
    conv_in, conv_w = first_binary_conv_shape(model, x)
    fx, fw = torch.randn(conv_in), torch.randn(conv_w)

    def packed_call(adaptive: bool = True) -> Any:
        """The packed network, its cap at the free cores on or off for the call."""

        def call() -> torch.Tensor:
            packed.adaptive_threads = adaptive
            return packed(x)

        return call

    with torch.no_grad():
        outs = [with_threads(n, packed_call(adaptive=False))() for n in (1, 2)]  # truly on 2 threads
        fns = {
            "packed_1": with_threads(1, packed_call()),
            "packed_2": with_threads(2, packed_call()),
            "packed_fixed_2": with_threads(2, packed_call(adaptive=False)),
            "packed_pool_2": with_threads(2, packed_call(), kernel_threads=2),
            "packed_kernels_2": with_threads(1, packed_call(), kernel_threads=2),
            "float_1": with_threads(1, lambda: F.conv2d(fx, fw, padding=1)),
            "float_2": with_threads(2, lambda: F.conv2d(fx, fw, padding=1)),
        }
        load_start, free_start = load_average(), PROCESS_BUDGET.free_cores()
        times = interleaved_times(fns, args.repeats, burst_seconds=0.0, untimed=args.untimed)
        load_end, free_end = load_average(), PROCESS_BUDGET.free_cores()
    os.environ.pop(THREADS_ENV, None)
    (base, base_p90), (ours, ours_p90) = median_p90(times["packed_1"]), median_p90(times["packed_2"])

    def variant(key: str) -> dict[str, Any]:
        return {
            "ms": round(median_p90(times[key])[0] * 1e3, 3),
            "ratio": round(base / median_p90(times[key])[0], 2),
            "spread": spread(times[key]),
        }

    (fbase, _), (fours, _) = median_p90(times["float_1"]), median_p90(times["float_2"])
    ratio = base / ours
    at_224 = list(genotype.input[-2:]) == [224, 224]
    record: dict[str, Any] = {
        "benchmark": "packed_threads",
        "genotype": genotype.name,
        "input": list(genotype.input),
        "batch": args.batch,
        "competitor": args.competitor,
        "baseline": "packed model, 1 thread",
        "ours": "packed model, 2 threads",
        "precision": "int8 stem on a pixel grid, shortcuts and head" if args.int8_grid else "float32",
        "baseline_ms": round(base * 1e3, 3),
        "ours_ms": round(ours * 1e3, 3),
        "ratio": round(ratio, 2),
        "p90_ms": {"baseline": round(base_p90 * 1e3, 3), "ours": round(ours_p90 * 1e3, 3)},
        "ours_spread": spread(times["packed_2"]),
        "fixed_2_threads": variant("packed_fixed_2"),  # no cap at the free cores
        "pool_2_threads": variant("packed_pool_2"),  # the kernels on bnas's pool, torch on 2
        "free_cores": [free_start, free_end],  # as the thread cap saw them, before and after
        "kernels_only_2_threads": variant("packed_kernels_2"),  # torch on 1 thread, kernels on 2
        "float_conv": {
            "input": conv_in,
            "weight": conv_w,
            "ms_1_thread": round(fbase * 1e3, 3),
            "ms_2_threads": round(fours * 1e3, 3),
            "ratio": round(fbase / fours, 2),
            "spread_2_threads": spread(times["float_2"]),
        },
        "outputs_identical_1_vs_2_threads": bool(torch.equal(outs[0], outs[1])),
        "load_average_1min": [load_start, load_end],
        "repeats": args.repeats,
        "untimed": args.untimed,
        "env": env,
        "backend": backend("cpu"),
        "machine": {k: v for k, v in machine().items() if k != "threads"},  # threads: 1 and 2, above
    }
    if args.competitor:
        tail = record["ours_spread"]["p90_over_median"]
        record.update(target={"p90_over_median_max": TAIL_TARGET}, meets_target=tail <= TAIL_TARGET)
    elif at_224:
        record.update(target={"ratio_min": RATIO_TARGET}, meets_target=ratio >= RATIO_TARGET)
    else:
        record.update(target=None, meets_target=None)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--genotype", type=Path, nargs="+", default=DEFAULT_GENOTYPES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=60, help="timed calls per variant (interleaved)")
    p.add_argument(
        "--untimed", type=int, default=5, help="untimed calls before each timed one (the thread count just changed)"
    )
    p.add_argument(
        "--competitor", action="store_true", help="run a busy-looping process alongside, as a shared machine has"
    )
    p.add_argument(
        "--int8-grid", action="store_true", help="the packed model with packed_model.py's int8_all_grid settings"
    )
    args = p.parse_args(argv)
    competitor = start_competitor() if args.competitor else None
    try:
        for path in args.genotype:
            emit(run(path, args))
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


if __name__ == "__main__":
    main()
