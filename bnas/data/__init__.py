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

Modules, one job each: ``names`` (the dataset names), ``root`` (the data root), ``errors``
(``DataError``), ``splits`` (``DataSplits``, the validation and fixed test splits), ``loader``
(``TensorLoader``: batches, augmentation, normalisation), ``bundled`` (digits, synthetic),
``idx`` (MNIST, Fashion-MNIST), ``images`` (image trees and archives), ``cache`` (the
decoded-data cache), ``cifar`` (CIFAR-10), ``imagefolder`` (``imagefolder:PATH``) and
``sources`` (``load_dataset``, dispatching by name).
"""

from __future__ import annotations

from .errors import DataError
from .loader import TensorLoader
from .names import DATASET_NAMES, DATASETS, IMAGEFOLDER
from .root import data_root
from .sources import load_dataset
from .splits import DataSplits

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
