"""Search-space files: validation with path-naming errors, the define-by-run mapping from a
trial to a genotype, macro choices, seeds, and the shipped spaces. No training here."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from conftest import tiny_space, write_space

import bnas
from bnas.errors import GenotypeError
from bnas.search.runner import make_sampler
from bnas.search.space import load_space, parse_space, sample_genotype

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_space(cells_per_stage=[1])


def _write(tmp_path: Path, text: str) -> Path:
    return write_space(tmp_path, text)


@pytest.mark.parametrize(
    "old,new,path,fragment",
    [
        ("binary_conv_3x3, skip", "binary_conv_3x4, skip", "cells.ops[0]", "did you mean binary_conv_3x3"),
        ("binary_conv_3x3, skip", "skip_connect, skip", "cells.ops", "repeated ops"),
        ("nodes: 2", "nodes: 0", "cells.nodes", "positive integer"),
        ("nodes: 2", "nodez: 2", "cells.nodez", "did you mean 'nodes'"),
        ("combine: sum", "combine: max", "cells.combine", "invalid combine"),
        ("inputs: 2", "inputs: 3", "cells.inputs", "expected 1 or 2"),
        ("combine: sum", "combine: sum\n  reduce_cell: yes please", "cells.reduce_cell", "true or false"),
        ("channels: [8, 16]", "channels: [8, -1]", "macro.channels[1]", "positive integer"),
        (
            "channels: [8, 16]",
            "channels: [[8], [16], [32]]",
            "macro.channels",
            "one choice list per stage (2 stages), got 3",
        ),
        ("channels: [8, 16]", "channels: [8, [16]]", "macro.channels", "not a mixture"),
        ("cells_per_stage: [1]", "cells_per_stage: [[1], [0]]", "macro.cells_per_stage[1][0]", "positive integer"),
        ("stages: 2", "stages: 2\n  stage_ops: [xnor_resnet_block]", "macro.stage_ops", "has both"),
        ("epochs: 2", "epochs: two", "budget.epochs", "positive integer"),
        ("batch_size: 128", "batch_size: 128\n  epoch: 3", "budget", "unknown recipe key(s) epoch"),
        ("dataset: digits", "dataset: fashion-mnist", "dataset", "did you mean 'fashion_mnist'"),
        ("name: tiny", "name: tiny run", "name", "without spaces"),
        ("name: tiny", "name: tiny\nobjectives: [ops]", "objectives", "starting with val_acc"),
        ("name: tiny", "name: tiny\nobjectives: [val_acc, flops]", "objectives[1]", "unknown objective 'flops'"),
        ("name: tiny", "name: tiny\nconstraints: {max_flops: 3}", "constraints.max_flops", "unknown constraint"),
        ("name: tiny", "name: tiny\nconstraints: {max_ops: 3.0e7}", "constraints.max_ops", "write 3.0e+7"),
        ("name: tiny", "name: tiny\nsampler: cmaes", "sampler", "tpe, random, nsga2 or gp"),
        ("name: tiny", "name: tiny\npruner: asha", "pruner", "median, hyperband or none"),
        ("name: tiny", "name: tiny\ntrain_subset: 0", "train_subset", "positive integer"),
        ("name: tiny", "name: tiny\nbudgets: {}", "budgets", "did you mean 'budget'"),
        ("  - {op: global_avgpool}", "  - {op: global_avgpol}", "head[0].op", "global_avgpool"),
    ],
)
def test_invalid_space_files_name_file_and_yaml_path(
    tmp_path: Path, old: str, new: str, path: str, fragment: str
) -> None:
    assert old in TINY
    file = _write(tmp_path, TINY.replace(old, new, 1))
    with pytest.raises(GenotypeError) as info:
        load_space(file)
    assert info.value.path == path, str(info.value)
    assert fragment in info.value.message, str(info.value)
    assert str(info.value).startswith(f"{file}: {path}: ")


def test_unreadable_space_files(tmp_path: Path) -> None:
    with pytest.raises(GenotypeError, match="no such search space file"):
        load_space(tmp_path / "missing.yaml")
    broken = _write(tmp_path, "name: x\ncells: [unclosed\n")
    with pytest.raises(GenotypeError) as info:
        load_space(broken)
    assert str(info.value).startswith(str(broken)) and "line" in str(info.value)
    evil = _write(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(GenotypeError, match="not allowed"):
        load_space(evil)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(GenotypeError) as info:
        load_space(_write(tmp_path, TINY.replace("num_classes: 10\n", "")))
    assert info.value.path == "num_classes" and "missing required key" in info.value.message


class _Choices:
    """A trial stand-in that picks given values (else the last choice) and records the asks."""

    number = 3

    def __init__(self, picks: dict[str, object] | None = None):
        self.picks = picks or {}
        self.asked: dict[str, list[object]] = {}

    def suggest_categorical(self, name: str, choices: list[object]) -> object:
        self.asked[name] = list(choices)
        return self.picks.get(name, choices[-1])


def test_trial_choices_map_to_the_genotype(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, TINY))
    picks = {
        "channels": 8,
        "normal.n0.e0.input": "in0",
        "normal.n0.e0.op": "bireal_block",
        "normal.n1.e0.input": "n0",
        "normal.n1.e0.op": "skip_connect",
        "reduce.n0.e0.input": "in1",
        "reduce.n0.e0.op": "binary_conv_3x3",
        "reduce.n1.e0.input": "in0",
        "reduce.n1.e0.op": "binary_conv_3x3",
    }
    trial = _Choices(picks)
    g = sample_genotype(trial, space, training={"seed": 5})
    # Every choice the genotype made is a parameter, with exactly the allowed candidates.
    assert trial.asked["normal.n0.e0.input"] == ["in0", "in1"]
    assert trial.asked["normal.n1.e0.input"] == ["in0", "in1", "n0"]
    assert trial.asked["normal.n1.e0.op"] == ["binary_conv_3x3", "skip_connect", "bireal_block"]
    assert set(trial.asked) == set(picks) | {"stage0.cells", "stage1.cells"}
    normal = g.cells["normal"]
    assert [(e.op, e.source) for e in normal.nodes["n0"]] == [("bireal_block", "in0")]
    assert [(e.op, e.source) for e in normal.nodes["n1"]] == [("skip_connect", "n0")]
    assert normal.output == ("n0", "n1") and normal.combine == "sum"
    assert [(e.op, e.source) for e in g.cells["reduce"].nodes["n1"]] == [("binary_conv_3x3", "in0")]
    # Stage 0 at width 8, stage 1 opens with the reduce cell at twice the width.
    assert [(layer.cell, layer.channels, layer.stride, layer.repeat) for layer in g.body] == [
        ("normal", 8, 1, 1),
        ("reduce", 16, 2, 1),
    ]
    assert g.name == "tiny-trial-3" and g.training["seed"] == 5 and g.training["epochs"] == 2
    model = bnas.build(g)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_sampled_genotype_file_round_trips(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, TINY))
    g = sample_genotype(_Choices(), space, training={"seed": 1})
    path = tmp_path / "g.yaml"
    g.to_yaml(path, header="sampled")
    again = bnas.load_genotype(path)
    assert again.to_dict() == g.to_dict() and again.canonical_hash() == g.canonical_hash()


def test_per_stage_macro_choices_and_depth(tmp_path: Path) -> None:
    text = TINY.replace("channels: [8, 16]", "channels: [[8, 12], [20, 24]]").replace(
        "cells_per_stage: [1]", "cells_per_stage: [[1, 2], [2, 3]]"
    )
    space = load_space(_write(tmp_path, text))
    trial = _Choices({"stage0.channels": 12, "stage1.channels": 20, "stage0.cells": 2, "stage1.cells": 3})
    g = sample_genotype(trial, space)
    assert "channels" not in trial.asked and trial.asked["stage1.channels"] == [20, 24]
    assert trial.asked["stage1.cells"] == [2, 3]
    # Depth counts the reduction: stage 1 = reduce cell + 2 normal cells.
    assert [(layer.cell, layer.channels, layer.stride, layer.repeat) for layer in g.body] == [
        ("normal", 12, 1, 2),
        ("reduce", 20, 2, 1),
        ("normal", 20, 1, 2),
    ]
    assert bnas.build(g)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_stage_ops_space_searches_blocks(tmp_path: Path) -> None:
    text = (
        TINY.split("cells:")[0]
        + """macro:
  stages: 2
  channels: [8]
  cells_per_stage: [1, 2]
  stage_ops: [xnor_resnet_block, bireal_block]
