"""MNIST and Fashion-MNIST from their four idx files (gzipped or not): where to look under the
data root (torchvision's layout and a few others, Debian's ``dataset-fashion-mnist``), reading
and checking the files, and torchvision's download when asked for.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); replace the file") from None
    if len(data) < 4:
        raise DataError(f"{path}: not an idx file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (header {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims)) + 4 + 4 * ndim
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes where its header promises {expected}; the file is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(dirs: Iterable[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _load_idx_dataset(name: str, root: Path, origin: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = list(dict.fromkeys([root / folder / "raw", root / folder, root / name, root / name.replace("_", "-"), root]))
    if name == "fashion_mnist":
        dirs.append(_FASHION_SYSTEM_DIR)
    files = {s: _find_idx(dirs, s) for s in _IDX_FILES}
    if any(f is None for f in files.values()) and download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{name}: download into {root} failed ({exc}); is this machine online?") from None
        files = {s: _find_idx(dirs, s) for s in files}
    missing = [s for s, f in files.items() if f is None]
    if missing:
        debian = (
            "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), or "
            if name == "fashion_mnist"
            else ""
        )
        raise DataError(
            f"{name}: missing {', '.join(m + '[.gz]' for m in missing)}; looked in {', '.join(str(d) for d in dirs)} "
            f"(data root {root}, from {origin}). To get the data: {debian}put the four idx files (gzipped or not) "
            f"in {root / folder / 'raw'}, or pass --data-root with a folder that has them, or add --download on a "
            "machine that is online (torchvision downloads them there)"
        )
    arrays = {s: torch.from_numpy(_read_idx(f).copy()) for s, f in files.items()}  # type: ignore[arg-type]
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    test_x, test_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.dim() != 3 or len(images) != len(labels):
            raise DataError(f"{name}: {split} images {list(images.shape)} do not match {len(labels)} labels")
    where = sorted({str(f.parent) for f in files.values() if f is not None})
    return train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(), f"idx files in {', '.join(where)}"
