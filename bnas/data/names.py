"""The dataset names: the one list that ``load_dataset``, the search space, the schemas and
the command line share (``DATASET_NAMES``, the ``imagefolder:`` prefix and ``DATASETS``, every
form a name takes as the docs and error messages list them).
"""

from __future__ import annotations

# The one list of dataset names (the search space and the schemas import it): the fixed
# names, and ``imagefolder:PATH``, which takes a folder after the prefix.
DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")
IMAGEFOLDER = "imagefolder:"
# Every form a dataset name takes, as the docs and error messages list them.
DATASETS = (*DATASET_NAMES[:4], f"{IMAGEFOLDER}PATH", *DATASET_NAMES[4:])
