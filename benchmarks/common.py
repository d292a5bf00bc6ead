"""Shared helpers for the benchmark scripts: machine description, timing, JSON lines."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    # Family and model tell CPU generations apart where the name does not ("AMD EPYC" is Zen 4
    # at family 25 and Zen 5 at family 26, with twice the float32 FMA width per core).
    ids: dict[str, int] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    cpu = value.strip()
                elif key in ("cpu family", "model") and key not in ids and value.strip().isdigit():
                    ids[key] = int(value)
                elif not line.strip():  # the first processor's block is enough
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if ids:
        info["cpu_family_model"] = [ids.get("cpu family"), ids.get("model")]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median_time(fn: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in seconds (CPU: the median of repeats, after warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3, burst_seconds: float = 2e-3, untimed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each. Each round times every
    function once, in a rotating order (no function always follows another one's cache
    footprint), over a burst of calls lasting about ``burst_seconds``, so load from other
    processes on a shared machine hits all of them alike. ``untimed`` calls precede each
    burst, so a sample is not the first call after another function (for thread-count
    changes: the first call after one pays for waking or resizing the thread team)."""
    bursts = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        single = max(time.perf_counter() - t0, 1e-7)
        bursts[name] = max(1, min(50, int(burst_seconds / single)))
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, calls = fns[name], bursts[name]
            for _ in range(untimed):
                fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return times


def median_p90(samples: list[float]) -> tuple[float, float]:
    """The median and the 90th percentile of ``samples``."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered), p90


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)
