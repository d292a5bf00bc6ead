"""``imagefolder:PATH``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``, or ``PATH/<class>/*``
with the fixed 20% test split (seed 1234).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .errors import DataError
from .images import _read_tree
from .splits import _TEST_SPLIT_SEED, _fixed_test_split


def _load_imagefolder(path: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, int, str]:
    if not path.is_dir():
        raise DataError(
            f"imagefolder: {path} is not a folder (expected PATH/train/<class>/<image> and PATH/test/<class>/<image>, or PATH/<class>/<image>)"
        )
    if (path / "train").is_dir() and (path / "test").is_dir():
        xtr, ytr, classes = _read_tree(path / "train")
        xte, yte, _ = _read_tree(path / "test", classes)
        return xtr, ytr, xte, yte, len(classes), f"image tree {path}/train, {path}/test"
    x, y, classes = _read_tree(path)
    xtr, ytr, xte, yte = _fixed_test_split(x, y)
    return (
        xtr,
        ytr,
        xte,
        yte,
        len(classes),
        f"image tree {path} (20% held out as the test set, seed {_TEST_SPLIT_SEED})",
    )
