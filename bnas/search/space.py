"""Search-space YAML -> ``SearchSpace``; an Optuna trial -> an ordinary ``Genotype``.

The mapping is define-by-run (Optuna's style): ``sample_genotype(trial, space)`` asks the
trial for each choice as it builds the genotype, so the parameters a trial has are exactly
the choices its genotype made.

```yaml
name: quickstart
catalog: [my_ops.yaml]      # optional: your own op presets (paths relative to this file)
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
  preprocess: binary        # how cells align their inputs: real (default) | darts | binary | identity
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
constraints: {max_ops: 2.0e+6, max_size_bytes: 100000}   # checked before any training;
                            # min_ops sets a floor (a band of sizes with max_ops)
pruner: median              # median | hyperband | none (single-objective studies)
sampler: tpe                # tpe | random | nsga2 | gp
```

Depth per stage decides where the reductions fall in the sequence of cells, so searching
it searches the macro layout, as BARS does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..builder import check_op_name, check_ops
from ..errors import GenotypeError
from ..genotype import Genotype, genotype_from_dict
from ..registry import CatalogError, load_catalog
from ..schemas import space as schema
from ..schemas import validate
from ..yaml_io import check_limit, read_yaml_mapping

__all__ = [
    "CONSTRAINTS",
    "FLOORS",
    "OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "CellChoices",
    "MacroChoices",
    "SearchSpace",
    "load_space",
    "parse_space",
    "sample_genotype",
]

# The names are the schema's (``bnas.schemas.space``); what each one means is here.
# objective name -> Optuna direction
OBJECTIVES: dict[str, str] = {name: "maximize" if name == "val_acc" else "minimize" for name in schema.OBJECTIVES}
# constraint -> the trial metric it bounds (all measured before training)
_BOUNDED = {
    "max_ops": "ops",
    "min_ops": "ops",
    "max_size_bytes": "size",
    "max_params": "params",
    "max_latency_ms": "latency_ms",
}
CONSTRAINTS: dict[str, str] = {name: _BOUNDED[name] for name in schema.CONSTRAINTS}
# The constraints that bound their metric from below; every other one is a ceiling.
FLOORS: frozenset[str] = frozenset({"min_ops"})
SAMPLERS = schema.SAMPLERS
PRUNERS = schema.PRUNERS


@dataclass(frozen=True)
class CellChoices:
    ops: tuple[str, ...]
    nodes: int = 2
    inputs: int = 2
    edges_per_node: int = 2
    combine: str = "concat"
    reduce_cell: bool = True
    # The genotype's ``preprocess`` as written (a kind or a mapping); None: the builder's default.
    preprocess: str | Mapping[str, Any] | None = None


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
    # ``catalog:`` as written, the files it names (absolute), and a hash of their text: a
    # preset edited between runs changes what a trial is, as an edited space does.
    catalog: tuple[str, ...] = ()
    catalog_files: tuple[str, ...] = ()
    catalog_sha: str = ""

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
        for key in ("source", "sampler", "pruner", "catalog_files"):
            data.pop(key)
        if not self.catalog:  # so a space without catalogs keeps the fingerprint it always had
            data.pop("catalog")
            data.pop("catalog_sha")
        if data.get("cells") is not None and data["cells"]["preprocess"] is None:  # likewise
            data["cells"].pop("preprocess")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Validation: dict -> SearchSpace
# --------------------------------------------------------------------------------------
# The structure is the schema's (``bnas.schemas.space``); what is left here needs more than
# a schema: op names (the registry's), and the size caps (environment variables). The
# dataclasses are built from the data as written.
def _check_op(name: str, path: str) -> str:
    # The space is the search's input, so its ops are resolved on load, by the builder's check.
    return check_op_name(name, path)


def _parse_cells(raw: Mapping[str, Any]) -> CellChoices:
    ops = tuple(_check_op(op, f"cells.ops[{i}]") for i, op in enumerate(raw["ops"]))
    nodes = check_limit("NODES", raw.get("nodes", 2), "cells.nodes", "the number of nodes per cell")
    edges = check_limit("NODES", raw.get("edges_per_node", 2), "cells.edges_per_node", "the number of edges per node")
    return CellChoices(
        ops=ops,
        nodes=nodes,
        inputs=raw.get("inputs", 2),
        edges_per_node=edges,
        combine=raw.get("combine", "concat"),
        reduce_cell=raw.get("reduce_cell", True),
        preprocess=copy.deepcopy(raw.get("preprocess")),
    )


def _per_stage(value: int | list[Any], stages: int) -> tuple[tuple[tuple[int, ...], ...], bool]:
    """A choice or flat choice list (shared by every stage), or one choice list per stage;
    returns (per stage, shared)."""
    if isinstance(value, list) and isinstance(value[0], list):
        return tuple(tuple(choices) for choices in value), False
    shared = tuple(value) if isinstance(value, list) else (value,)
    return tuple(shared for _ in range(stages)), True


def _parse_macro(raw: Mapping[str, Any]) -> MacroChoices:
    stages = check_limit("STAGES", raw.get("stages", 2), "macro.stages")
    stage_ops = tuple(_check_op(op, f"macro.stage_ops[{i}]") for i, op in enumerate(raw.get("stage_ops") or []))
    channels, doubling = _per_stage(raw.get("channels", 16), stages)
    depths, _ = _per_stage(raw.get("cells_per_stage", 1), stages)
    if doubling:
        channels = channels[:1]
    _check_macro_caps(channels, doubling, depths, stages)
    return MacroChoices(
        stages=stages, channels=channels, doubling=doubling, cells_per_stage=depths, stage_ops=stage_ops
    )


def _check_macro_caps(
    channels: tuple[tuple[int, ...], ...], doubling: bool, depths: tuple[tuple[int, ...], ...], stages: int
) -> None:
    """Every width and depth a trial may sample is within the caps a built network must meet."""
    for s, choices in enumerate(channels):
        path = "macro.channels" if doubling else f"macro.channels[{s}]"
        # With doubling, the last stage is 2**(stages-1) times the first choice.
        widest = max(choices) * (2 ** (stages - 1) if doubling else 1)
        what = (
            f"the last stage's width ({max(choices)} doubled over {stages} stages)" if doubling and stages > 1 else None
        )
        check_limit("CHANNELS", widest, path, what)
    for s, choices in enumerate(depths):
        check_limit("REPEAT", max(choices), f"macro.cells_per_stage[{s}]", "the number of cells in a stage")
    check_limit(
        "LAYERS",
        sum(max(c) for c in depths),
        "macro.cells_per_stage",
        "the number of cells of the deepest network (every stage at its largest depth)",
    )


def _load_space_catalogs(entries: list[str], base: Path) -> tuple[tuple[str, ...], str]:
    """Register the presets of the space's ``catalog:`` files (relative to ``base``) before
    its op names are checked; returns the files (absolute) and the hash of their text."""
    files: list[str] = []
    digest = hashlib.sha256()
    for i, entry in enumerate(entries):
        path = (base / entry).resolve()
        try:
            load_catalog(path)
        except CatalogError as exc:
            raise GenotypeError(str(exc), f"catalog[{i}]") from None
        files.append(str(path))
        digest.update(path.read_bytes())
    return tuple(files), digest.hexdigest()[:16] if files else ""


def parse_space(data: Mapping[str, Any], base: str | os.PathLike[str] | None = None) -> SearchSpace:
    """Validate a search-space mapping (errors carry the YAML path; ``load_space`` adds the file).

    ``catalog:`` paths are relative to ``base`` (``load_space``: the space file's folder;
    default: the working directory)."""
    validate("space", data)
    catalog = tuple(data.get("catalog") or [])
    catalog_files, catalog_sha = _load_space_catalogs(list(catalog), Path(base) if base is not None else Path.cwd())
    cells = _parse_cells(data["cells"]) if data.get("cells") is not None else None
    macro = _parse_macro(data["macro"])
    objectives = data.get("objectives", ["val_acc"])
    space = SearchSpace(
        name=data.get("name", "space"),
        dataset=data.get("dataset", "digits"),
        input=tuple(data["input"]),
        num_classes=data["num_classes"],
        stem=tuple(copy.deepcopy(data.get("stem") or [])),
        cells=cells,
        macro=macro,
        # An empty head is the default head, as it always was.
        head=tuple(copy.deepcopy(data.get("head") or [{"op": "global_avgpool"}, {"op": "linear"}])),
        budget=copy.deepcopy(data["budget"]),
        objectives=(objectives,) if isinstance(objectives, str) else tuple(objectives),
        constraints={k: float(v) for k, v in (data.get("constraints") or {}).items()},
        pruner=data.get("pruner", "median"),
        sampler=data.get("sampler", "tpe"),
        train_subset=data.get("train_subset"),
        catalog=catalog,
        catalog_files=catalog_files,
        catalog_sha=catalog_sha,
    )
    _validate_layers(space)
    return space


def _validate_layers(space: SearchSpace) -> None:
    """Stem and head entries are checked as a genotype's are: parsed, and their ops resolved
    (same errors)."""
    probe = {
        "name": "probe",
        "input": list(space.input),
        "num_classes": space.num_classes,
        "stem": list(space.stem),
        "body": [{"op": "skip_connect"}],
        "head": list(space.head),
    }
    check_ops(genotype_from_dict(probe))


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Load and validate a search-space file; errors name the file and the YAML path."""
    path = Path(path)
    data = read_yaml_mapping(path, what="search space")
    try:
        space = parse_space(data, base=path.parent)
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
        return [width * 2**s for s in range(macro.stages)]
    return [trial.suggest_categorical(f"stage{s}.channels", list(macro.channels[s])) for s in range(macro.stages)]


def sample_genotype(trial: ChoiceSource, space: SearchSpace, training: Mapping[str, Any] | None = None) -> Genotype:
    """Ask ``trial`` for every choice of ``space`` and return the genotype those choices describe.

    ``training`` entries are added to the genotype's recipe (the search records its seed
    there, so ``bnas eval`` on the genotype file, on as many CPU threads as the trial trained
    on, repeats the trial's training exactly).
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
            body.append(
                {
                    "op": op,
                    "channels": channels,
                    **({"stride": 2} if stage else {}),
                    **({"repeat": depth} if depth > 1 else {}),
                }
            )
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
        **(
            {"preprocess": copy.deepcopy(space.cells.preprocess)}
            if space.cells is not None and space.cells.preprocess is not None
            else {}
        ),
        "stem": [dict(x) for x in space.stem],
        **({"cells": cells} if cells else {}),
        "body": body,
        "head": [dict(x) for x in space.head],
        "training": {**copy.deepcopy(dict(space.budget)), **dict(training or {})},
    }
    return genotype_from_dict(data)
