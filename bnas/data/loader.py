"""Batches out of in-memory tensors: ``TensorLoader`` indexes a batch out of the dataset's
tensors, converts it to float, augments it (CIFAR: random crop of the zero-padded image and a
horizontal flip, seeded per epoch) and normalises it, all on the training device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class TensorLoader:
    """Batches out of in-memory tensors; conversion, augmentation and normalisation per batch.

    The order and the augmentation draws of epoch ``e`` depend only on ``(seed, e)``, so a
    resumed run sees exactly the batches an uninterrupted one would. When the tensors live
    on the CPU and the model on a GPU, ``device`` moves each batch before it is processed.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        mean: Tensor,
        std: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int,
        augment: bool,
        device: torch.device | str | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.device = torch.device(device) if device is not None else x.device
        self.mean = mean.view(1, -1, 1, 1).to(self.device)
        self.std = std.view(1, -1, 1, 1).to(self.device)
        self.batch_size, self.shuffle, self.seed, self.augment = batch_size, shuffle, seed, augment
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _prepare(self, xb: Tensor, gen: torch.Generator | None) -> Tensor:
        xb = xb.to(self.device, non_blocking=True)
        xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
        if self.augment and gen is not None:
            xb = _crop_flip(xb, gen)
        return (xb - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = None
        if self.shuffle or self.augment:
            # CPU generator: the same stream on every device, cheap to seed per epoch.
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.x), generator=gen).to(self.x.device) if self.shuffle else None
        for start in range(0, len(self.x), self.batch_size):
            idx = order[start : start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            yield self._prepare(self.x[idx], gen), self.y[idx].to(self.device, non_blocking=True)


def _crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Per image: a random crop of the zero-padded image (offsets 0..2*pad), then a random
    horizontal flip with probability 1/2. Draws come from ``gen`` (CPU) in a fixed order."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    # Two 1-D gathers (rows, then columns) are cheaper than building a 2-D index.
    out = padded.gather(2, rows).gather(3, cols)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
