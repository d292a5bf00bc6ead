"""Importers: genotypes published in other NAS codebases' formats -> bnas genotypes.

Each importer reads the foreign text as data (never executes it) and returns a validated
``bnas.genotype.Genotype``. Nothing below ``bnas.importers`` imports it: it sits on top of
the genotype, the registry and the builder.
"""

from __future__ import annotations

from .darts import DartsFormatError, DartsGenotype, import_darts, parse_darts

__all__ = ["DartsFormatError", "DartsGenotype", "import_darts", "parse_darts"]
