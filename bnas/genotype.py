"""Genotype YAML <-> ``Genotype``: the one schema for handcrafted and searched networks.

A genotype is plain data (like DARTS's ``Genotype``): which op runs on which edge, and the
macro layout. Parsing checks structure (keys, types, caps, the cell DAG) and never consults
the op registry: the builder resolves op names and their options (``bnas.builder.check_ops``).
Every error names the file, the YAML path of the culprit and what was expected.
``load -> save -> load`` is the identity.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import networkx as nx

from .errors import GenotypeError, short_repr
from .yaml_io import check_limit, dump_yaml, parse_yaml_mapping, read_yaml_mapping, write_text_atomic

__all__ = [
    "Edge",
    "CellSpec",
    "LayerSpec",
    "Genotype",
    "load_genotype",
    "genotype_from_dict",
    "cell_graph",
    "COMBINES",
]

COMBINES = ("concat", "sum")
_LAYER_KEYS = ("op", "cell", "channels", "stride", "repeat")
_TOP_KEYS = ("name", "input", "num_classes", "stem", "cells", "body", "head", "training")


@dataclass(frozen=True)
class Edge:
    """``op`` applied to the output of ``source`` (``in0``, ``in1`` or an earlier node)."""

    op: str
    source: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> list[Any]:
        return [self.op, self.source, dict(self.options)] if self.options else [self.op, self.source]


@dataclass(frozen=True)
class CellSpec:
    """A cell DAG: each node is the sum of its edges; the output combines some nodes."""

    name: str
    inputs: int
    nodes: Mapping[str, tuple[Edge, ...]]
    combine: str
    output: tuple[str, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("in0", "in1") if self.inputs == 2 else ("in1",)

    def to_yaml(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "nodes": {n: [e.to_yaml() for e in edges] for n, edges in self.nodes.items()},
            "output": {"combine": self.combine, "nodes": list(self.output)},
        }


@dataclass(frozen=True)
class LayerSpec:
    """One entry of ``stem``, ``body`` or ``head``: an op or a named cell, repeated."""

    op: str | None = None
    cell: str | None = None
    channels: int | None = None
    stride: int = 1
    repeat: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.op if self.op is not None else f"cell {self.cell}"

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op} if self.op is not None else {"cell": self.cell}
        if self.channels is not None:
            out["channels"] = self.channels
        if self.stride != 1:
            out["stride"] = self.stride
        if self.repeat != 1:
            out["repeat"] = self.repeat
        out.update(copy.deepcopy(dict(self.options)))
        return out


@dataclass(frozen=True)
class Genotype:
    name: str
    input: tuple[int, int, int]
    num_classes: int
    stem: tuple[LayerSpec, ...] = ()
    cells: Mapping[str, CellSpec] = field(default_factory=dict)
    body: tuple[LayerSpec, ...] = ()
    head: tuple[LayerSpec, ...] = ()
    training: Mapping[str, Any] | None = None
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "input": list(self.input), "num_classes": self.num_classes}
        if self.stem:
            out["stem"] = [layer.to_yaml() for layer in self.stem]
        if self.cells:
            out["cells"] = {name: cell.to_yaml() for name, cell in self.cells.items()}
        out["body"] = [layer.to_yaml() for layer in self.body]
        if self.head:
            out["head"] = [layer.to_yaml() for layer in self.head]
        if self.training is not None:
            out["training"] = copy.deepcopy(dict(self.training))
        return out

    def to_yaml(self, path: str | os.PathLike[str] | None = None, header: str = "") -> str:
        """The YAML text; also written atomically to ``path`` when given."""
        text = dump_yaml(self.to_dict())
        if header:
            text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
        if path is not None:
            write_text_atomic(path, text)
        return text

    def canonical_hash(self) -> str:
        """A hash of the architecture alone (not its name or recipe), for de-duplication."""
        arch = self.to_dict()
        arch.pop("name")
        arch.pop("training", None)
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]

    def cell_graphs(self) -> dict[str, nx.MultiDiGraph]:
        return {name: cell_graph(cell) for name, cell in self.cells.items()}


def cell_graph(cell: CellSpec) -> nx.MultiDiGraph:
    """The cell as a networkx DAG: inputs, nodes, and an ``out`` node.

    Edges carry ``op`` and ``slot``, their position in the YAML list (the edge's index into
    its node, or the node's place in ``output.nodes``): sums and concatenations follow it.
    """
    g = nx.MultiDiGraph(name=cell.name)
    for name in cell.input_names:
        g.add_node(name, kind="input")
    for node, edges in cell.nodes.items():
        g.add_node(node, kind="node")
        for slot, edge in enumerate(edges):
            g.add_edge(edge.source, node, op=edge.op, slot=slot)
    g.add_node("out", kind="output", combine=cell.combine)
    for slot, node in enumerate(cell.output):
        g.add_edge(node, "out", op=cell.combine, slot=slot)
    return g


# --------------------------------------------------------------------------------------
# Validation: dict -> Genotype
# --------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _positive_int(value: Any, path: str, what: str = "a positive integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenotypeError(f"expected {what}, got {short_repr(value)} ({_type_name(value)})", path)
    if value <= 0:
        raise GenotypeError(f"expected {what}, got {value}", path)
    return value


def _key_path(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    import difflib

    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected some of {', '.join(allowed)}"
            raise GenotypeError(f"unknown key {short_repr(key)}{hint}", f"{path}.{_key_path(key)}" if path else _key_path(key))


def _check_op(name: Any, path: str) -> str:
    # Structure only: the builder resolves the name against the registry (``check_ops``).
    if not isinstance(name, str):
        raise GenotypeError(f"expected an op name (a string), got {short_repr(name)} ({_type_name(name)})", path)
    return name


def _options(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GenotypeError(f"expected a mapping of op options, got {_type_name(value)}", path)
    return copy.deepcopy(value)


def _check_option_caps(options: Mapping[str, Any], path: str) -> None:
    """Kernel sizes past the cap are refused on load, whatever the op (its options are the
    builder's to check)."""
    for key, value in options.items():
        if key in ("kernel", "kernel_size") and isinstance(value, int) and not isinstance(value, bool):
            check_limit("KERNEL", value, f"{path}.{key}")


def _parse_layer(data: Any, path: str, cells: Mapping[str, CellSpec], allow_cells: bool) -> LayerSpec:
    if not isinstance(data, dict):
        raise GenotypeError(f"expected a mapping like {{op: NAME, channels: C}}, got {_type_name(data)}", path)
    has_op, has_cell = "op" in data, "cell" in data
    if has_op == has_cell:
        raise GenotypeError("expected exactly one of 'op' or 'cell'", path)
    op = cell = None
    if has_op:
        op = _check_op(data["op"], f"{path}.op")
    else:
        if not allow_cells:
            raise GenotypeError("cells are only allowed in 'body'", f"{path}.cell")
        cell = data["cell"]
        if cell not in cells:
            known = ", ".join(cells) or "none defined"
            raise GenotypeError(f"unknown cell {short_repr(cell)}; cells defined under 'cells': {known}", f"{path}.cell")
    channels = data.get("channels")
    if channels is not None:
        channels = check_limit("CHANNELS", _positive_int(channels, f"{path}.channels"), f"{path}.channels")
    elif cell is not None:
        raise GenotypeError("a cell entry needs 'channels' (the width every node of the cell works at)", f"{path}.channels")
    stride = data.get("stride", 1)
    if isinstance(stride, bool) or stride not in (1, 2):
        raise GenotypeError(f"expected stride 1 or 2, got {short_repr(stride)}", f"{path}.stride")
    repeat = check_limit("REPEAT", _positive_int(data.get("repeat", 1), f"{path}.repeat"), f"{path}.repeat")
    options = {k: copy.deepcopy(v) for k, v in data.items() if k not in _LAYER_KEYS}
    if cell is not None and options:
        raise GenotypeError(f"unknown key(s) {short_repr(', '.join(map(str, options)))} for a cell entry; "
                            "expected cell, channels, stride, repeat", path)
    if op is not None:
        _check_option_caps(options, path)
    return LayerSpec(op=op, cell=cell, channels=channels, stride=stride, repeat=repeat, options=options)


def _parse_layers(data: Any, path: str, cells: Mapping[str, CellSpec], allow_cells: bool = False) -> tuple[LayerSpec, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise GenotypeError(f"expected a list of layers, got {_type_name(data)}", path)
    return tuple(_parse_layer(item, f"{path}[{i}]", cells, allow_cells) for i, item in enumerate(data))


def _parse_edge(data: Any, path: str) -> Edge:
    if not isinstance(data, list) or len(data) not in (2, 3):
        raise GenotypeError(f"expected an edge [op, input] or [op, input, {{options}}], got {short_repr(data)}", path)
    op = _check_op(data[0], f"{path}[0]")
    source = data[1]
    if not isinstance(source, str):
        raise GenotypeError(f"expected the name of an input or node, got {short_repr(source)} ({_type_name(source)})", f"{path}[1]")
    options = _options(data[2], f"{path}[2]") if len(data) == 3 else {}
    _check_option_caps(options, f"{path}[2]")
    return Edge(op=op, source=source, options=options)


def _parse_cell(name: str, data: Any, path: str) -> CellSpec:
    if not isinstance(data, dict):
        raise GenotypeError(f"expected a mapping with inputs, nodes, output; got {_type_name(data)}", path)
    _check_keys(data, ("inputs", "nodes", "output"), path)
    inputs = data.get("inputs", 2)
    if isinstance(inputs, bool) or inputs not in (1, 2):
        raise GenotypeError(f"expected inputs: 1 or 2 (cell k-1 only, or cells k-2 and k-1), got {short_repr(inputs)}", f"{path}.inputs")
    input_names = ("in0", "in1") if inputs == 2 else ("in1",)
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise GenotypeError("expected a non-empty mapping of nodes, e.g. {n0: [[skip_connect, in1]]}", f"{path}.nodes")
    check_limit("NODES", len(raw_nodes), f"{path}.nodes", "the number of nodes in the cell")
    nodes: dict[str, tuple[Edge, ...]] = {}
    for node, edges in raw_nodes.items():
        npath = f"{path}.nodes.{node}"
        if not isinstance(node, str) or node in input_names or node == "out":
            raise GenotypeError(f"invalid node name {short_repr(node)} (in0, in1 and out are reserved)", npath)
        if not isinstance(edges, list) or not edges:
            raise GenotypeError("expected a non-empty list of edges [[op, input], ...]", npath)
        check_limit("NODES", len(edges), npath, "the number of edges into the node")
        nodes[node] = tuple(_parse_edge(e, f"{npath}[{i}]") for i, e in enumerate(edges))
    known = set(input_names) | set(nodes)
    for node, edges in nodes.items():
        for i, edge in enumerate(edges):
            if edge.source not in known:
                hint = "in1" if inputs == 1 and edge.source == "in0" else None
                extra = " (this cell has inputs: 1, so only in1 exists)" if hint else ""
                raise GenotypeError(
                    f"unknown input or node {short_repr(edge.source)}{extra}; known: {', '.join(sorted(known))}",
                    f"{path}.nodes.{node}[{i}][1]",
                )
    output = data.get("output")
    if not isinstance(output, dict):
        raise GenotypeError("expected output: {combine: concat|sum, nodes: [...]}", f"{path}.output")
    _check_keys(output, ("combine", "nodes"), f"{path}.output")
    combine = output.get("combine", "concat")
    if combine not in COMBINES:
        raise GenotypeError(f"invalid combine {short_repr(combine)}; expected one of {', '.join(COMBINES)}", f"{path}.output.combine")
    out_nodes = output.get("nodes")
    if not isinstance(out_nodes, list) or not out_nodes:
        raise GenotypeError("expected a non-empty list of node names", f"{path}.output.nodes")
    for i, node in enumerate(out_nodes):
        if node not in nodes:
            raise GenotypeError(f"unknown node {short_repr(node)}; nodes: {', '.join(nodes)}", f"{path}.output.nodes[{i}]")
    spec = CellSpec(name=name, inputs=inputs, nodes=nodes, combine=combine, output=tuple(out_nodes))
    _check_dag(spec, path)
    return spec


def _check_dag(cell: CellSpec, path: str) -> None:
    g = cell_graph(cell)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        loop = " -> ".join([cycle[0][0]] + [edge[1] for edge in cycle])
        raise GenotypeError(f"the cell has a cycle: {loop}; edges may only point to earlier nodes or inputs", f"{path}.nodes")
    order = list(cell.nodes)
    for node, edges in cell.nodes.items():
        for i, edge in enumerate(edges):
            if edge.source in cell.nodes and order.index(edge.source) >= order.index(node):
                raise GenotypeError(
                    f"edge into {node} comes from {edge.source}, which is not an earlier node", f"{path}.nodes.{node}[{i}][1]"
                )
    reachable = set().union(*(nx.descendants(g, i) for i in cell.input_names))
    feeding = nx.ancestors(g, "out")
    for node in cell.nodes:
        if node not in reachable:
            raise GenotypeError(f"node {node} is not reachable from any cell input", f"{path}.nodes.{node}")
        if node not in feeding:
            raise GenotypeError(f"node {node} does not feed the cell output; add it to output.nodes or remove it", f"{path}.nodes.{node}")


def genotype_from_dict(data: Mapping[str, Any], file: str | None = None) -> Genotype:
    """Validate a genotype mapping; errors are ``GenotypeError`` naming ``file`` and the path."""
    try:
        return _genotype_from_dict(data)
    except GenotypeError as exc:
        raise exc.in_file(file) if file else exc


def _genotype_from_dict(data: Mapping[str, Any]) -> Genotype:
    if not isinstance(data, dict):
        raise GenotypeError(f"expected a YAML mapping at the top level, got a {_type_name(data)}", "(top level)")
    _check_keys(data, _TOP_KEYS, "")
    for key in ("input", "num_classes", "body"):
        if key not in data:
            raise GenotypeError(f"missing required key {key!r}", key)
    name = data.get("name", "genotype")
    if not isinstance(name, str) or not name:
        raise GenotypeError(f"expected a non-empty string, got {short_repr(name)}", "name")
    shape = data["input"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise GenotypeError(f"expected [C, H, W], got {short_repr(shape)}", "input")
    shape_t = tuple(_positive_int(v, f"input[{i}]") for i, v in enumerate(shape))
    check_limit("CHANNELS", shape_t[0], "input[0]", "the number of input channels")
    for i in (1, 2):
        check_limit("INPUT_SIZE", shape_t[i], f"input[{i}]")
    num_classes = check_limit("CLASSES", _positive_int(data["num_classes"], "num_classes"), "num_classes")
    raw_cells = data.get("cells") or {}
    if not isinstance(raw_cells, dict):
        raise GenotypeError(f"expected a mapping of named cells, got {_type_name(raw_cells)}", "cells")
    cells = {str(n): _parse_cell(str(n), c, f"cells.{n}") for n, c in raw_cells.items()}
    stem = _parse_layers(data.get("stem"), "stem", cells)
    body = _parse_layers(data["body"], "body", cells, allow_cells=True)
    if not body:
        raise GenotypeError("expected at least one layer", "body")
    head = _parse_layers(data.get("head"), "head", cells)
    check_limit("LAYERS", sum(layer.repeat for layer in (*stem, *body, *head)), "body",
                "the number of layers and cells (every repeat counted)")
    training = data.get("training")
    if training is not None and not isinstance(training, dict):
        raise GenotypeError(f"expected a mapping of recipe defaults, got {_type_name(training)}", "training")
    return Genotype(
        name=name,
        input=shape_t,  # type: ignore[arg-type]
        num_classes=num_classes,
        stem=stem,
        cells=cells,
        body=body,
        head=head,
        training=copy.deepcopy(training),
    )


def load_genotype(source: str | os.PathLike[str] | Mapping[str, Any]) -> Genotype:
    """Load and validate a genotype from a YAML file path or a mapping."""
    if isinstance(source, Mapping):
        return genotype_from_dict(source)
    path = Path(source)
    data = read_yaml_mapping(path)
    genotype = genotype_from_dict(data, file=str(path))
    object.__setattr__(genotype, "source", str(path))
    return genotype


def loads_genotype(text: str, file: str = "<string>") -> Genotype:
    """Load a genotype from YAML text."""
    return genotype_from_dict(parse_yaml_mapping(text, file), file=file)
