"""``load_dataset``: a dataset name dispatched to its reader (digits, MNIST / Fashion-MNIST,
CIFAR-10, ``imagefolder:PATH``, synthetic), then split into train / validation / test.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .bundled import _load_digits, _load_synthetic
from .cifar import _load_cifar10
from .errors import DataError
from .idx import _load_idx_dataset
from .imagefolder import _load_imagefolder
from .names import DATASET_NAMES, DATASETS, IMAGEFOLDER
from .root import _root_origin, data_root
from .splits import DataSplits, split_validation


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
    """Load ``name`` as train / validation / test splits (see the ``bnas.data`` doc for names).

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
