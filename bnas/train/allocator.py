"""glibc ``mallopt`` tuning for CPU training (large tensors reuse freed heap, not fresh pages)."""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_cpu_allocator"]

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_ALLOCATOR_TUNED: bool | None = None


def tune_cpu_allocator(enable: bool = True) -> bool:
    """Let glibc reuse freed memory for large tensors instead of mapping fresh pages.

    glibc serves every allocation above 32 MiB with a fresh ``mmap``, and each of its pages
    faults on first touch. A binary layer materialises ``sign(W)`` (as large as its weight)
    every step, so for the 4096-wide BinaryNet MLP these faults cost more than the sign
    itself: the binary/float step-time ratio drops from about 1.4-1.7 to about 1.2-1.25 with
    this (``benchmarks/train_step.py`` measures both), and float steps get faster too.
    It sets ``M_MMAP_MAX = 0`` and a high ``M_TRIM_THRESHOLD``: process-wide, so the process
    keeps its peak heap instead of returning it to the OS. Linux with glibc only; a no-op
    elsewhere or when ``$BNAS_MALLOC_TUNE`` is ``0``. ``enable=False`` restores glibc's
    defaults. Returns whether the tuning is in effect.
    """
    global _ALLOCATOR_TUNED
    if enable and (_ALLOCATOR_TUNED or os.environ.get("BNAS_MALLOC_TUNE", "1") == "0"):
        return bool(_ALLOCATOR_TUNED)
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt knobs)
    except (OSError, AttributeError):
        return False
    if enable:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    else:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok
