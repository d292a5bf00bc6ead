"""DARTS genotypes -> bnas genotypes (``bnas import darts``, ``bnas.import_darts``).

The DARTS code (quark0/darts) and its forks print a searched cell pair as a namedtuple::

    Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ...], normal_concat=range(2, 6),
             reduce=[('max_pool_3x3', 0), ...], reduce_concat=[2, 3, 4, 5])

Node i of a cell (its state i + 2) sums edges 2i and 2i + 1; an edge ``(op, j)`` applies the
op to state j, where states 0 and 1 are the outputs of cells k-2 and k-1 and state j >= 2 is
node j - 2; the cell output concatenates the states of the concat, in its order.

The text is read with ``ast`` and only these literal shapes are accepted: nothing in it is
evaluated, so a genotypes file from anywhere is safe to import. ``@FILE`` reads a Python
genotypes file and ``@FILE:NAME`` picks its assignment ``NAME = Genotype(...)`` (following
plain aliases such as ``DARTS = DARTS_V2``), again without running it.

The network is DARTS's CIFAR evaluation network (``NetworkCIFAR`` of its ``model.py``): a
stem conv 3x3 -> BN to 3C channels; ``layers`` cells, of which cells ``layers // 3`` and
``2 * layers // 3`` are reduction cells at twice the width (one cell when they coincide);
every cell input goes through DARTS's preprocessing (``preprocess: darts``: ReLU -> 1x1 conv
-> BN, or a factorized reduce from twice the resolution); global average pooling and a
linear classifier. At C=36 and 20 layers DARTS_V2 has DARTS's 3,349,342 parameters. Not
modelled: the auxiliary head (DARTS leaves its weights out of the count it reports, and
bnas's trainer has no auxiliary loss) and drop-path (a regularizer of DARTS's training,
which bnas's trainer does not apply).

``binary=True`` gives the binary twin: every separable and dilated conv becomes its binary
op (``sep_conv_3x3`` -> ``binary_sep_conv_3x3``, ``dil_conv_3x3`` ->
``binary_dil_sep_conv_3x3``) and the cell inputs are aligned by binary 1x1 convs
(``preprocess: binary``); pools, ``skip_connect`` (a real factorized reduce at stride 2, as
in DARTS) and ``none`` are unchanged, an op with no binary twin (``conv_7x1_1x7``) stays
real with a warning, and the stem and the head stay real.
"""

from __future__ import annotations

import ast
import logging
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BnasError, GenotypeError
from ..genotype import Genotype, genotype_from_dict
from ..registry import UnknownPrimitiveError, closest_primitives, get_spec

__all__ = [
    "BINARY_TWINS",
    "DartsFormatError",
    "DartsGenotype",
    "darts_to_dict",
    "import_darts",
    "parse_darts",
]

log = logging.getLogger(__name__)

FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")
# DARTS's ops and their binary twins in the registry (same shapes, binary convs).
BINARY_TWINS: dict[str, str] = {
    "sep_conv_3x3": "binary_sep_conv_3x3",
    "sep_conv_5x5": "binary_sep_conv_5x5",
    "sep_conv_7x7": "binary_sep_conv_7x7",
    "dil_conv_3x3": "binary_dil_sep_conv_3x3",
    "dil_conv_5x5": "binary_dil_sep_conv_5x5",
}
# Kept as they are in a binary import: no conv weights to binarize (skip_connect's factorized
# reduce on a reduction edge stays real, as the stem and the head do).
_UNCHANGED = frozenset({"none", "skip_connect", "avg_pool_3x3", "max_pool_3x3"})
# The DARTS repos' genotypes files are a few KiB; a cap keeps the parser's work bounded.
_MAX_TEXT = 1 << 20
_EXPECTED = "Genotype(normal=[(op, index), ...], normal_concat=[...], reduce=[...], reduce_concat=[...])"


class DartsFormatError(GenotypeError):
    """DARTS genotype text that cannot be imported: ``file: path: message`` on one line, the
    path naming the field (``normal[3]``, prefixed by the assignment's name in a file)."""


@dataclass(frozen=True)
class DartsGenotype:
    """A parsed DARTS genotype: edges ``(op, state)`` two per node, and the concat states.

    ``name`` is the assignment picked from a file (as given; ``alias_of`` is the name that
    holds the ``Genotype(...)`` when ``name`` is an alias), ``file`` the file it came from.
    """

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]
    name: str | None = None
    alias_of: str | None = None
    file: str | None = None

    def describe(self) -> str:
        """Where the genotype came from, in words (for file headers and log lines)."""
        what = self.name or "Genotype(...)"
        if self.alias_of:
            what += f" (= {self.alias_of})"
        return f"{what} in {self.file}" if self.file else what


# --------------------------------------------------------------------------------------
# Text -> DartsGenotype, through the AST only
# --------------------------------------------------------------------------------------
class _Context:
    """The text being read and where it came from, to locate errors."""

    def __init__(self, text: str, file: str | None, prefix: str = ""):
        self.text = text
        self.file = file
        self.prefix = prefix

    def error(self, message: str, path: str = "") -> DartsFormatError:
        full = ".".join(part for part in (self.prefix, path) if part)
        return DartsFormatError(message, full, self.file)

    def show(self, node: ast.AST) -> str:
        """The source of ``node`` on one line, cut to about 60 characters."""
        segment = ast.get_source_segment(self.text, node) or type(node).__name__
        segment = " ".join(segment.split())
        return segment if len(segment) <= 60 else segment[:57] + "..."


def _read_reference(ref: str) -> tuple[str, str, str | None]:
    """``FILE`` or ``FILE:NAME`` -> (the file's text, the file, NAME or None)."""
    if not ref:
        raise DartsFormatError("expected @FILE or @FILE:NAME after '@' (a Python file of DARTS genotypes)")
    path, select = Path(ref), None
    if not path.is_file() and ":" in ref:
        head, _, tail = ref.rpartition(":")
        if tail.isidentifier():
            path, select = Path(head), tail
    where = str(path)
    try:
        size = path.stat().st_size
        if size > _MAX_TEXT:
            raise DartsFormatError(
                f"the file is {size:,} bytes; a DARTS genotypes file is a few KiB (cap {_MAX_TEXT:,})", file=where
            )
        data = path.read_bytes()
    except IsADirectoryError:
        raise DartsFormatError("is a folder; expected a Python file of DARTS genotypes", file=where) from None
    except OSError as exc:
        raise DartsFormatError(f"cannot read it: {exc.strerror or exc}", file=where) from exc
    try:
        return data.decode("utf-8"), where, select
    except UnicodeDecodeError as exc:
        raise DartsFormatError(f"not UTF-8 text (byte {exc.start}); expected a Python file", file=where) from exc


def _is_genotype_call(node: ast.AST) -> bool:
    """``Genotype(...)`` or ``anything.Genotype(...)`` (e.g. ``genotypes.Genotype``)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "Genotype") or (
        isinstance(func, ast.Attribute) and func.attr == "Genotype"
    )


def _find_call(ctx: _Context, select: str | None) -> tuple[ast.Call, str | None, str | None]:
    """The ``Genotype(...)`` call of the text, the name it was picked by, and the name that
    holds it when that one is an alias."""
    try:
        tree = ast.parse(ctx.text, filename=ctx.file or "<genotype>")
    except SyntaxError as exc:
        raise ctx.error(f"not Python syntax (line {exc.lineno}: {exc.msg}); expected {_EXPECTED}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes; absurd nesting
        raise ctx.error(f"cannot be parsed ({type(exc).__name__}); expected {_EXPECTED}") from None
    body = tree.body
    if len(body) == 1 and isinstance(body[0], ast.Expr) and select is None:
        value = body[0].value
        if not _is_genotype_call(value):
            raise ctx.error(f"expected {_EXPECTED}, got {ctx.show(value)}")
        assert isinstance(value, ast.Call)
        return value, None, None
    # A genotypes file: top-level ``NAME = Genotype(...)`` and ``NAME = OTHER``, the last
    # assignment of a name winning (as when Python runs the file); the rest is ignored.
    calls: dict[str, ast.Call] = {}
    aliases: dict[str, str] = {}
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            calls.pop(target.id, None)
            aliases.pop(target.id, None)
            if isinstance(value, ast.Call) and _is_genotype_call(value):
                calls[target.id] = value
            elif isinstance(value, ast.Name):
                aliases[target.id] = value.id
    listed = ", ".join(calls) if calls else "none"
    if select is None:
        if len(calls) == 1:
            name, call = next(iter(calls.items()))
            return call, name, None
        if not calls:
            raise ctx.error(f"no Genotype(...) found; expected {_EXPECTED}, or a file with NAME = Genotype(...)")
        raise ctx.error(f"{len(calls)} genotypes ({listed}); pick one with @FILE:NAME")
    name, seen = select, [select]
    while name not in calls and name in aliases:
        name = aliases[name]
        if name in seen:
            raise ctx.error(f"the aliases of {select} go round in a circle: {' = '.join([*seen, name])}")
        seen.append(name)
    if name not in calls:
        what = f"{select} (= {name})" if name != select else select
        raise ctx.error(f"no assignment {what} = Genotype(...); the genotypes here: {listed}")
    return calls[name], select, name if name != select else None


def _call_fields(call: ast.Call, ctx: _Context) -> dict[str, ast.expr]:
    """The four fields of ``Genotype(...)``, positional (namedtuple order) or by keyword."""
    where = "Genotype(...)"
    if len(call.args) > len(FIELDS):
        raise ctx.error(f"{len(call.args)} positional arguments; a Genotype has 4 fields: {', '.join(FIELDS)}", where)
    fields: dict[str, ast.expr] = {}
    for field, arg in zip(FIELDS, call.args, strict=False):
        if isinstance(arg, ast.Starred):
            raise ctx.error(f"*{ctx.show(arg.value)} is not accepted; write the fields out", where)
        fields[field] = arg
    for kw in call.keywords:
        if kw.arg is None:
            raise ctx.error(f"**{ctx.show(kw.value)} is not accepted; write the fields out", where)
        if kw.arg not in FIELDS:
            raise ctx.error(f"unknown field {kw.arg!r}; expected {', '.join(FIELDS)}", where)
        if kw.arg in fields:
            raise ctx.error(f"field {kw.arg} is given twice", where)
        fields[kw.arg] = kw.value
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise ctx.error(f"missing field(s) {', '.join(missing)}; expected {_EXPECTED}", where)
    return fields


def _int(node: ast.AST) -> int | None:
    """The value of a literal non-negative int (not a bool), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _edges(node: ast.expr, field: str, ctx: _Context) -> tuple[tuple[str, int], ...]:
    if not isinstance(node, (ast.List, ast.Tuple)):
        raise ctx.error(f"expected a list of (op name, input index) pairs, got {ctx.show(node)}", field)
    edges: list[tuple[str, int]] = []
    for i, item in enumerate(node.elts):
        path = f"{field}[{i}]"
        if not isinstance(item, (ast.Tuple, ast.List)) or len(item.elts) != 2:
            raise ctx.error(f"expected a pair (op name, input index), got {ctx.show(item)}", path)
        op_node, index_node = item.elts
        if not (isinstance(op_node, ast.Constant) and isinstance(op_node.value, str) and op_node.value):
            raise ctx.error(f"expected an op name (a non-empty string), got {ctx.show(op_node)}", f"{path}[0]")
        index = _int(index_node)
        if index is None:
            raise ctx.error(f"expected an input index (a non-negative int), got {ctx.show(index_node)}", f"{path}[1]")
        edges.append((op_node.value, index))
    if not edges:
        raise ctx.error("no edges; a cell has at least one node (two edges)", field)
    if len(edges) % 2:
        raise ctx.error(
            f"{len(edges)} edges, an odd number; a DARTS cell has two per node (node i sums edges 2i and 2i+1)", field
        )
    for i, (_, index) in enumerate(edges):
        state = i // 2 + 2
        if index >= state:
            raise ctx.error(
                f"input {index} is not an earlier state: edge {i} belongs to node {state - 2} (state {state}), which "
                f"may read states 0 to {state - 1} (0 and 1 are the cell inputs, 2 and up the earlier nodes)",
                f"{field}[{i}][1]",
            )
    return tuple(edges)


def _concat(node: ast.expr, field: str, n_nodes: int, ctx: _Context) -> tuple[int, ...]:
    nodes_are = f"its {n_nodes} node(s) are states 2 to {n_nodes + 1}"
    paths: list[str]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
        and 1 <= len(node.args) <= 2
    ):
        bounds = [_int(arg) for arg in node.args]
        if any(b is None for b in bounds):
            raise ctx.error(f"expected range(a, b) with literal ints, got {ctx.show(node)}", field)
        start, stop = (0, bounds[0]) if len(bounds) == 1 else (bounds[0], bounds[1])
        assert start is not None and stop is not None
        # Checked before the range is listed: range(10**12) must not be materialized.
        if stop > start and (start < 2 or stop > n_nodes + 2):
            bad = start if start < 2 else stop - 1
            raise ctx.error(
                f"{ctx.show(node)} includes state {bad}, which is not a node of the cell; {nodes_are}", field
            )
        values = list(range(start, stop))
        paths = [field] * len(values)
    elif isinstance(node, (ast.List, ast.Tuple)):
        values = []
        for i, item in enumerate(node.elts):
            value = _int(item)
            if value is None:
                raise ctx.error(f"expected a state index (a non-negative int), got {ctx.show(item)}", f"{field}[{i}]")
            values.append(value)
        paths = [f"{field}[{i}]" for i in range(len(values))]
    else:
        raise ctx.error(f"expected range(a, b) or a list of state indices, got {ctx.show(node)}", field)
    if not values:
        raise ctx.error(f"empty; the cell output concatenates at least one node ({nodes_are})", field)
    seen: set[int] = set()
    for value, path in zip(values, paths, strict=True):
        if not 2 <= value < n_nodes + 2:
            raise ctx.error(f"state {value} is not a node of the cell; {nodes_are}", path)
        if value in seen:
            raise ctx.error(f"state {value} is listed twice", path)
        seen.add(value)
    return tuple(values)


