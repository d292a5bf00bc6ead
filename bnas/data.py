"""Datasets and loaders.

Names: ``digits`` (scikit-learn's bundled 8x8 digits, no download: the default), ``mnist``,
``fashion_mnist``, ``cifar10``, ``imagefolder:PATH``, ``synthetic``. Every dataset is held as
one uint8/float tensor (on the training device when it fits), so small datasets need no
DataLoader workers; batches are normalised and, for CIFAR, augmented (random crop with 4
pixels of padding + horizontal flip) on the device.

The validation split is carved from the *training* set with a seeded permutation, so a
search never looks at the test set.

Data root: ``--data-root``, else ``$BNAS_DATA``, else ``~/.cache/bnas/data``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import BnasError

__all__ = ["DataError", "DataSplits", "TensorLoader", "load_dataset", "data_root", "DATASETS"]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder:PATH", "synthetic")
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(BnasError):
    """A dataset that cannot be found or used; the message says where bnas looked."""


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$BNAS_DATA``, else the user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("BNAS_DATA"):
        return Path(os.environ["BNAS_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnas" / "data"


@dataclass
class DataSplits:
    """Train / validation / test tensors (uint8 or float images, int64 labels)."""

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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "DataSplits":
        for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
            setattr(self, field, getattr(self, field).to(device))
        return self

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> "TensorLoader":
        x, y = {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y), "test": (self.test_x, self.test_y)}[split]
        return TensorLoader(x, y, self.mean, self.std, batch_size, shuffle, seed, augment=self.augment and split == "train")


class TensorLoader:
    """Batches from in-memory tensors: normalisation and augmentation on the device.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same
    batches as an uninterrupted one.
    """

    def __init__(self, x: Tensor, y: Tensor, mean: Tensor, std: Tensor, batch_size: int, shuffle: bool, seed: int, augment: bool):
        self.x, self.y, self.mean, self.std = x, y, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
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
        xb = xb.float()
        if xb.dtype != self.x.dtype and self.x.dtype == torch.uint8:
            xb = xb / 255.0
        if self.augment and gen is not None:
            xb = _crop_flip(xb, gen)
        return (xb - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = None
        if self.shuffle or self.augment:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.x), generator=gen).to(self.x.device) if self.shuffle else None
        for start in range(0, len(self.x), self.batch_size):
            idx = order[start : start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            yield self._prepare(self.x[idx], gen), self.y[idx]


def _crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop after zero padding, and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    # gather rows then columns (two 1-D gathers are cheaper than building a 2-D index)
    tmp = padded.gather(2, rows[..., :1].expand(n, x.shape[1], h, w + 2 * pad))
    out = tmp.gather(3, cols)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _load_idx_dataset(name: str, root: Path, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = [root / folder / "raw", root / folder, root / name, root / name.replace("_", "-"), root]
    if name == "fashion_mnist":
        dirs.append(_FASHION_SYSTEM_DIR)
    files = {s: _find_idx(dirs, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    if any(f is None for f in files.values()) and download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
        files = {s: _find_idx(dirs, s) for s in files}
    missing = [s for s, f in files.items() if f is None]
    if missing:
        hint = (
            "apt-get install dataset-fashion-mnist (Debian), or " if name == "fashion_mnist" else ""
        ) + f"put the four idx files (.gz or not) in {root / folder / 'raw'}, or pass --download on a machine that is online"
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(f"{name}: missing {', '.join(missing)}; looked in {looked}. To get the data: {hint}")
    arrays = {s: torch.from_numpy(_read_idx(f).copy()) for s, f in files.items()}  # type: ignore[arg-type]
    return (
        arrays["train-images-idx3-ubyte"].unsqueeze(1),
        arrays["train-labels-idx1-ubyte"].long(),
        arrays["t10k-images-idx3-ubyte"].unsqueeze(1),
        arrays["t10k-labels-idx1-ubyte"].long(),
    )


def _load_digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # sklearn ships no test split: a fixed, seeded 20% is held out as the test set.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _load_synthetic(shape: tuple[int, int, int], num_classes: int, seed: int, n_train: int = 2048, n_test: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class prototypes plus noise: learnable, any shape, no files."""
    gen = torch.Generator().manual_seed(seed + 7)
    prototypes = torch.randn(num_classes, *shape, generator=gen)
    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        return prototypes[y] + 0.8 * torch.randn(n, *shape, generator=gen), y
    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte


