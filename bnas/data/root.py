"""Where datasets live: the data root (``--data-root``, else ``$BNAS_DATA``, else
``bnas.paths.cache_dir("data")``) and, for error messages, which of those three chose it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..paths import cache_dir


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$BNAS_DATA``, else the user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("BNAS_DATA"):
        return Path(os.environ["BNAS_DATA"]).expanduser()
    return cache_dir("data")


def _root_origin(root: str | os.PathLike[str] | None) -> str:
    if root is not None:
        return "--data-root"
    if os.environ.get("BNAS_DATA"):
        return "$BNAS_DATA"
    return "the default data root; set --data-root or $BNAS_DATA to use another"
