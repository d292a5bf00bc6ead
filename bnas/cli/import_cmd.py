"""``bnas import darts GENOTYPE --channels C --layers L --out FILE.yaml``: a genotype published
in another NAS code's format, as a bnas genotype file (``bnas.importers`` does the work).

``import`` takes the format as a subcommand (``darts`` for now), so that other formats can
join it with their own flags.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from ..atomic import check_writable_file
from ..builder import build
from ..genotype import genotype_from_dict
from ..importers.darts import DartsGenotype, darts_to_dict, parse_darts, reduction_cells
from ..metrics import summarize
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


def _op_pair(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old.strip() or not new.strip():
        raise argparse.ArgumentTypeError(f"expected OLD=NEW (a DARTS op name = a bnas op name), got {text!r}")
    return old.strip(), new.strip()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="turn a genotype in another NAS code's format (DARTS) into a bnas genotype file",
        description="Turn a genotype in another NAS code's format into a bnas genotype file.",
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT")
    d = formats.add_parser(
        "darts",
        help="a DARTS Genotype(normal=..., reduce=...) as DARTS's CIFAR network (NetworkCIFAR)",
        description="A DARTS genotype as DARTS's CIFAR network: stem, LAYERS cells (reductions at LAYERS//3 "
        "and 2*LAYERS//3), global pooling and a linear classifier. The text is parsed, never run. The auxiliary "
        "head and drop-path are not modelled.",
    )
    d.add_argument(
        "genotype",
        help="Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...) as DARTS prints it, "
        "@FILE (a genotypes.py with one genotype) or @FILE:NAME (e.g. @genotypes.py:DARTS_V2)",
    )
    d.add_argument("--channels", type=int, required=True, help="C, DARTS's --init_channels (36 for CIFAR-10)")
    d.add_argument("--layers", type=int, required=True, help="cells, DARTS's --layers (20 for CIFAR-10)")
    d.add_argument(
        "--binary",
        action="store_true",
        help="the binary twin: binary separable/dilated convs and binary cell preprocessing (stem and head real)",
    )
    d.add_argument(
        "--map",
        metavar="OLD=NEW",
        action="append",
        default=[],
        type=_op_pair,
        help="rename an op, applied last (repeatable), e.g. --map bin_conv_3x3=binary_conv_3x3",
    )
    d.add_argument("--name", help="the genotype's name (default: the genotype's name in the file, lower case)")
    d.add_argument("--num-classes", type=int, default=10, help="classes the classifier scores (default 10)")
    d.add_argument(
        "--comment",
        action="append",
        default=[],
        help="a line for the file's header (repeatable), e.g. where the genotype was published",
    )
    d.add_argument("--out", required=True, help="genotype YAML file to write (replaced if it exists)")
    add_catalog_argument(d)
    d.set_defaults(handler=run_import_darts)
    p.set_defaults(handler=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_usage()
    log.error("bnas import: name the format, e.g. bnas import darts GENOTYPE --channels 36 --layers 20 --out g.yaml")
    return 2


def _command(args: argparse.Namespace) -> str:
    """The command line that regenerates the file, from the parsed flags."""
    parts = ["bnas", "import", "darts", args.genotype, "--channels", str(args.channels), "--layers", str(args.layers)]
    if args.binary:
        parts.append("--binary")
    for old, new in args.map:
        parts += ["--map", f"{old}={new}"]
    if args.name:
        parts += ["--name", args.name]
    if args.num_classes != 10:
        parts += ["--num-classes", str(args.num_classes)]
    for catalog in args.catalog:
        parts += ["--catalog", catalog]
    for comment in args.comment:
        parts += ["--comment", comment]
    parts += ["--out", args.out]
    return " ".join(_quote(part) for part in parts)


def _quote(text: str) -> str:
    """Shell quoting that keeps a DARTS genotype readable: its quotes are single quotes, so
    it goes in double quotes when nothing in it is special there."""
    quoted = shlex.quote(text)
    if quoted != text and "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return quoted


def _header(args: argparse.Namespace, darts: DartsGenotype, params: int, binary_params: int) -> str:
    reductions = " and ".join(str(i) for i in reduction_cells(args.layers))
    kind = "binary twin (binary separable convs and cell preprocessing; stem and head real)" if args.binary else "real"
    source = f"genotype {darts.describe()}" if darts.file else "genotype text of the command below"
    lines = [
        *args.comment,
        f"Imported from the DARTS {source}.",
        f"DARTS's CIFAR network (NetworkCIFAR): C={args.channels}, {args.layers} cells, reduction cells {reductions}; "
        f"{kind}; {params:,} parameters ({binary_params:,} binary). No auxiliary head, no drop-path.",
        "Regenerate with:",
        f"  {_command(args)}",
    ]
    return "\n".join(lines)


def run_import_darts(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # Before the work: --out is a file, and its folder must take one.
    check_writable_file(out, "--out", example="genotype.yaml")
    load_catalogs(args)  # before the ops are checked: --map may name the catalogs' presets
    darts = parse_darts(args.genotype)
    data = darts_to_dict(darts, args.channels, args.layers, args.binary, dict(args.map), args.name, args.num_classes)
    genotype = genotype_from_dict(data)
    # Built once: proves the file builds, and gives the counts for the header and the log.
    summary = summarize(build(genotype), genotype.input)
    params = summary.params_real + summary.params_binary
    genotype.to_yaml(out, header=_header(args, darts, params, summary.params_binary))
    log.info(
        "wrote %s: %s from %s, %s parameters (%s binary)",
        out,
        genotype.name,
        darts.describe() if darts.file else "the DARTS genotype text",
        f"{params:,}",
        f"{summary.params_binary:,}",
    )
    return 0
