"""CIFAR-10 under the data root, in this order: torchvision's pickled batches
(``cifar-10-batches-py``), a JPEG ImageFolder tree ``cifar10-jpeg/{train,test}``, or that
tree's archive ``cifar10-jpeg/*.tar.xz``; torchvision's download when asked for.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .images import _archives, _read_archive, _read_tree


def _load_cifar10(root: Path, origin: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    batches = root / "cifar-10-batches-py"
    jpeg = root / "cifar10-jpeg"
    if not batches.is_dir() and not (jpeg / "train").is_dir() and not _archives(jpeg) and download:
        import torchvision

        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"cifar10: download into {root} failed ({exc}); is this machine online?") from None
    if batches.is_dir():

        def read(names: list[str]) -> tuple[Tensor, Tensor]:
            xs, ys = [], []
            for n in names:
                path = batches / n
                if not path.is_file():
                    raise DataError(f"cifar10: {path} is missing; {batches} is incomplete (download it again)")
                with open(path, "rb") as fh:
                    # torchvision's own format is a pickle of plain arrays and lists.
                    d = pickle.load(fh, encoding="latin1")
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["labels"], dtype=np.int64))
            return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

        xtr, ytr = read([f"data_batch_{i}" for i in range(1, 6)])
        xte, yte = read(["test_batch"])
        return xtr, ytr, xte, yte, f"torchvision CIFAR-10 batches in {batches}"
    if (jpeg / "train").is_dir() and (jpeg / "test").is_dir():
        xtr, ytr, classes = _read_tree(jpeg / "train")
        xte, yte, _ = _read_tree(jpeg / "test", classes)
        return xtr, ytr, xte, yte, f"CIFAR-10 (JPEG copy, lossy) from the image tree {jpeg}"
    archives = _archives(jpeg)
    if archives:
        xtr, ytr, xte, yte, _ = _read_archive(archives[0])
        return xtr, ytr, xte, yte, f"CIFAR-10 (JPEG copy, lossy) from the archive {archives[0]}"
    raise DataError(
        f"cifar10: found none of {batches} (torchvision's format), {jpeg}/train + {jpeg}/test (a JPEG image tree) "
        f"or an archive {jpeg}/*.tar.xz (data root {root}, from {origin}). To get the data: add --download on a "
        f"machine that is online, or put the JPEG archive (e.g. shared/data/cifar10-jpeg/cifar10_jpeg_yoongikim.tar.xz) "
        f"in {jpeg} (bnas reads it without extracting), or extract it there: "
        f"mkdir -p {jpeg} && tar xJf cifar10_jpeg_yoongikim.tar.xz -C {jpeg}"
    )
