"""Datasets and loaders.

Names (``DATASETS``):

=====================  ===================================================================
``digits``             scikit-learn's bundled 8x8 digits (1x8x8, 1797 images, no files,
                       no download): the default. Pixels 0..16 are scaled to [0, 1]. The
                       test set is a fixed 20% (seed 1234, independent of the run's seed).
``mnist``              1x28x28. The four idx files, gzipped or not, in
``fashion_mnist``      ``<root>/MNIST/raw`` / ``<root>/FashionMNIST/raw`` (torchvision's
                       layout; ``<root>/MNIST``, ``<root>/mnist`` and ``<root>`` work too).
                       Fashion-MNIST is also found in ``/usr/share/datasets/fashion-mnist``
                       (Debian's ``dataset-fashion-mnist``).
``cifar10``            3x32x32, in this order: torchvision's ``<root>/cifar-10-batches-py``;
                       an ImageFolder tree ``<root>/cifar10-jpeg/{train,test}/<class>/*.jpg``;
                       or the archive of that tree itself (``<root>/cifar10-jpeg/*.tar.xz``,
                       read without extracting). Class indices are the alphabetical class
                       names, which is torchvision's CIFAR-10 order too.
``imagefolder:PATH``   ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``, or
                       ``PATH/<class>/*`` with a fixed 20% test split (seed 1234). All images
                       must have one size; they are held in memory.
``synthetic``          class prototypes plus noise, any shape (for tests; learnable).
=====================  ===================================================================

Decoded image trees and archives are cached as tensors in ``bnas.paths.cache_dir("decoded")``
(``$BNAS_CACHE/decoded``, else ``~/.cache/bnas/decoded``; ``$XDG_CACHE_HOME`` is honoured),
keyed by path, size and modification time.

Every dataset is held as one uint8 (images) or float tensor, on the training device when it
fits, so small datasets need no DataLoader workers: batches are indexed out of the tensor,
converted to float, augmented (CIFAR: random crop with 4 pixels of zero padding and a
horizontal flip) and normalised with the training split's per-channel mean and std, all on
the device.

The validation split is carved from the *training* set with a permutation seeded by the
run's seed, so a search never looks at the test set.

Data root: ``--data-root``, else ``$BNAS_DATA``, else ``bnas.paths.cache_dir("data")``
(``~/.cache/bnas/data`` unless ``$BNAS_CACHE`` or ``$XDG_CACHE_HOME`` is set).
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path
from ..paths import cache_dir
from .errors import DataError
from .loader import TensorLoader
from .names import DATASET_NAMES, DATASETS, IMAGEFOLDER
from .root import _root_origin, data_root
from .splits import _TEST_SPLIT_SEED, DataSplits, _fixed_test_split, split_validation

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "IMAGEFOLDER",
    "DataError",
    "DataSplits",
    "TensorLoader",
    "data_root",
    "load_dataset",
]

_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")


# --------------------------------------------------------------------------------------
# idx files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Bundled and generated data
# --------------------------------------------------------------------------------------


def _load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # 0..16 -> [0, 1]
    y = torch.from_numpy(bunch.target.astype(np.int64))
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


# --------------------------------------------------------------------------------------
# Image trees and archives (CIFAR-10 JPEG copy, imagefolder:PATH)
# --------------------------------------------------------------------------------------
def _decode(data: bytes | Path, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from None


def _stack(samples: list[tuple[str, str, np.ndarray]], classes: list[str], where: str) -> tuple[Tensor, Tensor]:
    """(class, file name, HxWx3 array) samples -> N x 3 x H x W uint8 and labels, sorted."""
    if not samples:
        raise DataError(f"{where}: no images found (expected <class>/<image> with {', '.join(_IMAGE_SUFFIXES)})")
    samples.sort(key=lambda s: (classes.index(s[0]), s[1]))
    shapes = {s[2].shape for s in samples}
    if len(shapes) > 1:
        raise DataError(f"{where}: images of several sizes {sorted(shapes)[:4]}; all images must have one size")
    x = torch.from_numpy(np.stack([s[2] for s in samples])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([classes.index(s[0]) for s in samples], dtype=torch.int64)
    return x, y


def _cached(key_parts: list[str], what: str, make: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Decode once: the tensors of ``make()`` are kept in the bnas cache under a stable key."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:24]
    cache = cache_dir("decoded") / f"{what}-{key}.pt"
    if cache.is_file():
        try:
            # a cache entry, not a checkpoint (bnas.train.load_checkpoint): a bad one is rebuilt
            return torch.load(cache, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
            pass  # a damaged cache entry is simply rebuilt
    blob = make()
    with atomic_path(cache, "decoded-data cache file") as tmp:
        torch.save(blob, tmp)
    return blob


def _tree_signature(folder: Path) -> list[str]:
    parts = [str(folder.resolve())]
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        names = os.listdir(cls)
        parts.append(f"{cls.name}:{len(names)}:{cls.stat().st_mtime_ns}")
    return parts


def _read_tree(folder: Path, classes: list[str] | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """An ImageFolder tree (class folders of images of one size) as uint8 tensors."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = classes or found
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{folder}: class folders {', '.join(unknown)} are not in the training classes {', '.join(classes)}"
        )

    def make() -> dict[str, object]:
        samples = []
        for cls in classes:
            if not (folder / cls).is_dir():
                continue
            for path in sorted((folder / cls).iterdir()):
                if path.suffix.lower() in _IMAGE_SUFFIXES:
                    samples.append((cls, path.name, _decode(path, str(path))))
        x, y = _stack(samples, classes, str(folder))
        return {"x": x, "y": y, "classes": list(classes)}

    blob = _cached(_tree_signature(folder) + classes, "tree", make)
    # the cache holds what make() returned: tensors and a list of class names
    return cast(Tensor, blob["x"]), cast(Tensor, blob["y"]), list(cast("list[str]", blob["classes"]))


