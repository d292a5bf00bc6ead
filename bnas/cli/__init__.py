"""The ``bnas`` command (also ``python -m bnas``).

User errors (``BnasError``) print one line, ``error: ...``, and exit with code 2; there is
never a Python traceback for bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import BnasError

Handler = Callable[[argparse.Namespace], int]


def _cmd_primitives(args: argparse.Namespace) -> int:
    from .registry import list_primitives

    specs = list_primitives(args.filter)
    if not specs:
        raise BnasError(f"no primitive matches {args.filter!r}; run `bnas primitives` for the list")
    if args.json:
        print(json.dumps([{"name": s.name, "family": s.family, "binarize": s.binarize, "description": s.description} for s in specs]))
        return 0
    width = max(len(s.name) for s in specs)
    fwidth = max(len(s.family) for s in specs)
    bwidth = max(len(s.binarize) for s in specs)
    print(f"{'name'.ljust(width)}  {'family'.ljust(fwidth)}  {'binarize'.ljust(bwidth)}  description")
    for s in specs:
        print(f"{s.name.ljust(width)}  {s.family.ljust(fwidth)}  {s.binarize.ljust(bwidth)}  {s.description}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .builder import build
    from .genotype import load_genotype
    from .metrics import summarize

    genotype = load_genotype(args.genotype)
    if args.graph:
        from .atomic import check_writable_file

        check_writable_file(Path(args.graph), "--graph", example="cells.png")
    model = build(genotype)
    summary = summarize(model, genotype.input)
    if args.graph:
        from .visualize import draw_cells

        try:
            path = draw_cells(genotype, args.graph)
        except ValueError as exc:
            raise BnasError(str(exc)) from None
        print(f"cell graph written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({"name": genotype.name, **summary.to_dict()}))
    else:
        print(f"{genotype.name}  (input {'x'.join(map(str, genotype.input))}, {genotype.num_classes} classes)")
        print(summary.table())
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="per-layer and total summary of a genotype (params, BOPs, FLOPs, OPs, size)")
    p.add_argument("genotype", help="genotype YAML file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--graph", metavar="FILE", help="also draw each cell DAG into FILE (.png, .svg, .pdf)")
    p.set_defaults(handler=_cmd_info)


def _add_primitives(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("primitives", help="list the registered primitives (name, family, binarization)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--filter", metavar="PATTERN", help="only names matching a shell-style pattern, e.g. 'xnor_*'")
    p.set_defaults(handler=_cmd_primitives)


def _cmd_schema(args: argparse.Namespace) -> int:
    from .schemas import json_schema_text

    text = json_schema_text(args.kind)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from .atomic import check_writable_file, write_text_atomic

    check_writable_file(Path(args.out), "--out", example=f"{args.kind}.schema.json")
    write_text_atomic(args.out, text)
    print(f"JSON Schema written to {args.out}", file=sys.stderr)
    return 0


def _add_schema(sub: argparse._SubParsersAction) -> None:
    from .schemas import KINDS

    p = sub.add_parser("schema", help="print the JSON Schema of a file format, for editors with a YAML language server")
    p.add_argument("kind", choices=KINDS, help="the file format")
    p.add_argument("--out", metavar="FILE", help="write the schema to FILE instead of printing it")
    p.set_defaults(handler=_cmd_schema)


def _add_optional(sub: argparse._SubParsersAction, module: str, name: str, help_text: str) -> None:
    """Subcommands whose logic lives in their own module (``add_*_arguments`` / ``run_*``)."""
    import importlib

    mod = importlib.import_module(f"bnas.{module}")
    p = sub.add_parser(name, help=help_text)
    getattr(mod, f"add_{name}_arguments")(p)
    p.set_defaults(handler=getattr(mod, f"run_{name}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnas", description="Neural architecture search over binary neural networks.")
    parser.add_argument("--version", action="version", version=f"bnas {__import__('bnas').__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", dest="log_verbose", action="store_true", help="also log debug messages")
    verbosity.add_argument("-q", "--quiet", dest="log_quiet", action="store_true",
                           help="log warnings and errors only (progress bars: each command's own --quiet)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_primitives(sub)
    _add_info(sub)
    _add_schema(sub)
    for module, name, help_text in _SUBCOMMANDS:
        _add_optional(sub, module, name, help_text)
    return parser


# (module, command, help): commands implemented in their own modules.
_SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("evaluate", "eval", "train a genotype on a dataset, test it, and write report.json / report.md / curves.png"),
    ("search.command", "search", "architecture search with Optuna: sample, train briefly, prune, write genotypes"),
    ("export", "export", "pack a trained checkpoint into a 1-bit inference model file (.bnas) for the XNOR kernels"),
]


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """bnas's library modules log under ``bnas.*``; the CLI shows them on stderr as plain
    lines: INFO by default, DEBUG with ``-v``, warnings only with ``-q``."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("bnas")
    logger.setLevel(level)
    # One handler, renewed on every call so that it writes to the sys.stderr of this call
    # (tests and embedding programs swap sys.stderr between calls).
    for old in [h for h in logger.handlers if getattr(h, "_bnas_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._bnas_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.log_verbose, quiet=args.log_quiet)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except BnasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
