"""Genotype YAML <-> ``Genotype``: the one schema for handcrafted and searched networks.

A genotype is plain data (like DARTS's ``Genotype``): which op runs on which edge, and the
macro layout. Parsing checks structure (the schema ``bnas.schemas.genotype``: keys, types,
references), the size caps and the cell DAG, and never consults the op registry: the
builder resolves op names and their options (``bnas.builder.check_ops``).
Every error names the file, the YAML path of the culprit and what was expected.
``load -> save -> load`` is the identity.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from .errors import GenotypeError
from .schemas import validate
from .schemas.genotype import COMBINES
from .yaml_io import check_limit, dump_yaml, parse_yaml_mapping, read_yaml_mapping, write_text_atomic

__all__ = [
    "COMBINES",
    "CellSpec",
    "Edge",
    "Genotype",
    "LayerSpec",
    "Preprocess",
    "cell_graph",
    "genotype_from_dict",
    "load_genotype",
]

_LAYER_KEYS = ("op", "cell", "channels", "stride", "repeat")


@dataclass(frozen=True)
class Edge:
    """``op`` applied to the output of ``source`` (``in0``, ``in1`` or an earlier node)."""

    op: str
    source: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> list[Any]:
        return [self.op, self.source, dict(self.options)] if self.options else [self.op, self.source]


@dataclass(frozen=True)
class Preprocess:
    """How a cell aligns its inputs (cells k-2 and k-1) to its width and resolution.

    ``real``: the identity where an input already fits, else a real 1x1 conv + BN, or DARTS's
    factorized reduce from twice the resolution. ``darts``: DARTS's ReLU -> 1x1 conv -> BN on
    every input, fitting or not (and the factorized reduce). ``binary``: BN -> sign -> binary
    1x1 conv (-> BN) (-> activation) on every input; from twice the resolution a binary
    factorized reduce (``reduce: factorized``, EBNAS) or a binary 3x3 stride-2 conv
    (``reduce: conv3x3``, Kim et al. 2020). ``identity``: nothing; the inputs must fit.
    """

    kind: str = "real"
    reduce: str = "factorized"
    activation: str = "none"
    bn_after: bool = True
    binarize: str | Mapping[str, Any] | None = None

    def to_yaml(self) -> str | dict[str, Any]:
        """The kind alone when every option is its default, else the mapping of what is set."""
        out: dict[str, Any] = {"kind": self.kind}
        for key, default in (("reduce", "factorized"), ("activation", "none"), ("bn_after", True), ("binarize", None)):
            value = getattr(self, key)
            if value != default:
                out[key] = copy.deepcopy(value)
        return self.kind if len(out) == 1 else out

    @classmethod
    def from_yaml(cls, data: str | Mapping[str, Any]) -> Preprocess:
        return cls(kind=data) if isinstance(data, str) else cls(**copy.deepcopy(dict(data)))


@dataclass(frozen=True)
class CellSpec:
    """A cell DAG: each node is the sum of its edges; the output combines some nodes.

    ``residual`` adds the cell's k-1 input to the output; ``preprocess`` (None: the
    genotype's) says how the inputs are aligned to the cell's width.
    """

    name: str
    inputs: int
    nodes: Mapping[str, tuple[Edge, ...]]
    combine: str
    output: tuple[str, ...]
    residual: bool = False
    preprocess: Preprocess | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("in0", "in1") if self.inputs == 2 else ("in1",)

    def to_yaml(self) -> dict[str, Any]:
        output: dict[str, Any] = {"combine": self.combine, "nodes": list(self.output)}
        if self.residual:
            output["residual"] = True
        out: dict[str, Any] = {"inputs": self.inputs}
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess.to_yaml()
        out["nodes"] = {n: [e.to_yaml() for e in edges] for n, edges in self.nodes.items()}
        out["output"] = output
        return out


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
    preprocess: Preprocess | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "input": list(self.input), "num_classes": self.num_classes}
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess.to_yaml()
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
# The structure (keys, types, references between parts of the file) is the schema's
# (``bnas.schemas.genotype``); what is left here needs more than a schema: the size caps,
# which are environment variables, and the cell DAG's graph properties. The dataclasses
# are built from the data as written, not from the validated model, which would turn
# ``lr: 1`` into ``1.0`` and move a genotype's hash.
def _check_option_caps(options: Mapping[str, Any], path: str) -> None:
    """Kernel sizes past the cap are refused on load, whatever the op (its options are the
    builder's to check)."""
    for key, value in options.items():
        if key in ("kernel", "kernel_size") and isinstance(value, int) and not isinstance(value, bool):
            check_limit("KERNEL", value, f"{path}.{key}")


def _layer(data: Mapping[str, Any], path: str) -> LayerSpec:
    channels = data.get("channels")
    if channels is not None:
        check_limit("CHANNELS", channels, f"{path}.channels")
    repeat = check_limit("REPEAT", data.get("repeat", 1), f"{path}.repeat")
    options = {k: copy.deepcopy(v) for k, v in data.items() if k not in _LAYER_KEYS}
    _check_option_caps(options, path)  # a cell entry has no options (the schema refuses them)
    return LayerSpec(
        op=data.get("op"),
        cell=data.get("cell"),
        channels=channels,
        stride=data.get("stride", 1),
        repeat=repeat,
        options=options,
    )


def _layers(data: list[Mapping[str, Any]] | None, path: str) -> tuple[LayerSpec, ...]:
    return tuple(_layer(item, f"{path}[{i}]") for i, item in enumerate(data or ()))


def _edge(data: list[Any], path: str) -> Edge:
    options = copy.deepcopy(data[2]) if len(data) == 3 else {}
    _check_option_caps(options, f"{path}[2]")
    return Edge(op=data[0], source=data[1], options=options)


def _cell(name: str, data: Mapping[str, Any], path: str) -> CellSpec:
    raw_nodes: Mapping[str, list[Any]] = data["nodes"]
    check_limit("NODES", len(raw_nodes), f"{path}.nodes", "the number of nodes in the cell")
    nodes: dict[str, tuple[Edge, ...]] = {}
    for node, edges in raw_nodes.items():
        npath = f"{path}.nodes.{node}"
        check_limit("NODES", len(edges), npath, "the number of edges into the node")
        nodes[node] = tuple(_edge(e, f"{npath}[{i}]") for i, e in enumerate(edges))
    output = data["output"]
    preprocess = data.get("preprocess")
    spec = CellSpec(
        name=name,
        inputs=data.get("inputs", 2),
        nodes=nodes,
        combine=output.get("combine", "concat"),
        output=tuple(output["nodes"]),
        residual=output.get("residual", False),
        preprocess=None if preprocess is None else Preprocess.from_yaml(preprocess),
    )
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
        raise GenotypeError(
            f"the cell has a cycle: {loop}; edges may only point to earlier nodes or inputs", f"{path}.nodes"
        )
    order = list(cell.nodes)
    for node, edges in cell.nodes.items():
        for i, edge in enumerate(edges):
            if edge.source in cell.nodes and order.index(edge.source) >= order.index(node):
                raise GenotypeError(
                    f"edge into {node} comes from {edge.source}, which is not an earlier node",
                    f"{path}.nodes.{node}[{i}][1]",
                )
    reachable = set().union(*(nx.descendants(g, i) for i in cell.input_names))
    feeding = nx.ancestors(g, "out")
    for node in cell.nodes:
        if node not in reachable:
            raise GenotypeError(f"node {node} is not reachable from any cell input", f"{path}.nodes.{node}")
        if node not in feeding:
            raise GenotypeError(
                f"node {node} does not feed the cell output; add it to output.nodes or remove it",
                f"{path}.nodes.{node}",
            )


def genotype_from_dict(data: Mapping[str, Any], file: str | None = None) -> Genotype:
    """Validate a genotype mapping; errors are ``GenotypeError`` naming ``file`` and the path."""
    try:
        return _genotype_from_dict(data)
    except GenotypeError as exc:
        if file:
            exc.in_file(file)
        raise


def _genotype_from_dict(data: Mapping[str, Any]) -> Genotype:
    if not isinstance(data, dict):
        # The words of ``parse_yaml_mapping``, for a caller that hands over parsed data.
        raise GenotypeError(f"expected a YAML mapping at the top level, got a {type(data).__name__}", "(top level)")
    validate("genotype", data)
    shape: tuple[int, int, int] = tuple(data["input"])
    check_limit("CHANNELS", shape[0], "input[0]", "the number of input channels")
    for i in (1, 2):
        check_limit("INPUT_SIZE", shape[i], f"input[{i}]")
    num_classes = check_limit("CLASSES", data["num_classes"], "num_classes")
    cells = {name: _cell(name, cell, f"cells.{name}") for name, cell in (data.get("cells") or {}).items()}
    stem = _layers(data.get("stem"), "stem")
    body = _layers(data["body"], "body")
    head = _layers(data.get("head"), "head")
    check_limit(
        "LAYERS",
        sum(layer.repeat for layer in (*stem, *body, *head)),
        "body",
        "the number of layers and cells (every repeat counted)",
    )
    return Genotype(
        name=data.get("name", "genotype"),
        input=shape,
        num_classes=num_classes,
        stem=stem,
        cells=cells,
        body=body,
        head=head,
        training=copy.deepcopy(data.get("training")),
        preprocess=None if data.get("preprocess") is None else Preprocess.from_yaml(data["preprocess"]),
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
