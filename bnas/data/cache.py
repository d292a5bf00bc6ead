"""The decoded-data cache: image trees, archives and scikit-learn's digits are decoded once
and kept as tensors in ``bnas.paths.cache_dir("decoded")`` under a key of the caller's choosing
(path, size and modification time; the library's version); a damaged entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable

import torch

from ..atomic import WriteError, atomic_path
from ..paths import cache_dir

log = logging.getLogger(__name__)


def _cached(
    key_parts: list[str], what: str, make: Callable[[], dict[str, object]], must_write: bool = True
) -> dict[str, object]:
    """Decode once: the tensors of ``make()`` are kept in the bnas cache under a stable key.

    ``must_write=False`` is for data that needs no cache (the digits load without one): a
    cache folder that cannot be written is then logged and the decoded tensors returned."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:24]
    cache = cache_dir("decoded") / f"{what}-{key}.pt"
    if cache.is_file():
        try:
            # a cache entry, not a checkpoint (bnas.train.load_checkpoint): a bad one is rebuilt
            return torch.load(cache, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            pass  # a damaged cache entry is simply rebuilt
    blob = make()
    try:
        with atomic_path(cache, "decoded-data cache file") as tmp:
            torch.save(blob, tmp)
    except WriteError as exc:
        if must_write:
            raise
        log.info("%s; decoding again next time", exc)
    return blob
