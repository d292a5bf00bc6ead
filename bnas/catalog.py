"""Everything registered: the op families of ``bnas.ops`` and the shipped catalog files.

This module sits above both the registry and the ops: importing it imports the families
(they register as they are imported, as timm's models do) and installs the loader of
``primitives/*.yaml`` in the registry, which runs on the first query. ``import bnas``
imports it, so no caller has to.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (importing registers the op families)
from .registry import load_catalog, set_catalog_loader
from .resources import resource_dir

__all__ = ["load_shipped_catalog"]


def load_shipped_catalog() -> None:
    """Register the named presets of every shipped ``primitives/*.yaml`` file."""
    for path in sorted(resource_dir("primitives").glob("*.yaml")):
        load_catalog(path)


set_catalog_loader(load_shipped_catalog)
