"""``bnas schema KIND``: the JSON Schema of a file format, for editors' YAML language servers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import check_writable_file, write_text_atomic
from ..schemas import KINDS, json_schema_text

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of a file format, for editors with a YAML language server")
    p.add_argument("kind", choices=KINDS, help="the file format")
    p.add_argument("--out", metavar="FILE", help="write the schema to FILE instead of printing it")
    p.set_defaults(handler=run_schema)


def run_schema(args: argparse.Namespace) -> int:
    text = json_schema_text(args.kind)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    check_writable_file(Path(args.out), "--out", example=f"{args.kind}.schema.json")
    write_text_atomic(args.out, text)
    print(f"JSON Schema written to {args.out}", file=sys.stderr)
    return 0
