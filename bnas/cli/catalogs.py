"""``--catalog FILE`` (repeatable) on the commands that build genotypes: a user's named
presets, registered before the genotype is read, so they work without writing Python."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..registry import load_catalog

__all__ = ["add_catalog_argument", "load_catalogs"]

log = logging.getLogger(__name__)


def add_catalog_argument(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--catalog FILE`` flag to one subcommand."""
    parser.add_argument(
        "--catalog",
        metavar="FILE",
        action="append",
        default=[],
        help="catalog YAML of your own op presets and binarizations (repeatable; see primitives/*.yaml)",
    )


def load_catalogs(args: argparse.Namespace) -> list[str]:
    """Register the presets of every ``--catalog`` file, in the order given; returns the files
    as absolute paths (a search records them). A bad file is a one-line ``CatalogError``
    naming it."""
    loaded = []
    for file in args.catalog or []:
        # Resolved: the same file given twice, or again by a search space, is one catalog.
        path = Path(file).resolve()
        names = load_catalog(path)
        log.debug("catalog %s: %s", file, ", ".join(names) or "no ops")
        loaded.append(str(path))
    return loaded