budget: {epochs: 1}
"""
    )
    space = load_space(_write(tmp_path, text))
    trial = _Choices(
        {"stage0.op": "bireal_block", "stage0.cells": 2, "stage1.op": "xnor_resnet_block", "stage1.cells": 1}
    )
    g = sample_genotype(trial, space)
    assert not g.cells
    assert [(layer.op, layer.channels, layer.stride, layer.repeat) for layer in g.body] == [
        ("bireal_block", 8, 1, 2),
        ("xnor_resnet_block", 16, 2, 1),
    ]


def test_fingerprint_tracks_what_decides_a_trial() -> None:
    import yaml

    base = yaml.safe_load(TINY)
    ref = parse_space(base).fingerprint()
    assert parse_space({**base, "sampler": "random", "pruner": "none"}).fingerprint() == ref
    assert parse_space({**base, "budget": {**base["budget"], "epochs": 3}}).fingerprint() != ref
    assert parse_space({**base, "constraints": {"max_ops": 1e5}}).fingerprint() != ref
    assert (
        parse_space({**base, "cells": {**base["cells"], "ops": ["skip_connect", "binary_conv_3x3"]}}).fingerprint()
        != ref
    )


def test_the_space_is_built_from_the_values_as_written() -> None:
    """The schema validates, but the space keeps what the file says (the schema's model would
    turn an integer lr into a float, and move the fingerprint)."""
    import yaml

    base = yaml.safe_load(TINY)
    space = parse_space(
        {
            **base,
            "budget": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 1}},
            "constraints": {"max_ops": 1000000},
            "objectives": "val_acc",
        }
    )
    assert space.budget == {"epochs": 2, "optimizer": {"name": "sgd", "lr": 1}}
    assert type(space.budget["optimizer"]["lr"]) is int
    assert space.constraints == {"max_ops": 1e6} and space.objectives == ("val_acc",)
    assert space.cells is not None and space.cells.ops == ("binary_conv_3x3", "skip_connect", "bireal_block")
    assert space.macro.channels == ((8, 16),) and space.macro.doubling
    # An empty stem or head is what it always was: no stem, the default head.
    empty = parse_space({**base, "stem": [], "head": []})
    assert empty.stem == () and empty.head == ({"op": "global_avgpool"}, {"op": "linear"})
    g = sample_genotype(
        optuna.trial.FixedTrial(
            {
                "channels": 8,
                "normal.n0.e0.input": "in1",
                "normal.n0.e0.op": "skip_connect",
                "normal.n1.e0.input": "n0",
                "normal.n1.e0.op": "skip_connect",
                "reduce.n0.e0.input": "in1",
                "reduce.n0.e0.op": "skip_connect",
                "reduce.n1.e0.input": "n0",
                "reduce.n1.e0.op": "skip_connect",
                "stage0.cells": 1,
                "stage1.cells": 1,
            }
        ),
        space,
    )
    assert g.training is not None and type(g.training["optimizer"]["lr"]) is int


def _first_hashes(space_path: Path, sampler: str, seed: int, n: int = 4) -> list[str]:
    space = load_space(space_path)
    study = optuna.create_study(directions=space.directions, sampler=make_sampler(sampler, seed, space.multi_objective))
    hashes = []
    for _ in range(n):
        trial = study.ask()
        hashes.append(sample_genotype(trial, space).canonical_hash())
        study.tell(trial, [0.5] * len(space.directions) if space.multi_objective else 0.5)
    return hashes


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2", "gp"])
def test_same_seed_same_first_genotypes(sampler: str) -> None:
    path = REPO / "search_spaces" / "quickstart.yaml"
    first = _first_hashes(path, sampler, 7)
    assert _first_hashes(path, sampler, 7) == first
    assert _first_hashes(path, sampler, 8) != first
    assert len(set(first)) > 1


def test_shipped_spaces_load_sample_and_build() -> None:
    spaces = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert {p.stem for p in spaces} >= {
        "quickstart",
        "mnist_cells",
        "fashion_mnist_cells",
        "bars_macro",
        "darts_binary",
    }
    for path in spaces:
        space = load_space(path)
        study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(2):
            genotype = sample_genotype(study.ask(), space)
            model = bnas.build(genotype)
            assert model(torch.zeros(2, *genotype.input)).shape == (2, space.num_classes), path.name


def test_darts_space_uses_the_ops_of_kim_et_al() -> None:
    space = load_space(REPO / "search_spaces" / "darts_binary.yaml")
    assert space.cells is not None
    assert set(space.cells.ops) == {
        "binary_conv_3x3",
        "binary_conv_5x5",
        "binary_dil_conv_3x3",
        "binary_dil_conv_5x5",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "zero",
    }
    assert space.cells.nodes == 4 and space.cells.combine == "concat"


def test_fashion_searched_vs_handcrafted_is_a_fair_pair() -> None:
    # The README compares these two: same recipe, the searched one within the handcrafted
    # one's OPs, which is also the search space's budget.
    genotypes = REPO / "search_spaces" / "genotypes"
    searched = bnas.load_genotype(genotypes / "fashion_searched.yaml")
    handcrafted = bnas.load_genotype(genotypes / "fashion_handcrafted.yaml")
    space = load_space(REPO / "search_spaces" / "fashion_mnist_cells.yaml")
    assert searched.training == handcrafted.training
    ops = {g.name: bnas.summarize(bnas.build(g), g.input).ops for g in (searched, handcrafted)}
    assert ops == {"fashion_searched": 287_674, "fashion_handcrafted": 369_120}
    assert searched.preprocess is not None and searched.preprocess.kind == space.cells.preprocess == "binary"
    assert space.constraints["max_ops"] == ops["fashion_handcrafted"]


def test_cells_preprocess_reaches_every_sampled_genotype_and_the_fingerprint(tmp_path: Path) -> None:
    plain = load_space(write_space(tmp_path, name="plain.yaml"))
    text = tiny_space().replace("  combine: sum\n", "  combine: sum\n  preprocess: {kind: binary, activation: prelu}\n")
    binary = load_space(write_space(tmp_path, text, name="binary.yaml"))
    assert binary.cells is not None and binary.cells.preprocess == {"kind": "binary", "activation": "prelu"}
    assert plain.fingerprint() != binary.fingerprint()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    genotype = sample_genotype(trial, binary)
    assert genotype.preprocess is not None and (genotype.preprocess.kind, genotype.preprocess.activation) == (
        "binary",
        "prelu",
    )
    assert sample_genotype(study.ask(), plain).preprocess is None
    # the cell inputs of the built network are binary 1x1 conv units with a PReLU
    model = bnas.build(genotype)
    cells = [unit for unit in model.body if hasattr(unit, "pre1")]
    assert cells and all(isinstance(cell.pre1.act, torch.nn.PReLU) for cell in cells)
