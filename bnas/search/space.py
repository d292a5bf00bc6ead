"""Search-space YAML -> ``SearchSpace``; an Optuna trial -> an ordinary ``Genotype``.

The mapping is define-by-run (Optuna's style): ``sample_genotype(trial, space)`` asks the
trial for each choice as it builds the genotype, so the parameters a trial has are exactly
the choices its genotype made.

```yaml
name: quickstart
dataset: digits
input: [1, 8, 8]
num_classes: 10
stem: [{op: conv_bn, channels: 16}]
cells:                      # searched micro-architecture (DARTS-style)
  ops: [binary_conv_3x3, skip_connect, zero, ...]
  nodes: 2                  # intermediate nodes per cell
  inputs: 2                 # cell inputs (k-2, k-1), or 1
  edges_per_node: 2
  combine: concat           # or sum
  reduce_cell: true         # search a separate reduce cell for stride-2 stages
macro:                      # searched macro-architecture (BARS-style)
  stages: 2                 # a reduction between consecutive stages
  channels: [16, 32]        # choices for the first stage's width (doubling per stage)
  cells_per_stage: [1, 2]   # choices of depth, per stage
head: [{op: global_avgpool}, {op: linear}]
budget:                     # the training recipe of every trial (bnas.train.Recipe keys)
  epochs: 4
  batch_size: 64
  optimizer: {name: adam, lr: 0.005}
objectives: [val_acc]       # or [val_acc, ops] / [val_acc, size] / [val_acc, latency]
constraints: {max_ops: 2.0e6, max_size_bytes: 100000}
pruner: median              # default pruner for single-objective studies
```
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import GenotypeError
from ..genotype import Genotype, genotype_from_dict
from ..yaml_io import read_yaml_mapping

__all__ = ["SearchSpace", "load_space", "sample_genotype", "OBJECTIVES"]

# objective name -> (optuna direction, metric key in the trial's metrics)
OBJECTIVES: dict[str, str] = {"val_acc": "maximize", "ops": "minimize", "size": "minimize", "latency": "minimize"}
_TOP = ("name", "dataset", "input", "num_classes", "stem", "cells", "macro", "head", "budget", "objectives", "constraints", "pruner", "sampler")
_CONSTRAINTS = ("max_ops", "max_size_bytes", "max_params", "max_latency_ms")


@dataclass(frozen=True)
class CellChoices:
    ops: tuple[str, ...]
    nodes: int = 2
    inputs: int = 2
    edges_per_node: int = 2
    combine: str = "concat"
    reduce_cell: bool = True


@dataclass(frozen=True)
class MacroChoices:
    stages: int = 2
    channels: tuple[int, ...] = (16,)
    cells_per_stage: tuple[int, ...] = (1,)
    stage_ops: tuple[str, ...] = ()  # optional: a plain op per stage instead of cells


@dataclass(frozen=True)
class SearchSpace:
    name: str
    dataset: str
    input: tuple[int, int, int]
    num_classes: int
    stem: tuple[Mapping[str, Any], ...]
    cells: CellChoices | None
    macro: MacroChoices
    head: tuple[Mapping[str, Any], ...]
    budget: Mapping[str, Any]
    objectives: tuple[str, ...] = ("val_acc",)
    constraints: Mapping[str, float] = field(default_factory=dict)
    pruner: str = "median"
    sampler: str = "tpe"
    source: str | None = None

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def epochs(self) -> int:
        return int(self.budget.get("epochs", 10))


def _err(message: str, path: str) -> GenotypeError:
    return GenotypeError(message, path)


def _int_list(value: Any, path: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items):
        raise _err(f"expected a positive integer or a non-empty list of them, got {value!r}", path)
    return tuple(items)


def _positive(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(f"expected a positive integer, got {value!r}", path)
    return value


def _check_op(name: Any, path: str) -> str:
    from ..registry import UnknownPrimitiveError, get_spec

    if not isinstance(name, str):
        raise _err(f"expected an op name, got {name!r}", path)
    try:
        get_spec(name)
    except UnknownPrimitiveError as exc:
        raise _err(str(exc), path) from None
    return name


def _parse(data: Mapping[str, Any]) -> SearchSpace:
    for key in data:
        if key not in _TOP:
            import difflib

            close = difflib.get_close_matches(str(key), _TOP, n=1)
            raise _err(f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else f"; expected some of {', '.join(_TOP)}"), str(key))
    for key in ("input", "num_classes", "macro", "budget"):
        if key not in data:
            raise _err(f"missing required key {key!r}", key)
    name = data.get("name", "space")
    dataset = data.get("dataset", "digits")
    if not isinstance(dataset, str):
        raise _err(f"expected a dataset name, got {dataset!r}", "dataset")
    shape = data["input"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise _err(f"expected [C, H, W], got {shape!r}", "input")
    shape_t = tuple(_positive(v, f"input[{i}]") for i, v in enumerate(shape))
    num_classes = _positive(data["num_classes"], "num_classes")

    cells = None
    raw_cells = data.get("cells")
    if raw_cells is not None:
        if not isinstance(raw_cells, dict):
            raise _err("expected a mapping with ops, nodes, inputs, edges_per_node, combine", "cells")
        allowed = ("ops", "nodes", "inputs", "edges_per_node", "combine", "reduce_cell")
        for key in raw_cells:
            if key not in allowed:
                raise _err(f"unknown key {key!r}; expected some of {', '.join(allowed)}", f"cells.{key}")
        ops = raw_cells.get("ops")
        if not isinstance(ops, list) or not ops:
            raise _err("expected a non-empty list of op names", "cells.ops")
        ops_t = tuple(_check_op(op, f"cells.ops[{i}]") for i, op in enumerate(ops))
        inputs = raw_cells.get("inputs", 2)
        if inputs not in (1, 2) or isinstance(inputs, bool):
            raise _err(f"expected 1 or 2, got {inputs!r}", "cells.inputs")
        combine = raw_cells.get("combine", "concat")
        if combine not in ("concat", "sum"):
            raise _err(f"invalid combine {combine!r}; expected concat or sum", "cells.combine")
        cells = CellChoices(
            ops=ops_t,
            nodes=_positive(raw_cells.get("nodes", 2), "cells.nodes"),
            inputs=inputs,
            edges_per_node=_positive(raw_cells.get("edges_per_node", 2), "cells.edges_per_node"),
            combine=combine,
            reduce_cell=bool(raw_cells.get("reduce_cell", True)),
        )
    macro = data["macro"]
    if not isinstance(macro, dict):
        raise _err("expected a mapping with stages, channels, cells_per_stage", "macro")
    for key in macro:
        if key not in ("stages", "channels", "cells_per_stage", "stage_ops"):
            raise _err(f"unknown key {key!r}; expected stages, channels, cells_per_stage or stage_ops", f"macro.{key}")
    stage_ops = tuple(_check_op(op, f"macro.stage_ops[{i}]") for i, op in enumerate(macro.get("stage_ops") or []))
    if cells is None and not stage_ops:
        raise _err("a space needs searched cells (`cells:`) or a list of block ops (`macro.stage_ops`)", "macro")
    macro_t = MacroChoices(
        stages=_positive(macro.get("stages", 2), "macro.stages"),
        channels=_int_list(macro.get("channels", 16), "macro.channels"),
        cells_per_stage=_int_list(macro.get("cells_per_stage", 1), "macro.cells_per_stage"),
        stage_ops=stage_ops,
    )
    budget = data["budget"]
    if not isinstance(budget, dict):
        raise _err("expected a mapping of training recipe keys (epochs, batch_size, optimizer, ...)", "budget")
    from ..train import Recipe, TrainingError

    try:
        Recipe.from_dict(budget, "budget")
    except TrainingError as exc:
        raise _err(str(exc).split(": ", 1)[-1], "budget") from None
    objectives = data.get("objectives", ["val_acc"])
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not objectives or objectives[0] != "val_acc":
        raise _err(f"expected a list starting with val_acc, e.g. [val_acc] or [val_acc, ops]; got {objectives!r}", "objectives")
    for i, o in enumerate(objectives):
        if o not in OBJECTIVES:
            raise _err(f"unknown objective {o!r}; expected one of {', '.join(OBJECTIVES)}", f"objectives[{i}]")
    constraints = data.get("constraints") or {}
    if not isinstance(constraints, dict):
        raise _err("expected a mapping like {max_ops: 1.0e6}", "constraints")
    for key, value in constraints.items():
        if key not in _CONSTRAINTS:
            raise _err(f"unknown constraint {key!r}; expected some of {', '.join(_CONSTRAINTS)}", f"constraints.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            hint = " (YAML reads 3.0e7 as text: write 3.0e+7)" if isinstance(value, str) and "e" in value.lower() else ""
            raise _err(f"expected a positive number, got {value!r}{hint}", f"constraints.{key}")
    pruner = data.get("pruner", "median")
    if pruner not in ("median", "hyperband", "none"):
        raise _err(f"expected median, hyperband or none, got {pruner!r}", "pruner")
    sampler = data.get("sampler", "tpe")
    if sampler not in ("tpe", "random", "nsga2", "gp"):
        raise _err(f"expected tpe, random, nsga2 or gp, got {sampler!r}", "sampler")
    for section in ("stem", "head"):
        if not isinstance(data.get(section, []), list):
            raise _err("expected a list of layers", section)
    space = SearchSpace(
        name=str(name), dataset=dataset, input=shape_t, num_classes=num_classes,  # type: ignore[arg-type]
        stem=tuple(copy.deepcopy(data.get("stem") or [])), cells=cells, macro=macro_t,
        head=tuple(copy.deepcopy(data.get("head") or [{"op": "global_avgpool"}, {"op": "linear"}])),
        budget=copy.deepcopy(budget), objectives=tuple(objectives), constraints=dict(constraints),
        pruner=pruner, sampler=sampler,
    )
    _validate_layers(space)
    return space


def _validate_layers(space: SearchSpace) -> None:
    """Stem and head entries are checked by building a genotype from them (same errors)."""
    probe = {"name": "probe", "input": list(space.input), "num_classes": space.num_classes,
             "stem": list(space.stem), "body": [{"op": "skip_connect"}], "head": list(space.head)}
    genotype_from_dict(probe)


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Load and validate a search-space file; errors name the file and the YAML path."""
    path = Path(path)
    data = read_yaml_mapping(path, what="search space")
    try:
        space = _parse(data)
    except GenotypeError as exc:
        raise exc.in_file(str(path)) from None
    object.__setattr__(space, "source", str(path))
    return space


