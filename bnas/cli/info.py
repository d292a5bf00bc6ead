"""``bnas info GENOTYPE.yaml``: the per-layer and total summary, and the cell pictures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..atomic import check_writable_file
from ..builder import build
from ..errors import BnasError
from ..genotype import load_genotype
from ..metrics import summarize
from ..signal_flow import constant_output
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="per-layer and total summary of a genotype (params, BOPs, FLOPs, OPs, size)")
    p.add_argument("genotype", help="genotype YAML file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--graph", metavar="FILE", help="also draw each cell DAG into FILE (.png, .svg, .pdf)")
    add_catalog_argument(p)
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    load_catalogs(args)  # before the genotype: its ops may be the catalogs' presets
    genotype = load_genotype(args.genotype)
    if args.graph:
        check_writable_file(Path(args.graph), "--graph", example="cells.png")
    model = build(genotype)
    summary = summarize(model, genotype.input)
    if args.graph:
        from ..visualize import draw_cells  # matplotlib: only when a picture is asked for

        try:
            path = draw_cells(genotype, args.graph)
        except ValueError as exc:
            raise BnasError(str(exc)) from exc
        print(f"cell graph written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({"name": genotype.name, **summary.to_dict()}))
    else:
        print(f"{genotype.name}  (input {'x'.join(map(str, genotype.input))}, {genotype.num_classes} classes)")
        print(summary.table())
    constant = constant_output(genotype)
    if constant is not None:
        print(f"warning: the network's output does not depend on its input: {constant}", file=sys.stderr)
    return 0
