"""Search-space YAML -> ``SearchSpace``; an Optuna trial -> an ordinary ``Genotype``.

The mapping is define-by-run (Optuna's style): ``sample_genotype(trial, space)`` asks the
trial for each choice as it builds the genotype, so the parameters a trial has are exactly
the choices its genotype made.

```yaml
name: quickstart
dataset: digits             # digits | mnist | fashion_mnist | cifar10 | imagefolder:PATH | synthetic
input: [1, 8, 8]
num_classes: 10
stem: [{op: conv_bn, channels: 16}]
cells:                      # searched micro-architecture (DARTS-style)
  ops: [binary_conv_3x3, skip_connect, zero, ...]
  nodes: 2                  # intermediate nodes per cell
  inputs: 2                 # cell inputs (k-2, k-1), or 1
  edges_per_node: 2         # each node sums this many (input, op) edges
  combine: concat           # or sum: how the cell output joins its nodes
  reduce_cell: true         # search a separate reduce cell for the stride-2 stage entries
macro:                      # searched macro-architecture (BARS-style)
  stages: 2                 # a reduction (stride 2) opens every stage after the first
  channels: [16, 32]        # choices of the first stage's width (doubling per stage), or
                            # one choice list per stage: [[16, 24], [32, 48]]
  cells_per_stage: [1, 2]   # choices of depth for every stage, or one list per stage
  stage_ops: []             # optional: search one plain block op per stage instead of cells
head: [{op: global_avgpool}, {op: linear}]
budget:                     # the training recipe of every trial (bnas.train.Recipe keys)
  epochs: 4
  batch_size: 64
  optimizer: {name: adam, lr: 0.005}
train_subset: 10000         # optional: trials train on this many training images (a seeded
                            # subset; a proxy task), validation stays the full split
objectives: [val_acc]       # or [val_acc, ops] / [val_acc, size] / [val_acc, latency]
constraints: {max_ops: 2.0e+6, max_size_bytes: 100000}   # checked before any training
pruner: median              # median | hyperband | none (single-objective studies)
sampler: tpe                # tpe | random | nsga2 | gp
```

Depth per stage decides where the reductions fall in the sequence of cells, so searching
it searches the macro layout, as BARS does.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from ..builder import check_op_name, check_ops
from ..errors import GenotypeError, short_repr
from ..genotype import COMBINES, Genotype, genotype_from_dict
from ..yaml_io import check_limit, read_yaml_mapping

__all__ = ["SearchSpace", "CellChoices", "MacroChoices", "load_space", "parse_space", "sample_genotype", "OBJECTIVES",
           "CONSTRAINTS", "SAMPLERS", "PRUNERS"]

# objective name -> Optuna direction
OBJECTIVES: dict[str, str] = {"val_acc": "maximize", "ops": "minimize", "size": "minimize", "latency": "minimize"}
# constraint -> the trial metric it bounds (all measured before training)
CONSTRAINTS: dict[str, str] = {"max_ops": "ops", "max_size_bytes": "size", "max_params": "params", "max_latency_ms": "latency_ms"}
SAMPLERS = ("tpe", "random", "nsga2", "gp")
PRUNERS = ("median", "hyperband", "none")
_TOP = ("name", "dataset", "input", "num_classes", "stem", "cells", "macro", "head", "budget", "train_subset",
        "objectives", "constraints", "pruner", "sampler")
_CELL_KEYS = ("ops", "nodes", "inputs", "edges_per_node", "combine", "reduce_cell")
_MACRO_KEYS = ("stages", "channels", "cells_per_stage", "stage_ops")
_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")


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
    # One tuple of width choices per stage; ``doubling`` means a single choice (the first
    # stage's width) with every later stage at twice the previous one.
    channels: tuple[tuple[int, ...], ...] = ((16,),)
    doubling: bool = True
    cells_per_stage: tuple[tuple[int, ...], ...] = ((1,),)
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
    train_subset: int | None = None
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

    @property
    def needs_latency(self) -> bool:
        return "latency" in self.objectives or "max_latency_ms" in self.constraints

    def fingerprint(self) -> str:
        """A hash of everything that decides what a trial is and how it is scored.

        The sampler and pruner are left out (switching them on a resumed study is fine); the
        file path and the comments too. A study remembers this, so resuming it with a
        different space is refused instead of mixing incomparable trials.
        """
        data = asdict(self)
        for key in ("source", "sampler", "pruner"):
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _err(message: str, path: str) -> GenotypeError:
    return GenotypeError(message, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any, path: str) -> int:
    if not _is_int(value) or value <= 0:
        raise _err(f"expected a positive integer, got {short_repr(value)}", path)
    return value


def _choices(value: Any, path: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _err("expected a positive integer or a non-empty list of them, got []", path)
    for i, v in enumerate(items):
        if not _is_int(v) or v <= 0:
            where = f"{path}[{i}]" if isinstance(value, list) else path
            raise _err(f"expected a positive integer or a non-empty list of them, got {short_repr(v)}", where)
    if len(set(items)) != len(items):
        raise _err(f"repeated choices in {short_repr(value)}", path)
    return tuple(items)


def _per_stage(value: Any, stages: int, path: str) -> tuple[tuple[tuple[int, ...], ...], bool]:
    """A flat choice list (shared) or one choice list per stage; returns (per stage, shared)."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if len(value) != stages:
            raise _err(f"expected one choice list per stage ({stages} stages), got {len(value)}", path)
        return tuple(_choices(v, f"{path}[{i}]") for i, v in enumerate(value)), False
    if isinstance(value, list) and any(isinstance(v, list) for v in value):
        raise _err("expected a list of integers, or a list of integer lists (one per stage), not a mixture", path)
    shared = _choices(value, path)
    return tuple(shared for _ in range(stages)), True


