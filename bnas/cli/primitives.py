"""``bnas primitives``: the registered ops, one line each."""

from __future__ import annotations

import argparse
import json

from ..errors import BnasError
from ..registry import list_primitives

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("primitives", help="list the registered primitives (name, family, binarization)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--filter", metavar="PATTERN", help="only names matching a shell-style pattern, e.g. 'xnor_*'")
    p.set_defaults(handler=run_primitives)


def run_primitives(args: argparse.Namespace) -> int:
    specs = list_primitives(args.filter)
    if not specs:
        raise BnasError(f"no primitive matches {args.filter!r}; run `bnas primitives` for the list")
    if args.json:
        print(
            json.dumps(
                [
                    {"name": s.name, "family": s.family, "binarize": s.binarize, "description": s.description}
                    for s in specs
                ]
            )
        )
        return 0
    width = max(len(s.name) for s in specs)
    fwidth = max(len(s.family) for s in specs)
    bwidth = max(len(s.binarize) for s in specs)
    print(f"{'name'.ljust(width)}  {'family'.ljust(fwidth)}  {'binarize'.ljust(bwidth)}  description")
    for s in specs:
        print(f"{s.name.ljust(width)}  {s.family.ljust(fwidth)}  {s.binarize.ljust(bwidth)}  {s.description}")
    return 0