def _check_all_used(edges: Sequence[tuple[str, int]], concat: Sequence[int], field: str, ctx: _Context) -> None:
    """Every node reaches the output (bnas refuses dead nodes; DARTS computes and drops them)."""
    alive = set(concat)
    for state in range(len(edges) // 2 + 1, 1, -1):
        if state in alive:
            alive.update(j for _, j in edges[2 * (state - 2) : 2 * (state - 2) + 2] if j >= 2)
    dead = [s for s in range(2, len(edges) // 2 + 2) if s not in alive]
    if dead:
        s = dead[0]
        raise ctx.error(
            f"state {s} (node {s - 2}, edges {2 * (s - 2)} and {2 * (s - 2) + 1}) is neither in {field}_concat nor an "
            f"input of a later node that is: DARTS would compute it and discard it; add it to {field}_concat or "
            "remove its edges",
            field,
        )


def parse_darts(text: str) -> DartsGenotype:
    """Parse DARTS ``Genotype(...)`` text, a whole genotypes file's text, ``@FILE`` or
    ``@FILE:NAME``; a ``DartsFormatError`` (one line, naming the field) otherwise."""
    if not isinstance(text, str):
        raise DartsFormatError(f"expected the genotype as text, got {type(text).__name__}")
    file: str | None = None
    select: str | None = None
    stripped = text.strip()
    if stripped.startswith("@"):
        text, file, select = _read_reference(stripped[1:])
    elif len(text) > _MAX_TEXT:
        raise DartsFormatError(f"the text is {len(text):,} characters; a DARTS genotype is a few hundred")
    else:
        text = textwrap.dedent(text).strip()  # as pasted from an indented log line
    ctx = _Context(text, file)
    call, name, alias_of = _find_call(ctx, select)
    ctx.prefix = name or ""
    fields = _call_fields(call, ctx)
    normal = _edges(fields["normal"], "normal", ctx)
    reduce = _edges(fields["reduce"], "reduce", ctx)
    normal_concat = _concat(fields["normal_concat"], "normal_concat", len(normal) // 2, ctx)
    reduce_concat = _concat(fields["reduce_concat"], "reduce_concat", len(reduce) // 2, ctx)
    _check_all_used(normal, normal_concat, "normal", ctx)
    _check_all_used(reduce, reduce_concat, "reduce", ctx)
    return DartsGenotype(normal, normal_concat, reduce, reduce_concat, name=name, alias_of=alias_of, file=file)


# --------------------------------------------------------------------------------------
# DartsGenotype -> bnas genotype
# --------------------------------------------------------------------------------------
def _unknown_op(op: str, new: str, path: str, file: str | None) -> DartsFormatError:
    close = closest_primitives(new)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    if new == op:
        message = (
            f"unknown op {op!r}: bnas has no op of that name{hint}; map it to a bnas op with --map {op}=NEW "
            f"(op_map={{{op!r}: NEW}} in Python; `bnas primitives` lists the ops)"
        )
    else:
        message = f"{op!r} maps to {new!r}, which is not a bnas op{hint}; fix --map {op}=NEW (`bnas primitives` lists the ops)"
    return DartsFormatError(message, path, file)


def _resolve_ops(darts: DartsGenotype, binary: bool, op_map: Mapping[str, str]) -> dict[str, str]:
    """DARTS op name -> bnas op name: the binary twin when ``binary``, then ``op_map``
    (keyed by the DARTS name, or by the twin's), every result checked against the registry."""
    for old, new in op_map.items():
        if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
            raise BnasError(f"op_map: expected op names (non-empty strings) OLD -> NEW, got {old!r} -> {new!r}")
    resolved: dict[str, str] = {}
    real_left: list[str] = []
    used_keys: set[str] = set()
    prefix = f"{darts.name}." if darts.name else ""
    for field in ("normal", "reduce"):
        for i, (op, _) in enumerate(getattr(darts, field)):
            if op in resolved:
                continue
            twin = BINARY_TWINS.get(op, op) if binary else op
            key = op if op in op_map else twin if twin in op_map else None
            new = op_map[key] if key is not None else twin
            if key is not None:
                used_keys.add(key)
            try:
                spec = get_spec(new)
            except UnknownPrimitiveError:
                raise _unknown_op(op, new, f"{prefix}{field}[{i}][0]", darts.file) from None
            if binary and key is None and op not in BINARY_TWINS and op not in _UNCHANGED and spec.binarize == "real":
                real_left.append(op)
            resolved[op] = new
    if real_left:
        names = ", ".join(real_left)
        log.warning(
            "%s: no binary twin in bnas for %s; it stays real in the binary network (--map %s=NEW to change that)",
            darts.describe(),
            names,
            real_left[0],
        )
    unused = [k for k in op_map if k not in used_keys]
    if unused:
        log.warning("op_map: %s matches no op of %s; ignored", ", ".join(unused), darts.describe())
    return resolved


def _cell(edges: Sequence[tuple[str, int]], concat: Sequence[int], ops: Mapping[str, str]) -> dict[str, Any]:
    def source(state: int) -> str:
        return "in0" if state == 0 else "in1" if state == 1 else f"n{state - 2}"

    nodes = {
        f"n{k}": [[ops[op], source(state)] for op, state in edges[2 * k : 2 * k + 2]] for k in range(len(edges) // 2)
    }
    return {"inputs": 2, "nodes": nodes, "output": {"combine": "concat", "nodes": [source(s) for s in concat]}}


def _positive_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 1:
        raise BnasError(f"{what} must be a positive integer, got {value!r}")
    return value


def reduction_cells(layers: int) -> list[int]:
    """The indices of DARTS's reduction cells among ``layers`` cells (one or two)."""
    return sorted({layers // 3, 2 * layers // 3})


def darts_to_dict(
    darts: DartsGenotype,
    channels: int,
    layers: int,
    binary: bool = False,
    op_map: Mapping[str, str] | None = None,
    name: str | None = None,
    num_classes: int = 10,
    input_shape: Sequence[int] = (3, 32, 32),
) -> dict[str, Any]:
    """The bnas genotype mapping of DARTS's ``NetworkCIFAR(channels, num_classes, layers)``
    with the cells of ``darts`` (see the module's docstring); not validated yet."""
    channels = _positive_int(channels, "channels (C, DARTS's --init_channels)")
    layers = _positive_int(layers, "layers (DARTS's --layers)")
    ops = _resolve_ops(darts, binary, op_map or {})
    if name is None:
        base = re.sub(r"[^0-9a-z_]+", "_", (darts.name or "darts").lower()).strip("_") or "darts"
        name = f"{base}_binary" if binary else base
    reductions = set(reduction_cells(layers))
    body: list[dict[str, Any]] = []
    width, run = channels, 0
    for i in range(layers):
        if i not in reductions:
            run += 1
            continue
        if run:
            body.append({"cell": "normal", "channels": width, **({"repeat": run} if run > 1 else {})})
            run = 0
        width *= 2
        body.append({"cell": "reduce", "channels": width, "stride": 2})
    if run:
        body.append({"cell": "normal", "channels": width, **({"repeat": run} if run > 1 else {})})
    cells = {}
    # Only the cells the body uses (with one or two layers every cell is a reduction).
    if any(entry["cell"] == "normal" for entry in body):
        cells["normal"] = _cell(darts.normal, darts.normal_concat, ops)
    cells["reduce"] = _cell(darts.reduce, darts.reduce_concat, ops)
    return {
        "name": name,
        "input": list(input_shape),
        "num_classes": num_classes,
        "preprocess": "binary" if binary else "darts",
        "stem": [{"op": "conv_bn", "channels": 3 * channels, "kernel": 3}],
        "cells": cells,
        "body": body,
        "head": [{"op": "global_avgpool"}, {"op": "linear"}],
    }


def import_darts(
    text: str,
    channels: int,
    layers: int,
    binary: bool = False,
    op_map: Mapping[str, str] | None = None,
    name: str | None = None,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
) -> Genotype:
    """A DARTS genotype as a bnas ``Genotype``: DARTS's CIFAR network with its cells.

    ``text``: ``Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)``
    as DARTS prints it, a genotypes file's text, ``@FILE`` or ``@FILE:NAME`` (read with
    ``ast``, never run). ``channels`` and ``layers`` are DARTS's ``--init_channels`` and
    ``--layers`` (36 and 20 for its CIFAR-10 network). ``binary``: the binary twin (binary
    separable convs and preprocessing; stem and head real). ``op_map`` renames ops, applied
    last (``{'bin_conv_3x3': 'binary_conv_3x3'}``); every resulting name must be a bnas op.
    ``name`` defaults to the assignment's name in lower case (``darts_v2``), ``+ _binary``.
    The auxiliary head and drop-path are not modelled (see the module's docstring).
    Errors are ``DartsFormatError`` / ``BnasError``, one line each.
    """
    darts = parse_darts(text)
    data = darts_to_dict(darts, channels, layers, binary, op_map, name, num_classes, input_shape)
    return genotype_from_dict(data)