def _sample_cell(trial: Any, cells: CellChoices, prefix: str) -> dict[str, Any]:
    inputs = ["in0", "in1"] if cells.inputs == 2 else ["in1"]
    nodes: dict[str, list[list[str]]] = {}
    for i in range(cells.nodes):
        node = f"n{i}"
        candidates = inputs + [f"n{j}" for j in range(i)]
        edges = []
        for e in range(cells.edges_per_node):
            source = trial.suggest_categorical(f"{prefix}.{node}.e{e}.input", candidates)
            op = trial.suggest_categorical(f"{prefix}.{node}.e{e}.op", list(cells.ops))
            edges.append([op, source])
        nodes[node] = edges
    # Every node feeds the output (DARTS concatenates all intermediate nodes), so every
    # sampled cell is a valid DAG.
    return {"inputs": cells.inputs, "nodes": nodes, "output": {"combine": cells.combine, "nodes": list(nodes)}}


def sample_genotype(trial: Any, space: SearchSpace) -> Genotype:
    """Ask ``trial`` (an ``optuna.Trial``, or anything with ``suggest_categorical``) for every
    choice of ``space`` and return the genotype those choices describe."""
    macro = space.macro
    width = trial.suggest_categorical("channels", list(macro.channels))
    body: list[dict[str, Any]] = []
    cells: dict[str, Any] = {}
    if space.cells is not None:
        cells["normal"] = _sample_cell(trial, space.cells, "normal")
        if space.cells.reduce_cell and macro.stages > 1:
            cells["reduce"] = _sample_cell(trial, space.cells, "reduce")
    for stage in range(macro.stages):
        channels = width * 2 ** stage
        depth = trial.suggest_categorical(f"stage{stage}.cells", list(macro.cells_per_stage))
        if macro.stage_ops:
            op = trial.suggest_categorical(f"stage{stage}.op", list(macro.stage_ops))
            body.append({"op": op, "channels": channels, **({"stride": 2} if stage else {}), **({"repeat": depth} if depth > 1 else {})})
            continue
        if stage and "reduce" in cells:
            body.append({"cell": "reduce", "channels": channels, "stride": 2})
        elif stage:
            body.append({"cell": "normal", "channels": channels, "stride": 2})
            depth -= 1
        if depth > 0:
            body.append({"cell": "normal", "channels": channels, **({"repeat": depth} if depth > 1 else {})})
    data = {
        "name": f"{space.name}-trial-{getattr(trial, 'number', 0)}",
        "input": list(space.input),
        "num_classes": space.num_classes,
        "stem": [dict(x) for x in space.stem],
        **({"cells": cells} if cells else {}),
        "body": body,
        "head": [dict(x) for x in space.head],
        "training": copy.deepcopy(dict(space.budget)),
    }
    return genotype_from_dict(data)