def _load_cifar10(root: Path, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batches = root / "cifar-10-batches-py"
    jpeg = root / "cifar10-jpeg"
    if not batches.is_dir() and download:
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    if batches.is_dir():
        def read(names: list[str]) -> tuple[Tensor, Tensor]:
            xs, ys = [], []
            for n in names:
                with open(batches / n, "rb") as fh:
                    d = pickle.load(fh, encoding="latin1")  # torchvision's own format: plain arrays
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["labels"], dtype=np.int64))
            return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
        xtr, ytr = read([f"data_batch_{i}" for i in range(1, 6)])
        xte, yte = read(["test_batch"])
        return xtr, ytr, xte, yte
    if (jpeg / "train").is_dir() and (jpeg / "test").is_dir():
        xtr, ytr, classes = _read_image_tree(jpeg / "train")
        xte, yte, _ = _read_image_tree(jpeg / "test", classes)
        return xtr, ytr, xte, yte
    raise DataError(
        f"cifar10: found neither {batches} (torchvision's CIFAR-10 format) nor {jpeg}/train and {jpeg}/test "
        "(an ImageFolder tree of JPEGs). To get the data: pass --download on a machine that is online, or extract "
        "shared/data/cifar10-jpeg/cifar10_jpeg_yoongikim.tar.xz into <data root>/cifar10-jpeg"
    )


def _read_image_tree(folder: Path, classes: list[str] | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Decode an ImageFolder tree (class folders of images of one size) into a uint8 tensor.

    Decoding is cached next to nothing the user owns: in the bnas cache, keyed by the path.
    """
    from PIL import Image

    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnas" / "decoded"
    key = str(folder.resolve()).replace(os.sep, "_")
    cache = cache_dir / f"{key}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return blob["x"], blob["y"], list(blob["classes"])
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders found (expected {folder}/<class>/<image>)")
    images, labels = [], []
    size = None
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).iterdir()):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp"):
                continue
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise DataError(f"{path}: image of shape {arr.shape} while others are {size}; all images must have one size")
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"{folder}: no images found")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"x": x, "y": y, "classes": classes}, tmp)
    os.replace(tmp, cache)
    return x, y, classes


def _load_imagefolder(path: Path, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    if not path.is_dir():
        raise DataError(f"imagefolder: {path} is not a folder (expected PATH/train/<class>/... or PATH/<class>/...)")
    if (path / "train").is_dir() and (path / "test").is_dir():
        xtr, ytr, classes = _read_image_tree(path / "train")
        xte, yte, _ = _read_image_tree(path / "test", classes)
        return xtr, ytr, xte, yte, len(classes)
    x, y, classes = _read_image_tree(path)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = len(x) // 5
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]], len(classes)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    shape: tuple[int, int, int] = (1, 8, 8),
    num_classes: int = 10,
    download: bool = False,
) -> DataSplits:
    """Load ``name`` as train / validation / test tensors (see the module doc for names).

    ``shape`` and ``num_classes`` only matter for ``synthetic``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    base = data_root(root)
    augment = False
    classes = 10
    if name == "digits":
        xtr, ytr, xte, yte = _load_digits(seed)
    elif name in ("mnist", "fashion_mnist"):
        xtr, ytr, xte, yte = _load_idx_dataset(name, base, download)
    elif name == "cifar10":
        xtr, ytr, xte, yte = _load_cifar10(base, download)
        augment = True
    elif name.startswith("imagefolder:"):
        xtr, ytr, xte, yte, classes = _load_imagefolder(Path(name.split(":", 1)[1]).expanduser(), seed)
    elif name == "synthetic":
        xtr, ytr, xte, yte = _load_synthetic(tuple(shape), num_classes, seed)  # type: ignore[arg-type]
        classes = num_classes
    else:
        import difflib

        close = difflib.get_close_matches(name, ["digits", "mnist", "fashion_mnist", "cifar10", "synthetic"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint} (known: {', '.join(DATASETS)})")
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(xtr) * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_x = xtr[train_idx]
    scaled = train_x.float() / 255.0 if train_x.dtype == torch.uint8 else train_x.float()
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return DataSplits(
        name=name, train_x=train_x, train_y=ytr[train_idx], val_x=xtr[val_idx], val_y=ytr[val_idx],
        test_x=xte, test_y=yte, num_classes=classes, mean=mean, std=std, augment=augment,
    )
