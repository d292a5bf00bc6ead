"""How a dataset is split: ``DataSplits`` (the train / validation / test tensors, their
per-channel mean and std, and a ``TensorLoader`` per split), the validation split carved from
the *training* set with the run's seed (so a search never looks at the test set), and the fixed
20% test split (seed 1234) of datasets that come without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DataError
from .loader import TensorLoader

_TEST_SPLIT_SEED = 1234  # fixed: the test set must not move with the run's seed


@dataclass
class DataSplits:
    """Train / validation / test tensors (uint8 images or float values, int64 labels).

    ``mean`` and ``std`` are per channel, on the [0, 1] scale, from the training split.
    ``source`` says in words where the data came from (for reports).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: Tensor
    std: Tensor
    augment: bool = False
    source: str = ""

    _TENSORS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self._TENSORS)

    def to(self, device: torch.device | str) -> DataSplits:
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def loader(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> TensorLoader:
        """Batches of ``split`` (train, val or test), delivered on ``device`` (default: where
        the tensors are)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        return TensorLoader(
            x,
            y,
            self.mean,
            self.std,
            batch_size,
            shuffle,
            seed,
            augment=self.augment and split == "train",
            device=device,
        )


def _fixed_test_split(x: Tensor, y: Tensor, fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
    n_test = int(len(x) * fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def split_validation(
    name: str,
    xtr: Tensor,
    ytr: Tensor,
    xte: Tensor,
    yte: Tensor,
    *,
    num_classes: int,
    val_fraction: float,
    seed: int,
    augment: bool = False,
    source: str = "",
) -> DataSplits:
    """``val_fraction`` of the training set (``xtr``, ``ytr``), drawn with ``seed``, becomes the
    validation split; mean and std come from what is left for training."""
    n_val = int(round(len(xtr) * val_fraction))
    if n_val >= len(xtr):
        raise DataError(f"{name}: val_fraction {val_fraction} leaves no training images out of {len(xtr)}")
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_x = xtr[train_idx]
    scaled = train_x.float() / 255.0 if train_x.dtype == torch.uint8 else train_x.float()
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return DataSplits(
        name=name,
        train_x=train_x,
        train_y=ytr[train_idx],
        val_x=xtr[val_idx],
        val_y=ytr[val_idx],
        test_x=xte,
        test_y=yte,
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment=augment,
        source=source,
    )