def _check_op(name: Any, path: str) -> str:
    # The space is the search's input, so its ops are resolved on load, by the builder's check.
    if not isinstance(name, str):
        raise _err(f"expected an op name, got {short_repr(name)}", path)
    return check_op_name(name, path)


def _unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected some of {', '.join(allowed)}"
            raise _err(f"unknown key {short_repr(key)}{hint}", f"{prefix}{str(key)[:40]}")


def _parse_cells(raw: Any) -> CellChoices:
    if not isinstance(raw, dict):
        raise _err(f"expected a mapping with {', '.join(_CELL_KEYS)}", "cells")
    _unknown_keys(raw, _CELL_KEYS, "cells.")
    ops = raw.get("ops")
    if not isinstance(ops, list) or not ops:
        raise _err("expected a non-empty list of op names (see `bnas primitives`)", "cells.ops")
    ops_t = tuple(_check_op(op, f"cells.ops[{i}]") for i, op in enumerate(ops))
    if len(set(ops_t)) != len(ops_t):
        raise _err(f"repeated ops in {list(ops_t)}", "cells.ops")
    inputs = raw.get("inputs", 2)
    if not _is_int(inputs) or inputs not in (1, 2):
        raise _err(f"expected 1 or 2, got {short_repr(inputs)}", "cells.inputs")
    combine = raw.get("combine", "concat")
    if combine not in COMBINES:
        raise _err(f"invalid combine {short_repr(combine)}; expected {' or '.join(COMBINES)}", "cells.combine")
    reduce_cell = raw.get("reduce_cell", True)
    if not isinstance(reduce_cell, bool):
        raise _err(f"expected true or false, got {short_repr(reduce_cell)}", "cells.reduce_cell")
    return CellChoices(
        ops=ops_t,
        nodes=check_limit("NODES", _positive(raw.get("nodes", 2), "cells.nodes"), "cells.nodes", "the number of nodes per cell"),
        inputs=inputs,
        edges_per_node=check_limit("NODES", _positive(raw.get("edges_per_node", 2), "cells.edges_per_node"),
                                   "cells.edges_per_node", "the number of edges per node"),
        combine=combine,
        reduce_cell=reduce_cell,
    )


def _parse_macro(raw: Any, has_cells: bool) -> MacroChoices:
    if not isinstance(raw, dict):
        raise _err(f"expected a mapping with {', '.join(_MACRO_KEYS)}", "macro")
    _unknown_keys(raw, _MACRO_KEYS, "macro.")
    stages = check_limit("STAGES", _positive(raw.get("stages", 2), "macro.stages"), "macro.stages")
    stage_ops_raw = raw.get("stage_ops") or []
    if not isinstance(stage_ops_raw, list):
        raise _err(f"expected a list of op names, got {short_repr(stage_ops_raw)}", "macro.stage_ops")
    stage_ops = tuple(_check_op(op, f"macro.stage_ops[{i}]") for i, op in enumerate(stage_ops_raw))
    if has_cells == bool(stage_ops):
        raise _err("a space searches either cells (`cells:`) or one block op per stage (`macro.stage_ops`); "
                   f"this one has {'both' if has_cells else 'neither'}", "macro.stage_ops" if has_cells else "macro")
    channels, doubling = _per_stage(raw.get("channels", 16), stages, "macro.channels")
    depths, _ = _per_stage(raw.get("cells_per_stage", 1), stages, "macro.cells_per_stage")
    if doubling:
        channels = channels[:1]
    _check_macro_caps(channels, doubling, depths, stages)
    return MacroChoices(stages=stages, channels=channels, doubling=doubling, cells_per_stage=depths, stage_ops=stage_ops)


