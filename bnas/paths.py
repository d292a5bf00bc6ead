"""Where bnas keeps what it can rebuild: one rule for every cache folder.

``cache_dir(kind)`` is ``$BNAS_CACHE/<kind>`` when ``$BNAS_CACHE`` is set, else
``$XDG_CACHE_HOME/bnas/<kind>``, else ``~/.cache/bnas/<kind>``. The kinds in use:

=============  =========================================================================
``extensions`` the compiled CPU XNOR kernels (one folder per torch / Python build)
``kernels``    the compiled host emulator of the CUDA kernel (tests only)
``decoded``    image trees, archives and the digits decoded to tensors (``bnas.data``)
``data``       the default data root when neither ``--data-root`` nor ``$BNAS_DATA`` is set
=============  =========================================================================

Everything under it can be deleted at any time; it is built again on the next use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir", "cache_root"]

CACHE_ENV = "BNAS_CACHE"


def cache_root() -> Path:
    """``$BNAS_CACHE``, else ``$XDG_CACHE_HOME/bnas``, else ``~/.cache/bnas`` (not created)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    # An empty XDG_CACHE_HOME means "unset" (the XDG base-directory spec).
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bnas"


def cache_dir(kind: str) -> Path:
    """The cache folder for ``kind`` (a single folder name), under :func:`cache_root`; not
    created here, since asking where a cache would be must not write anything."""
    if not kind or kind in (".", "..") or "/" in kind or os.sep in kind:
        raise ValueError(f"a cache kind is one folder name, got {kind!r}")
    return cache_root() / kind
