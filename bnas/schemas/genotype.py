"""The genotype file: a network's macro layout (stem, body, head) and its named cell DAGs.

Structure only: op names are strings here, since which ops exist is the registry's business
(the builder checks them, and an op entry's other keys, its options). References inside the
file are checked: an edge's input is an input or a node of its cell, an output node exists,
a body entry's cell is defined. Acyclicity and reachability are graph checks, left to
``bnas.genotype``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import short_repr
from .common import (
    CELL_ENTRY,
    OP_ENTRY,
    PREPROCESS_INLINE,
    PREPROCESS_NAME,
    PositiveIntTyped,
    Schema,
    StrictStr,
    TrueOrFalse,
    chw,
    expect,
    fail,
    int_only,
    says,
    type_name,
)
from .recipe import RecipeSchema

__all__ = [
    "COMBINES",
    "PREPROCESS_KINDS",
    "PREPROCESS_REDUCES",
    "Cell",
    "CellEntry",
    "CellOutput",
    "GenotypeSchema",
    "OpEntry",
    "Preprocess",
    "mapping_or",
]

CombineName = Literal["concat", "sum"]
COMBINES: tuple[str, ...] = ("concat", "sum")
PreprocessKind = Literal["real", "darts", "binary", "identity"]
PREPROCESS_KINDS: tuple[str, ...] = get_args(PreprocessKind)
PreprocessReduce = Literal["factorized", "conv3x3"]
PREPROCESS_REDUCES: tuple[str, ...] = get_args(PreprocessReduce)
ActivationName = Literal["none", "relu", "prelu", "rprelu", "hardtanh"]

OpName = Annotated[StrictStr, expect("an op name (a string)", got="typed")]
CellName = Annotated[StrictStr, expect("a cell name (a string)", got="typed")]
Stride = Annotated[Literal[1, 2], int_only, expect("stride 1 or 2")]


def mapping_or(message: str, allow_none: bool = True) -> BeforeValidator:
    """Refuse a non-mapping with ``message`` (``{type}`` is replaced by the value's type): the
    recipe is one schema, but each file that holds one words this error its own way."""

    def check(value: Any) -> Any:
        if (value is not None or not allow_none) and not isinstance(value, dict):
            raise fail(message.replace("{type}", type_name(value)))
        return value

    return BeforeValidator(check)


class OpEntry(Schema):
    """An op applied `repeat` times: `{op: NAME, channels: C, stride: 1|2, repeat: N, ...}`; any
    other key is an option of the op (see `bnas primitives`), e.g. `kernel: 3`."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"not": {"required": ["cell"]}})
    not_a_mapping: ClassVar[str] = "expected a mapping like {op: NAME, channels: C}, got {type}"

    op: OpName = Field(description="A registered op (`bnas primitives` lists them).")
    channels: PositiveIntTyped | None = Field(
        None, description="Output channels (default: keep the input's). Capped by BNAS_MAX_CHANNELS."
    )
    stride: Stride = Field(1, description="2 halves the height and width.")
    repeat: PositiveIntTyped = Field(1, description="How many times the op is applied in a row (BNAS_MAX_REPEAT).")

    @classmethod
    def check_keys(cls, data: dict[Any, Any]) -> None:
        if ("op" in data) == ("cell" in data):
            raise fail("expected exactly one of 'op' or 'cell'")
        if "cell" in data:  # only the body routes cell entries to CellEntry
            raise fail("cells are only allowed in 'body'", "cell")


class CellEntry(Schema):
    """A named cell, repeated: `{cell: NAME, channels: C, stride: 1|2, repeat: N}`."""

    missing: ClassVar[dict[str, str]] = {
        "channels": "a cell entry needs 'channels' (the width every node of the cell works at)"
    }

    cell: CellName = Field(description="A cell defined under `cells:`.")
    channels: PositiveIntTyped = Field(description="The width every node of the cell works at (BNAS_MAX_CHANNELS).")
    stride: Stride = Field(1, description="2 makes this a reduction cell: edges from the cell inputs run at stride 2.")
    repeat: PositiveIntTyped = Field(1, description="How many copies of the cell in a row (BNAS_MAX_REPEAT).")

    @classmethod
    def unknown_keys_error(cls, unknown: list[Any]) -> Any:
        names = short_repr(", ".join(map(str, unknown)))
        return fail(f"unknown key(s) {names} for a cell entry; expected cell, channels, stride, repeat")


def _entry_kind(value: Any) -> str:
    return CELL_ENTRY if isinstance(value, dict) and "cell" in value and "op" not in value else OP_ENTRY


BodyEntry = Annotated[
    Annotated[OpEntry, Tag(OP_ENTRY)] | Annotated[CellEntry, Tag(CELL_ENTRY)],
    Discriminator(_entry_kind),
]


def _layers_message(value: Any) -> str:
    return (
        "expected at least one layer" if value in (None, []) else f"expected a list of layers, got {type_name(value)}"
    )


Layers = Annotated[list[OpEntry], expect("a list of layers", got="type")]


def _pad_edge(value: Any) -> Any:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise fail(f"expected an edge [op, input] or [op, input, {{options}}], got {short_repr(value)}")
    return value if len(value) == 3 else [*value, {}]


Edge = Annotated[
    tuple[
        OpName,
        Annotated[StrictStr, expect("the name of an input or node", got="typed")],
        Annotated[dict[str, Any], expect("a mapping of op options", got="type")],
    ],
    BeforeValidator(_pad_edge),
    Field(
        json_schema_extra={
            "minItems": 2,
            "description": "[op, input] or [op, input, {options}]: the op applied to an input "
            "(in0, in1) or an earlier node.",
        }
    ),
]


class CellOutput(Schema):
    """How the cell's output joins its nodes."""

    not_a_mapping: ClassVar[str] = "expected output: {combine: concat|sum, nodes: [...]}"
    missing: ClassVar[dict[str, str]] = {"nodes": "expected a non-empty list of node names"}

    combine: Annotated[CombineName, says(lambda v: f"invalid combine {short_repr(v)}; expected one of concat, sum")] = (
        Field("concat", description="concat (channels add up) or sum.")
    )
    nodes: Annotated[
        list[Annotated[StrictStr, expect("a node name", got="typed")]],
        Field(min_length=1),
        says("expected a non-empty list of node names"),
    ] = Field(description="The nodes the output joins; every node must feed it.")
    residual: TrueOrFalse = Field(
        False,
        description="Add the cell's k-1 input to its output (Kim et al. 2020); on a reduction cell through "
        "BN -> a real 2x2 stride-2 conv to the output width.",
    )


_KIND_MESSAGE = "expected one of real, darts, binary, identity"


class PreprocessOptions(Schema):
    """How a cell aligns its inputs to its width, with options (the mapping form)."""

    not_a_mapping: ClassVar[str] = (
        "expected a preprocessing kind (real, darts, binary, identity) or a mapping with 'kind'"
    )
    missing: ClassVar[dict[str, str]] = {"kind": "expected kind: real, darts, binary or identity"}

    kind: Annotated[PreprocessKind, says(lambda v: f"invalid kind {short_repr(v)}; {_KIND_MESSAGE}")] = Field(
        description="real: identity where the input already fits, else a real 1x1 conv + BN (a factorized reduce "
        "from twice the resolution); darts: ReLU -> real 1x1 conv -> BN on every input (DARTS); binary: BN -> sign "
        "-> binary 1x1 conv -> BN on every input; identity: none (the input must already fit)."
    )
    reduce: Annotated[
        PreprocessReduce, says(lambda v: f"invalid reduce {short_repr(v)}; expected factorized or conv3x3")
    ] = Field(
        "factorized",
        description="binary only: an input at twice the resolution goes through a binary factorized reduce "
        "(EBNAS) or a binary 3x3 stride-2 conv (Kim et al. 2020).",
    )
    activation: Annotated[
        ActivationName,
        says(lambda v: f"invalid activation {short_repr(v)}; expected one of none, relu, prelu, rprelu, hardtanh"),
    ] = Field("none", description="binary only: the activation after the binary conv (Kim et al.: relu; EBNAS: prelu).")
    bn_after: TrueOrFalse = Field(
        True, description="binary only: a BN after the binary conv (Kim et al. have none; their ReLU follows the conv)."
    )
    binarize: Annotated[StrictStr, expect("a binarization name (xnor, bireal, ...)")] | dict[str, Any] | None = Field(
        None, description="binary only: the binarization of the 1x1 convs (default xnor)."
    )

    @model_validator(mode="after")
    def _binary_options(self) -> PreprocessOptions:
        if self.kind != "binary":
            given = [k for k in ("reduce", "activation", "bn_after", "binarize") if k in self.model_fields_set]
            if given:
                raise fail(f"{given[0]} is an option of kind: binary only (this is kind: {self.kind})", given[0])
        return self


def _preprocess_kind(value: Any) -> str:
    return PREPROCESS_INLINE if isinstance(value, dict) else PREPROCESS_NAME


Preprocess = Annotated[
    Annotated[
        Annotated[PreprocessKind, says(lambda v: f"invalid preprocess {short_repr(v)}; {_KIND_MESSAGE}")],
        Tag(PREPROCESS_NAME),
    ]
    | Annotated[PreprocessOptions, Tag(PREPROCESS_INLINE)],
    Discriminator(_preprocess_kind),
]


class Cell(Schema):
    """A cell DAG: each node is the sum of its edges; the output combines some nodes."""

    not_a_mapping: ClassVar[str] = "expected a mapping with inputs, nodes, output; got {type}"
    missing: ClassVar[dict[str, str]] = {
        "nodes": "expected a non-empty mapping of nodes, e.g. {n0: [[skip_connect, in1]]}",
        "output": "expected output: {combine: concat|sum, nodes: [...]}",
    }

    inputs: Annotated[Literal[1, 2], int_only, expect("inputs: 1 or 2 (cell k-1 only, or cells k-2 and k-1)")] = Field(
        2, description="2: in0 = cell k-2, in1 = cell k-1; 1: in1 only."
    )
    nodes: Annotated[
        dict[
            str,
            Annotated[list[Edge], Field(min_length=1), says("expected a non-empty list of edges [[op, input], ...]")],
        ],
        Field(min_length=1),
        says("expected a non-empty mapping of nodes, e.g. {n0: [[skip_connect, in1]]}"),
    ] = Field(
        description="Node name -> its edges, in order: an edge may only come from an input or an earlier "
        "node (BNAS_MAX_NODES caps nodes and edges per node)."
    )
    output: CellOutput = Field(description="output: {combine: concat|sum, nodes: [...], residual: false}")
    preprocess: Preprocess | None = Field(
        None, description="How this cell aligns its inputs to its width (default: the genotype's preprocess)."
    )

    @field_validator("nodes", mode="before")
    @classmethod
    def _node_names(cls, value: Any, info: ValidationInfo) -> Any:
        reserved = ("in0", "in1") if info.data.get("inputs", 2) == 2 else ("in1",)
        for node in value if isinstance(value, dict) else ():
            if not isinstance(node, str) or node in reserved or node == "out":
                # str: a key, even an int one, is a name in the path ("nodes.5", not "nodes[5]")
                raise fail(f"invalid node name {short_repr(node)} (in0, in1 and out are reserved)", str(node))
        return value

    @model_validator(mode="after")
    def _references(self) -> Cell:
        known = {"in0", "in1"} if self.inputs == 2 else {"in1"}
        known |= set(self.nodes)
        for node, edges in self.nodes.items():
            for i, (_, source, _) in enumerate(edges):
                if source not in known:
                    extra = (
                        " (this cell has inputs: 1, so only in1 exists)" if self.inputs == 1 and source == "in0" else ""
                    )
                    raise fail(
                        f"unknown input or node {short_repr(source)}{extra}; known: {', '.join(sorted(known))}",
                        "nodes",
                        node,
                        i,
                        1,
                    )
        for i, node in enumerate(self.output.nodes):
            if node not in self.nodes:
                raise fail(f"unknown node {short_repr(node)}; nodes: {', '.join(self.nodes)}", "output", "nodes", i)
        return self


class GenotypeSchema(Schema):
    """A genotype: one network, handcrafted or found by a search (`bnas info`, `bnas eval`)."""

    model_config = ConfigDict(title="Genotype")
    keys: ClassVar[tuple[str, ...]] = (
        "name",
        "input",
        "num_classes",
        "preprocess",
        "stem",
        "cells",
        "body",
        "head",
        "training",
    )

    name: Annotated[StrictStr, Field(min_length=1), expect("a non-empty string")] = Field(
        "genotype", description="The network's name (reports and run folders use it)."
    )
    input: Annotated[list[PositiveIntTyped], Field(min_length=3, max_length=3), chw, expect("[C, H, W]")] = Field(
        description="[C, H, W]: input channels, height and width (BNAS_MAX_CHANNELS, BNAS_MAX_INPUT_SIZE)."
    )
    num_classes: PositiveIntTyped = Field(description="Classes the head scores (BNAS_MAX_CLASSES).")
    preprocess: Preprocess | None = Field(
        None,
        description="How every cell aligns its inputs to its width, unless the cell says otherwise: real "
        "(default), darts, binary or identity (see a cell's preprocess).",
    )
    stem: Layers | None = Field(None, description="Real-valued layers before the binary body.")
    cells: Annotated[dict[CellName, Cell], expect("a mapping of named cells", got="type")] | None = Field(
        None, description="Named cell DAGs the body may use."
    )
    body: Annotated[list[BodyEntry], Field(min_length=1), says(_layers_message)] = Field(
        description="The macro layout, in order: op entries and cell entries. BNAS_MAX_LAYERS caps the "
        "layers of the whole network, every repeat counted."
    )
    head: Layers | None = Field(None, description="Layers after the body; the last gives num_classes scores.")
    training: Annotated[RecipeSchema | None, mapping_or("expected a mapping of recipe defaults, got {type}")] = Field(
        None, description="Recipe defaults for `bnas eval` (flags override single keys)."
    )

    @model_validator(mode="after")
    def _cells_are_defined(self) -> GenotypeSchema:
        cells = self.cells or {}
        for i, entry in enumerate(self.body):
            if isinstance(entry, CellEntry) and entry.cell not in cells:
                known = ", ".join(cells) or "none defined"
                raise fail(
                    f"unknown cell {short_repr(entry.cell)}; cells defined under 'cells': {known}", "body", i, "cell"
                )
        return self
