"""``bnas export GENOTYPE CHECKPOINT --out model.bnas``: pack a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import check_writable_file
from ..export import export
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="pack a trained checkpoint into a 1-bit inference model file (.bnas) for the XNOR kernels"
    )
    p.add_argument("genotype", help="genotype YAML file the checkpoint was trained from")
    p.add_argument("checkpoint", help="checkpoint.pt (trainer checkpoint) or model.pt (state_dict) from bnas eval")
    p.add_argument("--out", required=True, help="packed model file to write (e.g. model.bnas)")
    add_catalog_argument(p)
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    # before reading the checkpoint: --out is a file, and its folder must take one
    check_writable_file(Path(args.out), "--out", example="model.bnas")
    load_catalogs(args)  # before the genotype is built: its ops may be the catalogs' presets
    packed, path = export(args.genotype, args.checkpoint, args.out)
    kinds: dict[str, int] = {}
    for entry in packed.layers:
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB; {summary}); "
        f"checkpoint {Path(args.checkpoint).stat().st_size / 1024:.1f} KiB"
    )
    return 0
