"""Dataset sources that need no downloads: image archives, image trees, idx files."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnas.data import DataError, load_dataset

CLASSES = ("cat", "dog", "frog")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # lossless, so pixels compare exactly
    return buf.getvalue()


def _images(seed: int, per_class: int) -> dict[tuple[str, str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        (cls, f"{i:03d}.png"): rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for cls in CLASSES
        for i in range(per_class)
    }


def _archive(path: Path, splits: dict[str, dict[tuple[str, str], np.ndarray]]) -> None:
    with tarfile.open(path, "w:xz") as tar:
        for split, images in splits.items():
            for (cls, name), pixels in images.items():
                data = _png(pixels)
                info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNAS_CACHE", str(tmp_path / "cache"))


def test_cifar10_from_its_jpeg_archive_without_extracting(tmp_path: Path) -> None:
    train, test = _images(0, 4), _images(1, 2)
    (tmp_path / "cifar10-jpeg").mkdir()
    _archive(tmp_path / "cifar10-jpeg" / "copy.tar.xz", {"train": train, "test": test})
    data = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    assert data.input_shape == (3, 32, 32) and len(data.train_x) == 12 and len(data.test_x) == 6
    assert data.augment and "archive" in data.source
    # Labels are the alphabetical class names; pixels arrive exactly, in (class, name) order.
    expected = [(CLASSES.index(cls), pixels) for (cls, _), pixels in sorted(test.items())]
    assert data.test_y.tolist() == [label for label, _ in expected]
    for got, (_, pixels) in zip(data.test_x, expected, strict=True):
        assert torch.equal(got, torch.from_numpy(pixels).permute(2, 0, 1))
    assert [p.name for p in (tmp_path / "cifar10-jpeg").iterdir()] == ["copy.tar.xz"]  # nothing was extracted
    # A second load comes from the decoded cache and is identical.
    again = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    assert torch.equal(again.test_x, data.test_x) and list((tmp_path / "cache" / "decoded").glob("archive-*.pt"))


def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.from_numpy(bunch.images / 16.0).float(), torch.from_numpy(bunch.target)


def test_digits_are_decoded_once_then_read_without_scikit_learn(tmp_path: Path) -> None:
    images, labels = _sklearn_digits()
    first = load_dataset("digits", val_fraction=0.0)
    assert len(list((tmp_path / "cache" / "decoded").glob("digits-*.pt"))) == 1
    again = load_dataset("digits", val_fraction=0.0)
    for split in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, split), getattr(again, split))
    # The splits hold scikit-learn's images (scaled to [0, 1]) and labels, each once.
    x = torch.cat([first.train_x, first.test_x]).squeeze(1)
    y = torch.cat([first.train_y, first.test_y])
    order = sorted(range(len(x)), key=lambda i: x[i].flatten().tolist())
    expected = sorted(range(len(images)), key=lambda i: images[i].flatten().tolist())
    assert torch.equal(x[order], images[expected]) and torch.equal(y[order], labels[expected])
    # A fresh process reads the cache and never imports scikit-learn.
    probe = "import sys; from bnas.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    env = {**os.environ, "BNAS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_load_where_the_cache_cannot_be_written(read_only_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNAS_CACHE", str(read_only_dir / "cache"))
    data = load_dataset("digits", val_fraction=0.0)
    images, _ = _sklearn_digits()
    assert len(data.train_x) + len(data.test_x) == len(images)
    assert not (read_only_dir / "cache").exists()


def test_archive_with_a_test_class_missing_from_train_is_refused(tmp_path: Path) -> None:
    train = {k: v for k, v in _images(0, 2).items() if k[0] != "frog"}
    (tmp_path / "cifar10-jpeg").mkdir()
    _archive(tmp_path / "cifar10-jpeg" / "copy.tar.xz", {"train": train, "test": _images(1, 1)})
    with pytest.raises(DataError, match="test classes frog have no training images"):
        load_dataset("cifar10", tmp_path)


def test_imagefolder_with_train_and_test_trees(tmp_path: Path) -> None:
    for split, images in (("train", _images(0, 3)), ("test", _images(1, 1))):
        for (cls, name), pixels in images.items():
            (tmp_path / "set" / split / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "set" / split / cls / name).write_bytes(_png(pixels))
    data = load_dataset(f"imagefolder:{tmp_path / 'set'}", val_fraction=0.0)
    assert data.num_classes == 3 and len(data.train_x) == 9 and data.test_y.tolist() == [0, 1, 2]


def _idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data[: len(data) - truncate]))


def _idx_set(folder: Path, truncate: int = 0) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 5)):
        _idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28)),
            truncate if prefix == "t10k" else 0,
        )
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_fashion_mnist_from_gzipped_idx_in_torchvision_layout(tmp_path: Path) -> None:
    _idx_set(tmp_path / "FashionMNIST" / "raw")
    data = load_dataset("fashion_mnist", tmp_path, val_fraction=0.25)
    assert data.input_shape == (1, 28, 28) and (len(data.train_x), len(data.val_x), len(data.test_x)) == (15, 5, 5)


def test_truncated_idx_file_names_the_file(tmp_path: Path) -> None:
    _idx_set(tmp_path / "MNIST" / "raw", truncate=7)
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte.gz: \d+ bytes where its header promises \d+; the file is truncated"
    ):
        load_dataset("mnist", tmp_path)


def test_one_dataset_list_for_the_loader_the_search_space_and_the_schema() -> None:
    from bnas import data
    from bnas.schemas import space

    assert data.DATASETS == ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder:PATH", "synthetic")
    assert set(data.DATASETS) == {*data.DATASET_NAMES, data.IMAGEFOLDER + "PATH"}
    assert space.DATASETS is data.DATASET_NAMES
    with pytest.raises(
        DataError,
        match=r"did you mean 'imagefolder:PATH'\?.*known: digits, mnist, fashion_mnist, "
        r"cifar10, imagefolder:PATH, synthetic",
    ):
        load_dataset("imagefolders")
