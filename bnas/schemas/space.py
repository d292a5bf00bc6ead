"""The search-space file: the choices a search makes (cell ops and wiring, widths, depths),
the dataset, the training budget of every trial, objectives, constraints, sampler, pruner.

Op names are strings here (the registry knows which exist); the caps on widths, depths and
nodes are the loader's, since they are environment variables.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag, field_validator, model_validator

from ..data import DATASET_NAMES
from ..errors import short_repr
from .common import (
    FLAT_CHOICES,
    ONE_CHOICE,
    STAGE_CHOICES,
    PositiveInt,
    Schema,
    StrictStr,
    TrueOrFalse,
    chw,
    expect,
    fail,
    int_only,
    no_default_in_schema,
    says,
)
from .genotype import CombineName, OpEntry, Preprocess, mapping_or
from .recipe import RecipeSchema

__all__ = [
    "CONSTRAINTS",
    "DATASETS",
    "OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "CellChoices",
    "Constraints",
    "Macro",
    "SpaceSchema",
]

ObjectiveName = Literal["val_acc", "ops", "size", "latency"]
SamplerName = Literal["tpe", "random", "nsga2", "gp"]
PrunerName = Literal["median", "hyperband", "none"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
PRUNERS: tuple[str, ...] = get_args(PrunerName)
# Built-in datasets; ``imagefolder:PATH`` names a folder of class subfolders.
DATASETS: tuple[str, ...] = DATASET_NAMES  # bnas.data owns the list
CONSTRAINTS: tuple[str, ...] = ("max_ops", "min_ops", "max_size_bytes", "max_params", "max_latency_ms")

SpaceOpName = Annotated[StrictStr, expect("an op name")]
SpaceLayers = Annotated[list[OpEntry], says("expected a list of layers")]


def _no_repeats(what: str) -> Any:
    def check(values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise fail(f"repeated {what} in {short_repr(values)}")
        return values

    return check


_CHOICE = "expected a positive integer or a non-empty list of them"
Choice = Annotated[int, Strict(), Field(gt=0), says(_CHOICE, got="repr")]
ChoiceList = Annotated[list[Choice], Field(min_length=1), says(_CHOICE, got="repr")]


def _choice_kind(value: Any) -> str:
    if not isinstance(value, list):
        return ONE_CHOICE
    return STAGE_CHOICES if value and all(isinstance(v, list) for v in value) else FLAT_CHOICES


def _not_a_mixture(value: Any) -> Any:
    if (
        isinstance(value, list)
        and any(isinstance(v, list) for v in value)
        and not all(isinstance(v, list) for v in value)
    ):
        raise fail("expected a list of integers, or a list of integer lists (one per stage), not a mixture")
    return value


def _unique(values: list[int]) -> list[int]:
    return _no_repeats("choices")(values)


# One width (or depth), a flat list of choices shared by every stage, or one list per stage.
Choices = Annotated[
    Annotated[Choice, Tag(ONE_CHOICE)]
    | Annotated[ChoiceList, Tag(FLAT_CHOICES)]
    | Annotated[list[ChoiceList], Field(min_length=1), Tag(STAGE_CHOICES)],
    Discriminator(_choice_kind),
    BeforeValidator(_not_a_mixture),
]


class CellChoices(Schema):
    """The searched cell (DARTS-style): each node sums `edges_per_node` (input, op) edges."""

    not_a_mapping: ClassVar[str] = (
        "expected a mapping with ops, nodes, inputs, edges_per_node, combine, reduce_cell, preprocess"
    )
    missing: ClassVar[dict[str, str]] = {"ops": "expected a non-empty list of op names (see `bnas primitives`)"}

    ops: Annotated[
        list[SpaceOpName], Field(min_length=1), says("expected a non-empty list of op names (see `bnas primitives`)")
    ] = Field(description="The ops an edge may take (`bnas primitives` lists them), each once.")
    nodes: PositiveInt = Field(2, description="Intermediate nodes per cell (BNAS_MAX_NODES).")
    inputs: Annotated[Literal[1, 2], int_only, expect("1 or 2")] = Field(
        2, description="Cell inputs: 2 (cells k-2 and k-1) or 1 (cell k-1)."
    )
    edges_per_node: PositiveInt = Field(2, description="Edges each node sums (BNAS_MAX_NODES).")
    combine: Annotated[CombineName, says(lambda v: f"invalid combine {short_repr(v)}; expected concat or sum")] = Field(
        "concat", description="How the cell output joins its nodes: concat or sum."
    )
    reduce_cell: TrueOrFalse = Field(True, description="Search a separate reduce cell for the stride-2 stage entries.")
    preprocess: Preprocess | None = Field(
        None,
        description="How every sampled cell aligns its inputs to its width: real (default), darts, binary or "
        "identity, or a mapping with kind and the binary options (the genotype's preprocess).",
    )

    @field_validator("ops", mode="after")
    @classmethod
    def _ops_once(cls, ops: list[str]) -> list[str]:
        return _no_repeats("ops")(ops)


class Macro(Schema):
    """The searched macro layout (BARS-style): stages, their widths and depths."""

    not_a_mapping: ClassVar[str] = "expected a mapping with stages, channels, cells_per_stage, stage_ops"

    stages: PositiveInt = Field(
        2, description="Stages; a reduction (stride 2) opens every stage after the first (BNAS_MAX_STAGES)."
    )
    channels: Choices = Field(
        16,
        description="Choices of the first stage's width (each later stage doubles it), or one choice list "
        "per stage: [[16, 24], [32, 48]] (BNAS_MAX_CHANNELS).",
    )
    cells_per_stage: Choices = Field(
        1,
        description="Choices of depth for every stage, or one list per stage; a stage's depth counts its "
        "reduction (BNAS_MAX_REPEAT, BNAS_MAX_LAYERS).",
    )
    stage_ops: Annotated[list[SpaceOpName], expect("a list of op names")] | None = Field(
        None, description="Search one plain block op per stage instead of cells (then no `cells:`)."
    )

    @field_validator("channels", "cells_per_stage", mode="after")
    @classmethod
    def _choices_once(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], list):
            for i, choices in enumerate(value):
                if len(set(choices)) != len(choices):
                    raise fail(f"repeated choices in {short_repr(choices)}", i)
            return value
        return _unique(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_list_per_stage(self) -> Macro:
        for key in ("channels", "cells_per_stage"):
            value = getattr(self, key)
            if isinstance(value, list) and value and isinstance(value[0], list) and len(value) != self.stages:
                raise fail(f"expected one choice list per stage ({self.stages} stages), got {len(value)}", key)
        return self


def _constraint_value(value: Any) -> str:
    # PyYAML (YAML 1.1) reads 3.0e7 as a string; only 3.0e+7 is a float.
    hint = " (YAML reads 3.0e7 as text: write 3.0e+7)" if isinstance(value, str) and "e" in value.lower() else ""
    return f"expected a positive number, got {short_repr(value)}{hint}"


Bound = Annotated[float, Strict(), Field(gt=0), says(_constraint_value)]


class Constraints(Schema):
    """Bounds every trial must meet, measured before any training; a trial past one is not trained."""

    not_a_mapping: ClassVar[str] = "expected a mapping like {max_ops: 1.0e+6}"

    # Every bound is optional, but an explicit null is refused: pydantic validates a given
    # value, not the default.
    max_ops: Bound = Field(  # type: ignore[assignment]
        None, json_schema_extra=no_default_in_schema, description="Operations per image (binary ops counted at 1/64)."
    )
    min_ops: Bound = Field(  # type: ignore[assignment]
        None,
        json_schema_extra=no_default_in_schema,
        description="A floor on the operations per image: smaller genotypes are not trained.",
    )
    max_size_bytes: Bound = Field(  # type: ignore[assignment]
        None, json_schema_extra=no_default_in_schema, description="Model size in bytes (1 bit per binary weight)."
    )
    max_params: Bound = Field(  # type: ignore[assignment]
        None, json_schema_extra=no_default_in_schema, description="Parameters."
    )
    max_latency_ms: Bound = Field(  # type: ignore[assignment]
        None, json_schema_extra=no_default_in_schema, description="Measured latency per batch, in milliseconds."
    )

    @classmethod
    def unknown_keys_error(cls, unknown: list[Any]) -> Any:
        key = unknown[0]
        return fail(f"unknown constraint {short_repr(key)}; expected some of {', '.join(CONSTRAINTS)}", str(key))

    @model_validator(mode="after")
    def _floor_below_budget(self) -> Constraints:
        if self.min_ops is not None and self.max_ops is not None and self.min_ops > self.max_ops:
            raise fail(
                f"min_ops {self.min_ops:.6g} is above max_ops {self.max_ops:.6g}: no genotype can meet both; "
                "lower min_ops or raise max_ops",
                "min_ops",
            )
        return self


def _objectives_start_with_val_acc(value: Any) -> Any:
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, list) or not listed or listed[0] != "val_acc":
        raise fail(f"expected a list starting with val_acc, e.g. [val_acc] or [val_acc, ops]; got {short_repr(value)}")
    return listed


def _dataset(value: str) -> str:
    if value in DATASETS or value.startswith("imagefolder:"):
        return value
    match = difflib.get_close_matches(value, DATASETS, n=1)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    raise fail(f"unknown dataset {short_repr(value)}{hint}; expected one of {', '.join(DATASETS)} or imagefolder:PATH")


def _dataset_schema(schema: dict[str, Any]) -> None:
    schema.pop("type", None)
    schema["anyOf"] = [{"enum": list(DATASETS)}, {"type": "string", "pattern": "^imagefolder:"}]


def _objectives_schema(schema: dict[str, Any]) -> None:
    array = {k: schema.pop(k) for k in list(schema) if k in ("type", "items", "uniqueItems", "minItems")}
    array["prefixItems"] = [{"const": "val_acc"}]
    schema["anyOf"] = [{"const": "val_acc"}, array]


class SpaceSchema(Schema):
    """A search space (`bnas search SPACE.yaml`)."""

    model_config = ConfigDict(title="Search space")
    keys: ClassVar[tuple[str, ...]] = (
        "name",
        "catalog",
        "dataset",
        "input",
        "num_classes",
        "stem",
        "cells",
        "macro",
        "head",
        "budget",
        "train_subset",
        "objectives",
        "constraints",
        "pruner",
        "sampler",
    )

    name: Annotated[
        StrictStr,
        Field(min_length=1, pattern=r"^[^/\\ ]+$"),
        expect("a name without spaces or slashes (it names the study and the run folder)"),
    ] = Field("space", description="Names the study and the run folder: no spaces or slashes.")
    catalog: Annotated[
        list[Annotated[StrictStr, Field(min_length=1), expect("a catalog file path")]],
        expect("a list of catalog file paths"),
    ] = Field(
        default_factory=list,
        description="Catalog YAML files of your own op presets and binarizations (`bnas.load_catalog`), "
        "relative to this file; loaded before the ops are checked, so `ops:` may name their presets.",
    )
    dataset: Annotated[
        StrictStr,
        says(lambda v: f"unknown dataset {short_repr(v)}; expected one of {', '.join(DATASETS)} or imagefolder:PATH"),
    ] = Field(
        "digits",
        json_schema_extra=_dataset_schema,
        description="digits | mnist | fashion_mnist | cifar10 | synthetic | imagefolder:PATH",
    )
    input: Annotated[list[PositiveInt], Field(min_length=3, max_length=3), chw, expect("[C, H, W]")] = Field(
        description="[C, H, W] of the dataset's images."
    )
    num_classes: PositiveInt = Field(description="Classes of the dataset.")
    stem: SpaceLayers = Field(default_factory=list, description="Fixed layers before the searched body.")
    cells: CellChoices | None = Field(
        None, description="The searched cell: ops, nodes, inputs, edges_per_node, combine, reduce_cell."
    )
    macro: Macro = Field(description="The searched macro layout: stages, channels, cells_per_stage, stage_ops.")
    head: SpaceLayers = Field(
        [OpEntry.model_validate({"op": "global_avgpool"}), OpEntry.model_validate({"op": "linear"})],
        json_schema_extra={"default": [{"op": "global_avgpool"}, {"op": "linear"}]},
        description="Fixed layers after the body (default: global_avgpool, linear).",
    )
    budget: Annotated[
        RecipeSchema,
        mapping_or("expected a mapping of training recipe keys (epochs, batch_size, optimizer, ...)", allow_none=False),
    ] = Field(description="The training recipe of every trial (the keys of a genotype's `training:`).")
    train_subset: PositiveInt | None = Field(
        None, description="Trials train on this many training images (a seeded subset); validation stays whole."
    )
    objectives: Annotated[
        list[
            Annotated[
                ObjectiveName,
                says(lambda v: f"unknown objective {short_repr(v)}; expected one of {', '.join(OBJECTIVES)}"),
            ]
        ],
        Field(json_schema_extra=_objectives_schema),
        BeforeValidator(_objectives_start_with_val_acc),
    ] = Field(["val_acc"], description="[val_acc], or val_acc and one or more of ops, size, latency.")
    constraints: Constraints | None = Field(
        None,
        description="Bounds checked before any training: max_ops, min_ops, max_size_bytes, max_params, max_latency_ms.",
    )
    pruner: Annotated[PrunerName, expect("median, hyperband or none")] = Field(
        "median", description="Stops poor trials early (single-objective studies): median | hyperband | none."
    )
    sampler: Annotated[SamplerName, expect("tpe, random, nsga2 or gp")] = Field(
        "tpe", description="Proposes trials: tpe | random | nsga2 | gp."
    )

    @field_validator("dataset", mode="after")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _dataset(value)

    @field_validator("objectives", mode="after")
    @classmethod
    def _objectives_once(cls, value: list[str]) -> list[str]:
        return _no_repeats("objectives")(value)

    @model_validator(mode="after")
    def _cells_or_stage_ops(self) -> SpaceSchema:
        has_cells, has_ops = self.cells is not None, bool(self.macro.stage_ops)
        if has_cells == has_ops:
            raise fail(
                "a space searches either cells (`cells:`) or one block op per stage (`macro.stage_ops`); "
                f"this one has {'both' if has_cells else 'neither'}",
                *(("macro", "stage_ops") if has_cells else ("macro",)),
            )
        return self