def _read_archive(archive: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """A tar archive of ``[prefix/]{train,test}/<class>/<image>``, read without extracting."""

    def make() -> dict[str, object]:
        samples: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
        try:
            with tarfile.open(archive, "r|*") as tar:  # streaming: one pass through the archive
                for member in tar:
                    parts = Path(member.name).parts
                    if not member.isfile() or len(parts) < 3 or Path(parts[-1]).suffix.lower() not in _IMAGE_SUFFIXES:
                        continue
                    split, cls, name = parts[-3:]
                    if split in samples:
                        fh = tar.extractfile(member)
                        if fh is not None:
                            samples[split].append((cls, name, _decode(fh.read(), f"{archive}:{member.name}")))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{archive}: cannot be read as a tar archive ({exc})") from None
        classes = sorted({s[0] for s in samples["train"]})
        if not samples["train"] or not samples["test"]:
            raise DataError(f"{archive}: expected train/<class>/<image> and test/<class>/<image> inside")
        stray = sorted({s[0] for s in samples["test"]} - set(classes))
        if stray:
            raise DataError(f"{archive}: test classes {', '.join(stray)} have no training images")
        xtr, ytr = _stack(samples["train"], classes, f"{archive}:train")
        xte, yte = _stack(samples["test"], classes, f"{archive}:test")
        return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte, "classes": classes}

    st = archive.stat()
    blob = _cached([str(archive.resolve()), str(st.st_size), str(st.st_mtime_ns)], "archive", make)
    train_x, train_y, test_x, test_y = (cast(Tensor, blob[k]) for k in ("train_x", "train_y", "test_x", "test_y"))
    return train_x, train_y, test_x, test_y, list(cast("list[str]", blob["classes"]))


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_ARCHIVE_SUFFIXES))


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


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
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
    """Load ``name`` as train / validation / test splits (see the module doc for names).

    ``val_fraction`` of the training set, drawn with ``seed``, becomes the validation split.
    ``shape`` and ``num_classes`` only matter for ``synthetic``. ``download`` lets torchvision
    fetch MNIST, Fashion-MNIST or CIFAR-10 into the data root when they are missing.
    """
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    base, origin = data_root(root), _root_origin(root)
    augment = False
    classes = 10
    if name == "digits":
        xtr, ytr, xte, yte = _load_digits()
        source = "scikit-learn's bundled 8x8 digits (20% held out as the test set, seed 1234)"
    elif name in ("mnist", "fashion_mnist"):
        xtr, ytr, xte, yte, source = _load_idx_dataset(name, base, origin, download)
    elif name == "cifar10":
        xtr, ytr, xte, yte, source = _load_cifar10(base, origin, download)
        augment = True
    elif name.startswith(IMAGEFOLDER) and name[len(IMAGEFOLDER) :]:
        xtr, ytr, xte, yte, classes, source = _load_imagefolder(Path(name.split(":", 1)[1]).expanduser())
    elif name == "synthetic":
        xtr, ytr, xte, yte = _load_synthetic(tuple(shape), int(num_classes), seed)
        classes = int(num_classes)
        source = f"synthetic prototypes + noise, shape {list(shape)}, {classes} classes"
    else:
        imagefolder = IMAGEFOLDER.rstrip(":")
        close = difflib.get_close_matches(name.split(":", 1)[0], (*DATASET_NAMES, imagefolder), n=1)
        hint = f"; did you mean {close[0] + (':PATH' if close[0] == imagefolder else '')!r}?" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint} (known: {', '.join(DATASETS)})")
    return split_validation(
        name,
        xtr,
        ytr,
        xte,
        yte,
        num_classes=classes,
        val_fraction=val_fraction,
        seed=seed,
        augment=augment,
        source=source,
    )