def _check_macro_caps(channels: tuple[tuple[int, ...], ...], doubling: bool, depths: tuple[tuple[int, ...], ...],
                      stages: int) -> None:
    """Every width and depth a trial may sample is within the caps a built network must meet."""
    for s, choices in enumerate(channels):
        path = "macro.channels" if doubling else f"macro.channels[{s}]"
        # With doubling, the last stage is 2**(stages-1) times the first choice.
        widest = max(choices) * (2 ** (stages - 1) if doubling else 1)
        what = f"the last stage's width ({max(choices)} doubled over {stages} stages)" if doubling and stages > 1 else None
        check_limit("CHANNELS", widest, path, what)
    for s, choices in enumerate(depths):
        check_limit("REPEAT", max(choices), f"macro.cells_per_stage[{s}]", "the number of cells in a stage")
    check_limit("LAYERS", sum(max(c) for c in depths), "macro.cells_per_stage",
                "the number of cells of the deepest network (every stage at its largest depth)")


def _parse_budget(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _err("expected a mapping of training recipe keys (epochs, batch_size, optimizer, ...)", "budget")
    from ..train import Recipe, TrainingError

    try:
        Recipe.from_dict(raw, "budget")
    except TrainingError as exc:
        # The recipe error carries its dotted key ("budget.epochs"): that is the YAML path.
        raise _err(exc.message, exc.path or "budget") from None
    return copy.deepcopy(raw)


def _parse_objectives(raw: Any) -> tuple[str, ...]:
    objectives = [raw] if isinstance(raw, str) else raw
    if not isinstance(objectives, list) or not objectives or objectives[0] != "val_acc":
        raise _err(f"expected a list starting with val_acc, e.g. [val_acc] or [val_acc, ops]; got {short_repr(raw)}", "objectives")
    for i, o in enumerate(objectives):
        if o not in OBJECTIVES:
            raise _err(f"unknown objective {short_repr(o)}; expected one of {', '.join(OBJECTIVES)}", f"objectives[{i}]")
    if len(set(objectives)) != len(objectives):
        raise _err(f"repeated objectives in {short_repr(objectives)}", "objectives")
    return tuple(objectives)


def _parse_constraints(raw: Any) -> dict[str, float]:
    constraints = raw or {}
    if not isinstance(constraints, dict):
        raise _err("expected a mapping like {max_ops: 1.0e+6}", "constraints")
    for key, value in constraints.items():
        if key not in CONSTRAINTS:
            raise _err(f"unknown constraint {short_repr(key)}; expected some of {', '.join(CONSTRAINTS)}", f"constraints.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            # PyYAML (YAML 1.1) reads 3.0e7 as a string; only 3.0e+7 is a float.
            hint = " (YAML reads 3.0e7 as text: write 3.0e+7)" if isinstance(value, str) and "e" in value.lower() else ""
            raise _err(f"expected a positive number, got {short_repr(value)}{hint}", f"constraints.{key}")
    return {k: float(v) for k, v in constraints.items()}


def parse_space(data: Mapping[str, Any]) -> SearchSpace:
    """Validate a search-space mapping (errors carry the YAML path; ``load_space`` adds the file)."""
    _unknown_keys(data, _TOP, "")
    for key in ("input", "num_classes", "macro", "budget"):
        if key not in data:
            raise _err(f"missing required key {short_repr(key)}", key)
    name = data.get("name", "space")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise _err(f"expected a name without spaces or slashes (it names the study and the run folder), got {short_repr(name)}", "name")
    dataset = data.get("dataset", "digits")
    if not isinstance(dataset, str) or not (dataset in _DATASETS or dataset.startswith("imagefolder:")):
        close = difflib.get_close_matches(str(dataset), _DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _err(f"unknown dataset {short_repr(dataset)}{hint}; expected one of {', '.join(_DATASETS)} or imagefolder:PATH", "dataset")
    shape = data["input"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise _err(f"expected [C, H, W], got {short_repr(shape)}", "input")
    shape_t = tuple(_positive(v, f"input[{i}]") for i, v in enumerate(shape))
    num_classes = _positive(data["num_classes"], "num_classes")
    cells = _parse_cells(data["cells"]) if data.get("cells") is not None else None
    macro = _parse_macro(data["macro"], cells is not None)
    budget = _parse_budget(data["budget"])
    subset = data.get("train_subset")
    if subset is not None:
        subset = _positive(subset, "train_subset")
    objectives = _parse_objectives(data.get("objectives", ["val_acc"]))
    constraints = _parse_constraints(data.get("constraints"))
    pruner = data.get("pruner", "median")
    if pruner not in PRUNERS:
        raise _err(f"expected {', '.join(PRUNERS[:-1])} or {PRUNERS[-1]}, got {short_repr(pruner)}", "pruner")
    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _err(f"expected {', '.join(SAMPLERS[:-1])} or {SAMPLERS[-1]}, got {short_repr(sampler)}", "sampler")
    for section in ("stem", "head"):
        if not isinstance(data.get(section, []), list):
            raise _err("expected a list of layers", section)
    space = SearchSpace(
        name=name, dataset=dataset, input=shape_t, num_classes=num_classes,  # type: ignore[arg-type]
        stem=tuple(copy.deepcopy(data.get("stem") or [])), cells=cells, macro=macro,
        head=tuple(copy.deepcopy(data.get("head") or [{"op": "global_avgpool"}, {"op": "linear"}])),
        budget=budget, objectives=objectives, constraints=constraints, pruner=pruner, sampler=sampler,
        train_subset=subset,
    )
    _validate_layers(space)
    return space


def _validate_layers(space: SearchSpace) -> None:
    """Stem and head entries are checked as a genotype's are: parsed, and their ops resolved
    (same errors)."""
    probe = {"name": "probe", "input": list(space.input), "num_classes": space.num_classes,
             "stem": list(space.stem), "body": [{"op": "skip_connect"}], "head": list(space.head)}
    check_ops(genotype_from_dict(probe))


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Load and validate a search-space file; errors name the file and the YAML path."""
    path = Path(path)
    data = read_yaml_mapping(path, what="search space")
    try:
        space = parse_space(data)
    except GenotypeError as exc:
        raise exc.in_file(str(path)) from None
    object.__setattr__(space, "source", str(path))
    return space


class ChoiceSource(Protocol):
    """What ``sample_genotype`` needs from a trial: ``optuna.Trial``, ``FixedTrial``, ..."""

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...


def _sample_cell(trial: ChoiceSource, cells: CellChoices, prefix: str) -> dict[str, Any]:
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
    # Every node feeds the output (DARTS combines all intermediate nodes), so every sampled
    # cell is a valid DAG: acyclic by construction, each node reachable and used.
    return {"inputs": cells.inputs, "nodes": nodes, "output": {"combine": cells.combine, "nodes": list(nodes)}}


def _stage_widths(trial: ChoiceSource, macro: MacroChoices) -> list[int]:
    if macro.doubling:
        width = trial.suggest_categorical("channels", list(macro.channels[0]))
        return [width * 2 ** s for s in range(macro.stages)]
    return [trial.suggest_categorical(f"stage{s}.channels", list(macro.channels[s])) for s in range(macro.stages)]


def sample_genotype(trial: ChoiceSource, space: SearchSpace, training: Mapping[str, Any] | None = None) -> Genotype:
    """Ask ``trial`` for every choice of ``space`` and return the genotype those choices describe.

    ``training`` entries are added to the genotype's recipe (the search records its seed
    there, so ``bnas eval`` on the genotype file repeats the trial's training exactly).
    """
    macro = space.macro
    widths = _stage_widths(trial, macro)
    body: list[dict[str, Any]] = []
    cells: dict[str, Any] = {}
    if space.cells is not None:
        cells["normal"] = _sample_cell(trial, space.cells, "normal")
        if space.cells.reduce_cell and macro.stages > 1:
            cells["reduce"] = _sample_cell(trial, space.cells, "reduce")
    for stage, channels in enumerate(widths):
        depth = trial.suggest_categorical(f"stage{stage}.cells", list(macro.cells_per_stage[stage]))
        if macro.stage_ops:
            op = trial.suggest_categorical(f"stage{stage}.op", list(macro.stage_ops))
            body.append({"op": op, "channels": channels, **({"stride": 2} if stage else {}), **({"repeat": depth} if depth > 1 else {})})
            continue
        if stage:
            # The stage opens with its reduction: the reduce cell, else a stride-2 normal cell.
            body.append({"cell": "reduce" if "reduce" in cells else "normal", "channels": channels, "stride": 2})
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
        "training": {**copy.deepcopy(dict(space.budget)), **dict(training or {})},
    }
    return genotype_from_dict(data)
