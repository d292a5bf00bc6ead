"""Image trees and tar archives as uint8 tensors: an ImageFolder tree (``<class>/<image>``, all
of one size) or an archive of ``[prefix/]{train,test}/<class>/<image>`` read in one streaming
pass without extracting, both decoded once through the decoded-data cache.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from .cache import _cached
from .errors import DataError

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")


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
