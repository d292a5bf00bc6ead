"""Shared helpers for the benchmark scripts: machine description, timing, JSON lines."""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any, Callable

import torch


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}
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


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)
