"""The datasets that need no files: scikit-learn's bundled 8x8 digits (with its fixed 20% test
split) and ``synthetic`` (class prototypes plus noise, any shape).
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import torch
from torch import Tensor

from .cache import _cached
from .errors import DataError
from .splits import _fixed_test_split


def _decode_digits() -> dict[str, object]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # 0..16 -> [0, 1]
    return {"x": x, "y": torch.from_numpy(bunch.target.astype(np.int64))}


def _load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Importing scikit-learn takes about 0.9 s, longer than a whole trial on the digits often
    # does; its digits are decoded once per scikit-learn version and then read from the cache.
    blob = _cached(["sklearn-digits", metadata.version("scikit-learn")], "digits", _decode_digits, must_write=False)
    x, y = blob["x"], blob["y"]
    assert isinstance(x, Tensor) and isinstance(y, Tensor)
    return _fixed_test_split(x, y)


def _load_synthetic(
    shape: tuple[int, ...], num_classes: int, seed: int, n_train: int = 2048, n_test: int = 512
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class prototypes plus Gaussian noise: learnable, any shape, no files."""
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise DataError(f"synthetic: the shape must be three positive sizes (C, H, W), got {list(shape)}")
    if num_classes < 2:
        raise DataError(f"synthetic: needs at least 2 classes, got {num_classes}")
    gen = torch.Generator().manual_seed(seed + 7)
    prototypes = torch.randn(num_classes, *shape, generator=gen)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        return prototypes[y] + 0.8 * torch.randn(n, *shape, generator=gen), y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte
