"""How many threads an inference call may use now: torch's thread count, capped at the cores
that no other process is running on.

A parallel float op (and a kernel call on torch's OpenMP team, see ``csrc/work_pool.h``) ends
in a barrier that waits for all its threads. When another process holds one of the cores, one
of those threads waits for the OS to schedule it, and the call takes many times its 1-thread
time. :class:`ThreadBudget` looks at what the machine runs (``/proc/stat``'s count of
runnable threads, less this process's own) at most every ``interval_s`` seconds, and
:func:`torch_threads` lowers torch's thread count for the length of one call when fewer cores
are free than it asks for. ``bnas.export.PackedNetwork`` does this on every forward unless
its ``adaptive_threads`` is False.

Where ``/proc`` cannot be read (not Linux), the budget is torch's thread count unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

SAMPLE_INTERVAL_S = 0.05  # a sample costs about 0.1 ms; a packed forward takes 1-10 ms


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _procs_running(stat: bytes) -> int | None:
    for line in stat.splitlines():
        if line.startswith(b"procs_running "):
            return int(line.split()[1])
    return None


def _own_running_threads(task_dir: str) -> int:
    running = 0
    for tid in os.listdir(task_dir):
        try:
            with open(os.path.join(task_dir, tid, "stat"), "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        # The state follows the command name, which may itself hold spaces and parentheses.
        end = stat.rfind(b")")
        if stat[end + 2 : end + 3] == b"R":
            running += 1
    return running


def running_elsewhere(proc: str = "/proc") -> int | None:
    """Threads of other processes running or ready to run at this moment, or None where
    ``/proc`` cannot be read. This process's own threads are left out: torch's OpenMP workers
    and the kernels' helpers spin between calls and would otherwise count as a neighbour."""
    try:
        with open(os.path.join(proc, "stat"), "rb") as f:
            total = _procs_running(f.read())
        own = _own_running_threads(os.path.join(proc, "self", "task"))
    except OSError:
        return None
    if total is None:
        return None
    return max(0, total - own)


class ThreadBudget:
    """``threads(wanted)``: ``wanted`` capped at the cores free now (at least 1), from samples
    of the machine taken at most every ``interval_s`` seconds. A core counts as busy when the
    last two samples both saw it so: a neighbour that holds a core shows in every sample,
    while a thread that runs for a moment (or one of ours seen between two reads as running
    and then as asleep: 3 % of samples on an idle machine) would otherwise cost a fast call."""

    def __init__(
        self,
        interval_s: float = SAMPLE_INTERVAL_S,
        sample: Callable[[], int | None] = running_elsewhere,
        cores: Callable[[], int] = cores_available,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._sample, self._cores, self._clock = sample, cores, clock
        self._sampled_at: float | None = None
        self._last_busy: int | None = None
        self._free: int | None = None

    def free_cores(self) -> int | None:
        """Cores no other process is running on, as last sampled (None: unknown)."""
        now = self._clock()
        if self._sampled_at is None or now - self._sampled_at >= self.interval_s:
            sampled = self._sample()
            busy = sampled if sampled is None or self._last_busy is None else min(sampled, self._last_busy)
            self._free = None if busy is None else max(1, self._cores() - busy)
            self._last_busy, self._sampled_at = sampled, now
        return self._free

    def threads(self, wanted: int) -> int:
        if wanted <= 1:
            return max(1, wanted)
        free = self.free_cores()
        return wanted if free is None else min(wanted, free)


#: The budget ``PackedNetwork`` uses: one per process, so every network sees the same sample.
PROCESS_BUDGET = ThreadBudget()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block, restored after it.
    The setting is process-wide: other Python threads running torch meanwhile see it too."""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
