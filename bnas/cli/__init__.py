"""The ``bnas`` command (also ``python -m bnas``): every argparse line of bnas lives here.

One module per subcommand (``primitives``, ``info``, ``schema``, ``eval``, ``supernet``, ``search``,
``export``, ``import``), each with ``add_parser(subparsers)``; the library they call knows nothing of
argparse. User errors (``BnasError``) print one line, ``error: ...``, and exit with code 2;
there is never a Python traceback for bad input (the exception keeps its chained cause for
Python callers; the command shows the one line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import BnasError
from . import eval as eval_command
from . import export, import_cmd, info, primitives, schema, search, supernet

__all__ = ["build_parser", "configure_logging", "main"]

# In the order `bnas --help` lists them.
_COMMANDS = (primitives, info, schema, eval_command, supernet, search, export, import_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnas", description="Neural architecture search over binary neural networks.")
    parser.add_argument("--version", action="version", version=f"bnas {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", dest="log_verbose", action="store_true", help="also log debug messages")
    verbosity.add_argument(
        "-q",
        "--quiet",
        dest="log_quiet",
        action="store_true",
        help="log warnings and errors only (progress bars: each command's own --quiet)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


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
