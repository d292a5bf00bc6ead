"""The file formats' one definition (bnas.schemas): the shipped files validate, typical mistakes
are refused with the file, the YAML path and the message, the loaders (genotype, search space,
recipe, catalog) give those very errors since they validate with the schemas, the committed
JSON Schemas are what the models emit, and the schemas' closed choices and defaults are the
loaders'."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_GENOTYPE

from bnas.cli import main
from bnas.errors import GenotypeError
from bnas.schemas import KINDS, SchemaError, json_schema, json_schema_text, validate, yaml_path
from bnas.schemas.catalog import Binarization
from bnas.schemas.recipe import RecipeSchema

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "docs" / "schemas"
SPACES = sorted((REPO / "search_spaces").glob("*.yaml")) + sorted((REPO / "tests" / "data").glob("*space*.yaml"))
GENOTYPES = sorted((REPO / "search_spaces" / "genotypes").glob("*.yaml"))
CATALOGS = sorted((REPO / "primitives").glob("*.yaml"))
SHIPPED = [("space", p) for p in SPACES] + [("genotype", p) for p in GENOTYPES] + [("catalog", p) for p in CATALOGS]

GENOTYPE = (
    TINY_GENOTYPE.read_text()
    + """\
training:
  epochs: 2
  optimizer: {name: adam, lr: 0.01}
"""
)

SPACE = (REPO / "tests" / "data" / "tiny_space.yaml").read_text()

CATALOG = """
binarize:
  mine: {activation: swish_sign, weight: xnor_tensor, swish_beta: 3.0}
ops:
  my_conv: {family: conv_unit, kernel: 5, binarize: mine, description: "5x5 BNN+ conv"}
  my_inline: {family: resnet_block, binarize: {activation: identity_ste, weight: sign}}
"""


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _error(kind: str, text: str, file: str = "bad.yaml") -> GenotypeError:
    with pytest.raises(GenotypeError) as info:
        validate(kind, yaml.safe_load(text), file)
    return info.value


# --------------------------------------------------------------------------------------
# What ships is valid
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,path", SHIPPED, ids=lambda x: getattr(x, "name", x))
def test_every_shipped_file_validates(kind: str, path: Path) -> None:
    validate(kind, _load(path), str(path))


@pytest.mark.parametrize("path", SPACES + GENOTYPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    data = _load(path)
    recipe = data.get("budget", data.get("training"))
    assert recipe is not None or path in GENOTYPES
    validate("recipe", recipe, str(path), "budget" if "budget" in data else "training")


def test_the_examples_here_are_valid() -> None:
    for kind, text in (("genotype", GENOTYPE), ("space", SPACE), ("catalog", CATALOG)):
        validate(kind, yaml.safe_load(text), "example.yaml")
    assert validate("recipe", None) == RecipeSchema.model_validate({})  # no recipe: every default


# --------------------------------------------------------------------------------------
# Typical mistakes: the file, the YAML path, and the loaders' words
# --------------------------------------------------------------------------------------
GENOTYPE_MISTAKES = [
    ("name: tiny", "nmae: tiny", "nmae", "unknown key 'nmae'; did you mean 'name'?"),
    ("num_classes: 4\n", "", "num_classes", "missing required key 'num_classes'"),
    ("num_classes: 4", "num_classes: 0", "num_classes", "expected a positive integer, got 0"),
    ("input: [3, 8, 8]", "input: [3, 8]", "input", "expected [C, H, W], got [3, 8]"),
    ("input: [3, 8, 8]", "input: [3, true, 8]", "input[1]", "expected a positive integer, got True (bool)"),
    (
        "channels: 8}\nhead",
        "channels: eight}\nhead",
        "body[0].channels",
        "expected a positive integer, got 'eight' (str)",
    ),
    ("channels: 8}\nhead", "channels: 8, stride: 3}\nhead", "body[0].stride", "expected stride 1 or 2, got 3"),
    ("channels: 8}\nhead", "channels: 8, repeat: 0}\nhead", "body[0].repeat", "expected a positive integer, got 0"),
    (
        "{cell: normal, channels: 8}",
        "{cell: normal2, channels: 8}",
        "body[0].cell",
        "unknown cell 'normal2'; cells defined under 'cells': normal",
    ),
    (
        "{cell: normal, channels: 8}",
        "{cell: normal}",
        "body[0].channels",
        "a cell entry needs 'channels' (the width every node of the cell works at)",
    ),
    (
        "{cell: normal, channels: 8}",
        "{cell: normal, channels: 8, kernel: 3}",
        "body[0]",
        "unknown key(s) 'kernel' for a cell entry; expected cell, channels, stride, repeat",
    ),
    ("{cell: normal, channels: 8}", "{op: conv_bn, cell: normal}", "body[0]", "expected exactly one of 'op' or 'cell'"),
    (
        "{op: conv_bn, channels: 8, kernel: 3}",
        "{cell: normal, channels: 8}",
        "stem[0].cell",
        "cells are only allowed in 'body'",
    ),
    ("  - {cell: normal, channels: 8}\n", "", "body", "expected at least one layer"),
    (
        "[skip_connect, n0]",
        "[skip_connect, n9]",
        "cells.normal.nodes.n1[0][1]",
        "unknown input or node 'n9'; known: in0, in1, n0, n1",
    ),
    (
        "[skip_connect, n0]",
        "[skip_connect]",
        "cells.normal.nodes.n1[0]",
        "expected an edge [op, input] or [op, input, {options}], got ['skip_connect']",
    ),
    (
        "[skip_connect, n0]",
        "[skip_connect, n0, [3]]",
        "cells.normal.nodes.n1[0][2]",
        "expected a mapping of op options, got list",
    ),
    ("[skip_connect, n0]", "[7, n0]", "cells.normal.nodes.n1[0][0]", "expected an op name (a string), got 7 (int)"),
    (
        "n1: [[skip_connect, n0]]",
        "out: [[skip_connect, n0]]",
        "cells.normal.nodes.out",
        "invalid node name 'out' (in0, in1 and out are reserved)",
    ),
    (
        "n1: [[skip_connect, n0]]",
        "n1: []",
        "cells.normal.nodes.n1",
        "expected a non-empty list of edges [[op, input], ...]",
    ),
    (
        "inputs: 2",
        "inputs: 3",
        "cells.normal.inputs",
        "expected inputs: 1 or 2 (cell k-1 only, or cells k-2 and k-1), got 3",
    ),
    (
        "combine: concat",
        "combine: product",
        "cells.normal.output.combine",
        "invalid combine 'product'; expected one of concat, sum",
    ),
    ("nodes: [n0, n1]", "nodes: [n0, n5]", "cells.normal.output.nodes[1]", "unknown node 'n5'; nodes: n0, n1"),
    ("channels: 8}\nhead", "channels: 8, stride: 2.0}\nhead", "body[0].stride", "expected stride 1 or 2, got 2.0"),
    (
        "inputs: 2",
        "inputs: 2.0",
        "cells.normal.inputs",
        "expected inputs: 1 or 2 (cell k-1 only, or cells k-2 and k-1), got 2.0",
    ),
    ("input: [3, 8, 8]", "input: [[3], [8]]", "input", "expected [C, H, W], got [[3], [8]]"),
    ("  normal:\n", "  5:\n", "cells.5", "expected a cell name (a string), got 5 (int)"),
    (
        "n1: [[skip_connect, n0]]",
        "5: [[skip_connect, n0]]",
        "cells.normal.nodes.5",
        "invalid node name 5 (in0, in1 and out are reserved)",
    ),
    ("epochs: 2", "epochs: two", "training.epochs", "expected a positive integer, got 'two'"),
    (
        "name: adam, lr: 0.01",
        "name: adm, lr: 0.01",
        "training.optimizer.name",
        "expected adam or adamw or sgd, got 'adm'",
    ),
]


@pytest.mark.parametrize("old,new,path,message", GENOTYPE_MISTAKES)
def test_genotype_mistakes(old: str, new: str, path: str, message: str) -> None:
    assert old in GENOTYPE
    err = _error("genotype", GENOTYPE.replace(old, new, 1))
    assert (err.file, err.path, err.message) == ("bad.yaml", path, message)
    assert str(err) == f"bad.yaml: {path}: {message}"


SPACE_MISTAKES = [
    ("nodes: 2", "nodez: 2", "cells.nodez", "unknown key 'nodez'; did you mean 'nodes'?"),
    (
        "binary_conv_3x3, skip",
        "skip_connect, skip",
        "cells.ops",
        "repeated ops in ['skip_connect', 'skip_connect', 'bireal_block']",
    ),
    ("combine: sum", "combine: max", "cells.combine", "invalid combine 'max'; expected concat or sum"),
    ("inputs: 2", "inputs: 3", "cells.inputs", "expected 1 or 2, got 3"),
    (
        "channels: [8, 16]",
        "channels: [8, -1]",
        "macro.channels[1]",
        "expected a positive integer or a non-empty list of them, got -1",
    ),
    (
        "channels: [8, 16]",
        "channels: [[8], [16], [32]]",
        "macro.channels",
        "expected one choice list per stage (2 stages), got 3",
    ),
    (
        "channels: [8, 16]",
        "channels: [8, [16]]",
        "macro.channels",
        "expected a list of integers, or a list of integer lists (one per stage), not a mixture",
    ),
    (
        "cells_per_stage: [1, 2]",
        "cells_per_stage: [[1], [0]]",
        "macro.cells_per_stage[1][0]",
        "expected a positive integer or a non-empty list of them, got 0",
    ),
    ("channels: [8, 16]", "channels: [8, 8]", "macro.channels", "repeated choices in [8, 8]"),
    (
        "stages: 2",
        "stages: 2\n  stage_ops: [xnor_resnet_block]",
        "macro.stage_ops",
        "a space searches either cells (`cells:`) or one block op per stage (`macro.stage_ops`); this one has both",
    ),
    ("epochs: 2", "epochs: 0", "budget.epochs", "expected a positive integer, got 0"),
    (
        "batch_size: 128",
        "batch_size: 128\n  epoch: 3",
        "budget",
        (
            "unknown recipe key(s) epoch; expected some of amp, batch_size, decay_binary_weights, distill, epochs, "
            "improvement_threshold, label_smoothing, loss, optimizer, patience, patience_increase, schedule, seed, "
            "two_step, val_fraction"
        ),
    ),
    (
        "dataset: digits",
        "dataset: fashion-mnist",
        "dataset",
        (
            "unknown dataset 'fashion-mnist'; did you mean 'fashion_mnist'?; expected one of digits, mnist, "
            "fashion_mnist, cifar10, synthetic or imagefolder:PATH"
        ),
    ),
    (
        "name: tiny",
        "name: tiny run",
        "name",
        "expected a name without spaces or slashes (it names the study and the run folder), got 'tiny run'",
    ),
    (
        "name: tiny",
        "name: tiny\nobjectives: [ops]",
        "objectives",
        "expected a list starting with val_acc, e.g. [val_acc] or [val_acc, ops]; got ['ops']",
    ),
    (
        "name: tiny",
        "name: tiny\nobjectives: [val_acc, flops]",
        "objectives[1]",
        "unknown objective 'flops'; expected one of val_acc, ops, size, latency",
    ),
    (
        "name: tiny",
        "name: tiny\nconstraints: {max_flops: 3}",
        "constraints.max_flops",
        "unknown constraint 'max_flops'; expected some of max_ops, min_ops, max_size_bytes, max_params, max_latency_ms",
    ),
    (
        "name: tiny",
        "name: tiny\nconstraints: {max_ops: 3.0e7}",
        "constraints.max_ops",
        "expected a positive number, got '3.0e7' (YAML reads 3.0e7 as text: write 3.0e+7)",
    ),
    ("name: tiny", "name: tiny\nsampler: cmaes", "sampler", "expected tpe, random, nsga2 or gp, got 'cmaes'"),
    ("name: tiny", "name: tiny\npruner: asha", "pruner", "expected median, hyperband or none, got 'asha'"),
    ("name: tiny", "name: tiny\ntrain_subset: 0", "train_subset", "expected a positive integer, got 0"),
    (
        "  - {op: global_avgpool}",
        "  - {op: global_avgpool, cell: x}",
        "head[0]",
        "expected exactly one of 'op' or 'cell'",
    ),
    ("num_classes: 10\n", "", "num_classes", "missing required key 'num_classes'"),
    (
        "name: tiny",
        "name: tiny\nconstraints: {max_ops: null}",
        "constraints.max_ops",
        "expected a positive number, got None",
    ),
    ("name: tiny", "name: tiny\nconstraints: []", "constraints", "expected a mapping like {max_ops: 1.0e+6}"),
    (
        "name: tiny",
        "name: tiny\nconstraints: {max_ops: 1000, min_ops: 2000}",
        "constraints.min_ops",
        "min_ops 2000 is above max_ops 1000: no genotype can meet both; lower min_ops or raise max_ops",
    ),
    ("input: [1, 8, 8]", "input: [[1], [8]]", "input", "expected [C, H, W], got [[1], [8]]"),
    ("inputs: 2", "inputs: 2.0", "cells.inputs", "expected 1 or 2, got 2.0"),
    (
        "  ops: [binary_conv_3x3, skip_connect, bireal_block]\n",
        "",
        "cells.ops",
        "expected a non-empty list of op names (see `bnas primitives`)",
    ),
    ("stages: 2", "stages: 2\n  stage_ops: {}", "macro.stage_ops", "expected a list of op names, got {}"),
]


@pytest.mark.parametrize("old,new,path,message", SPACE_MISTAKES)
def test_space_mistakes(old: str, new: str, path: str, message: str) -> None:
    assert old in SPACE
    err = _error("space", SPACE.replace(old, new, 1), "space.yaml")
    assert (err.file, err.path, err.message) == ("space.yaml", path, message)


@pytest.mark.parametrize(
    "text,path,message",
    [
        ("- just a list\n", "", "expected a mapping with 'binarize' and 'ops' sections"),
        ("opz: {}\n", "opz", "unknown key 'opz'; did you mean 'ops'?"),
        ("ops:\n  a: {kernel: 3}\n", "ops.a", "expected a mapping with a 'family' key"),
        ("ops:\n  a: [1]\n", "ops.a", "expected a mapping with a 'family' key"),
        (
            "binarize:\n  b: {activation: sgn}\n",
            "binarize.b",
            (
                "unknown activation quantizer 'sgn'; expected one of ste, approx_sign, swish_sign, identity_ste, "
                "stochastic, rsign, none"
            ),
        ),
        ("binarize:\n  b: {clip: -1}\n", "binarize.b", "clip must be a positive number, got -1"),
        (
            "binarize:\n  b: {latent_clip: golrot}\n",
            "binarize.b",
            "latent_clip must be a positive number, 'glorot' or null, got 'golrot'",
        ),
        (
            "binarize:\n  b: {foo: 1}\n",
            "binarize.b",
            (
                "unknown binarize option(s) foo; expected some of activation, clip, latent_clip, learned_scale, lr_scale, "
                "swish_beta, weight, weight_clip"
            ),
        ),
        (
            "ops:\n  a: {family: resnet_block, binarize: {weight: sgn}}\n",
            "ops.a.binarize",
            "unknown weight binarizer 'sgn'; expected one of sign, xnor, xnor_tensor, bireal, stochastic, none",
        ),
        ("binarize: []\n", "binarize", "expected a mapping of named binarizations, got list"),
        (
            "ops:\n  a: {family: resnet_block, binarize: 5}\n",
            "ops.a.binarize",
            "expected a binarization name or mapping, got 5",
        ),
    ],
)
def test_catalog_mistakes(text: str, path: str, message: str, tmp_path: Path) -> None:
    err = _error("catalog", text, "mine.yaml")
    assert (err.file, err.path, err.message) == ("mine.yaml", path, message)
    # load_catalog says the same, as a one-line CatalogError.
    from bnas.registry import CatalogError, load_catalog

    file = tmp_path / "mine.yaml"
    file.write_text(text)
    with pytest.raises(CatalogError) as info:
        load_catalog(file)
    assert str(info.value) == ": ".join(part for part in (str(file), path, message) if part)


def test_recipe_mistakes_take_the_path_of_their_section() -> None:
    with pytest.raises(GenotypeError) as info:
        validate("recipe", {"optimizer": {"name": "adam", "lr": -1}}, "g.yaml", "training")
    assert str(info.value) == "g.yaml: training.optimizer.lr: expected a positive number, got -1"
    with pytest.raises(GenotypeError) as info:
        validate("recipe", {"schedule": {"name": "exponential", "final_lr": 0}}, None, "budget")
    assert str(info.value) == "budget.schedule.final_lr: expected a positive number for the exponential schedule, got 0"


def test_messages_never_print_a_huge_value() -> None:
    huge = [["lol"] * 1000] * 1000
    for data in (
        {"name": huge, "input": [3, 8, 8], "num_classes": 10, "body": [{"op": "x"}]},
        {"input": huge, "num_classes": 10, "body": [{"op": "x"}]},
        {"input": [3, 8, 8], "num_classes": 10, "body": [{"op": "x", "channels": huge}]},
    ):
        with pytest.raises(GenotypeError) as info:
            validate("genotype", data)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300 and "..." in str(info.value)


def test_an_unknown_kind_is_a_one_line_error() -> None:
    with pytest.raises(SchemaError, match="unknown schema 'genome'; expected one of genotype, space, recipe, catalog"):
        validate("genome", {})


def test_yaml_paths_come_from_the_location_not_from_text() -> None:
    assert yaml_path(("cells", "normal", "nodes", "n1", 0)) == "cells.normal.nodes.n1[0]"
    assert yaml_path(("body", 2, "<cell entry>", "channels")) == "body[2].channels"
    assert yaml_path(("epochs",), "budget") == "budget.epochs"
    assert yaml_path((0, 1), "input") == "input[0][1]"
    assert yaml_path(()) == ""


# --------------------------------------------------------------------------------------
# The loaders validate with the schema: their errors are the schema's, word for word
# (pinned here, so a change of wording in either place fails)
# --------------------------------------------------------------------------------------
_KEYS = (
    "amp, batch_size, decay_binary_weights, distill, epochs, improvement_threshold, label_smoothing, loss, "
    "optimizer, patience, patience_increase, schedule, seed, two_step, val_fraction"
)
_OPT = "expected a mapping {name: adam|adamw|sgd, lr: ...}, got"
_BAD_RECIPES: list[tuple[Any, str, str]] = [
    ({"epoch": 3}, "", f"unknown recipe key(s) epoch; expected some of {_KEYS}"),
    ({"epoch": 3, "zzz": 1}, "", f"unknown recipe key(s) epoch, zzz; expected some of {_KEYS}"),
    ({"optimizer": "adam"}, ".optimizer", f"{_OPT} 'adam'"),
    ({"optimizer": None}, ".optimizer", f"{_OPT} None"),
    ({"optimizer": {"name": "adm"}}, ".optimizer.name", "expected adam or adamw or sgd, got 'adm'"),
    ({"optimizer": {"lr": -1}}, ".optimizer.lr", "expected a positive number, got -1"),
    ({"optimizer": {"lr": "0.1"}}, ".optimizer.lr", "expected a positive number, got '0.1'"),
    ({"optimizer": {"lr": True}}, ".optimizer.lr", "expected a positive number, got True"),
    ({"optimizer": {"lr": float("inf")}}, ".optimizer.lr", "expected a positive number, got inf"),
    ({"optimizer": {"weight_decay": -1}}, ".optimizer.weight_decay", "expected a number >= 0, got -1"),
    ({"optimizer": {"momentum": 1}}, ".optimizer.momentum", "expected a number in [0, 1), got 1"),
    ({"optimizer": {"nesterov": 1}}, ".optimizer.nesterov", "expected true or false, got 1"),
    ({"optimizer": {"betas": [0.9]}}, ".optimizer.betas", "expected two numbers in [0, 1), got [0.9]"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, ".optimizer.betas", "expected two numbers in [0, 1), got [0.9, 1.0]"),
    ({"optimizer": {"eps": 0}}, ".optimizer.eps", "expected a positive number, got 0"),
    (
        {"optimizer": {"foo": 1}},
        ".optimizer",
        "unknown key(s) foo; expected some of betas, eps, lr, momentum, name, nesterov, weight_decay",
    ),
    ({"schedule": [1]}, ".schedule", "expected a mapping {name: cosine|linear|step|exponential|constant}, got [1]"),
    (
        {"schedule": {"name": "cos"}},
        ".schedule.name",
        "expected cosine or linear or step or exponential or constant, got 'cos'",
    ),
    ({"schedule": {"warmup_epochs": -1}}, ".schedule.warmup_epochs", "expected an integer >= 0, got -1"),
    ({"schedule": {"warmup_epochs": 1.5}}, ".schedule.warmup_epochs", "expected an integer >= 0, got 1.5"),
    ({"schedule": {"step_size": 0}}, ".schedule.step_size", "expected a positive integer, got 0"),
    ({"schedule": {"gamma": 0}}, ".schedule.gamma", "expected a positive number, got 0"),
    ({"schedule": {"final_lr": -1}}, ".schedule.final_lr", "expected a number >= 0, got -1"),
    ({"schedule": {"final_lr": None}}, ".schedule.final_lr", "expected a number >= 0, got None"),
    (
        {"schedule": {"name": "exponential", "final_lr": 0}},
        ".schedule.final_lr",
        "expected a positive number for the exponential schedule, got 0",
    ),
    (
        {"schedule": {"bar": 1}},
        ".schedule",
        "unknown key(s) bar; expected some of final_lr, gamma, name, step_size, warmup_epochs",
    ),
    ({"epochs": 0}, ".epochs", "expected a positive integer, got 0"),
    ({"epochs": "two"}, ".epochs", "expected a positive integer, got 'two'"),
    ({"epochs": 2.0}, ".epochs", "expected a positive integer, got 2.0"),
    ({"batch_size": None}, ".batch_size", "expected a positive integer, got None"),
    ({"loss": "hinge"}, ".loss", "expected cross_entropy or squared_hinge, got 'hinge'"),
    ({"label_smoothing": 1}, ".label_smoothing", "expected a number in [0, 1), got 1"),
    (
        {"label_smoothing": 0.1, "loss": "squared_hinge"},
        ".label_smoothing",
        "expected 0 with the squared_hinge loss (it applies to cross_entropy), got 0.1",
    ),
    ({"decay_binary_weights": "yes"}, ".decay_binary_weights", "expected true or false, got 'yes'"),
    ({"two_step": -1}, ".two_step", "expected an integer >= 0 (epochs before the weights are binarized), got -1"),
    (
        {"distill": []},
        ".distill",
        "expected {teacher: GENOTYPE.yaml, checkpoint: PATH, temperature: T, alpha: A}, got []",
    ),
    ({"distill": {}}, ".distill.teacher", "expected the path of a teacher genotype YAML, got None"),
    ({"distill": {"teacher": ""}}, ".distill.teacher", "expected the path of a teacher genotype YAML, got ''"),
    (
        {"distill": {"teacher": "t.yaml", "checkpoint": 5}},
        ".distill.checkpoint",
        "expected the path of the teacher's checkpoint, got 5",
    ),
    (
        {"distill": {"teacher": "t.yaml", "checkpoint": None}},
        ".distill.checkpoint",
        "expected the path of the teacher's checkpoint, got None",
    ),
    ({"distill": {"teacher": "t.yaml", "temperature": 0}}, ".distill.temperature", "expected a positive number, got 0"),
    ({"distill": {"teacher": "t.yaml", "alpha": 2}}, ".distill.alpha", "expected a number in [0, 1], got 2"),
    (
        {"distill": {"teacher": "t", "x": 1}},
        ".distill",
        "unknown key(s) x; expected some of alpha, checkpoint, teacher, temperature",
    ),
    ({"patience": 0}, ".patience", "expected a positive integer or null, got 0"),
    ({"patience_increase": 0.5}, ".patience_increase", "expected a number >= 1, got 0.5"),
    ({"improvement_threshold": 0}, ".improvement_threshold", "expected a number in (0, 1], got 0"),
    ({"seed": -1}, ".seed", "expected an integer >= 0, got -1"),
    ({"amp": "no"}, ".amp", "expected true or false, got 'no'"),
    ({"val_fraction": 1.0}, ".val_fraction", "expected a number in [0, 1), got 1.0"),
    ({"val_fraction": float("nan")}, ".val_fraction", "expected a number in [0, 1), got nan"),
    ([], "", "expected a mapping of recipe keys, got list"),
]


@pytest.mark.parametrize("data,path,message", _BAD_RECIPES, ids=lambda d: json.dumps(d, default=str)[:60])
def test_recipe_errors(data: Any, path: str, message: str) -> None:
    from bnas.train import Recipe, TrainingError

    with pytest.raises(TrainingError) as info:
        Recipe.from_dict(data, "training")
    assert (info.value.path, info.value.message) == ("training" + path, message)
    # The schema says the same at any prefix (a space's budget, a genotype's training).
    with pytest.raises(GenotypeError) as info2:
        validate("recipe", data, "s.yaml", "budget")
    assert (info2.value.file, info2.value.path, info2.value.message) == ("s.yaml", "budget" + path, message)


def test_flag_overrides_are_validated() -> None:
    from bnas.train import Recipe, TrainingError

    recipe = Recipe.from_dict({"epochs": 2, "optimizer": {"name": "sgd", "lr": 1}})
    assert recipe.optimizer == {"name": "sgd", "lr": 1}  # as written: the schema's 1.0 is not kept
    assert recipe.merged({"optimizer.lr": 0.5, "epochs": None}).optimizer == {"name": "sgd", "lr": 0.5}
    with pytest.raises(TrainingError) as info:
        recipe.merged({"optimizer.lr": -0.1})
    assert (info.value.path, info.value.message) == ("flags.optimizer.lr", "expected a positive number, got -0.1")
    with pytest.raises(TrainingError) as info:
        recipe.merged({"epochs": 0}, where="cli")
    assert str(info.value) == "cli.epochs: expected a positive integer, got 0"
    bad = Recipe(epochs=0)  # built directly: validate() checks it
    with pytest.raises(TrainingError, match=r"^training\.epochs: expected a positive integer, got 0$"):
        bad.validate("training")


def _mutated(text: str, old: str, new: str) -> dict[str, Any]:
    assert old in text
    return yaml.safe_load(text.replace(old, new, 1))


@pytest.mark.parametrize("case", GENOTYPE_MISTAKES, ids=lambda c: c[2])
def test_genotype_loader_errors(case: tuple[str, str, str, str]) -> None:
    from bnas.genotype import genotype_from_dict

    with pytest.raises(GenotypeError) as info:
        genotype_from_dict(_mutated(GENOTYPE, case[0], case[1]), "bad.yaml")
    assert (info.value.file, info.value.path, info.value.message) == ("bad.yaml", case[2], case[3])


@pytest.mark.parametrize("case", SPACE_MISTAKES, ids=lambda c: c[2])
def test_space_loader_errors(case: tuple[str, str, str, str], tmp_path: Path) -> None:
    from bnas.search.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(SPACE.replace(case[0], case[1], 1))
    with pytest.raises(GenotypeError) as info:
        load_space(path)
    assert (info.value.file, info.value.path, info.value.message) == (str(path), case[2], case[3])


# --------------------------------------------------------------------------------------
# One source: the loaders' closed choices and defaults are the schemas'
# --------------------------------------------------------------------------------------
def test_closed_choices_are_the_loaders() -> None:
    from bnas import binarize, genotype
    from bnas.schemas import catalog, recipe, space
    from bnas.schemas import genotype as genotype_schema
    from bnas.search import space as search_space
    from bnas.train import recipe as train_recipe

    assert recipe.OPTIMIZERS == train_recipe.OPTIMIZERS
    assert recipe.SCHEDULES == train_recipe.SCHEDULES
    assert recipe.LOSSES == train_recipe.LOSSES
    assert genotype_schema.COMBINES == genotype.COMBINES
    assert space.OBJECTIVES == tuple(search_space.OBJECTIVES)
    assert space.CONSTRAINTS == tuple(search_space.CONSTRAINTS)
    assert space.SAMPLERS == search_space.SAMPLERS and space.PRUNERS == search_space.PRUNERS
    assert catalog.ACTIVATION_QUANTIZERS == binarize.ACTIVATION_QUANTIZERS
    assert catalog.WEIGHT_BINARIZERS == binarize.WEIGHT_BINARIZERS
    from bnas.data import DATASETS

    assert set(space.DATASETS) | {"imagefolder:PATH"} == set(DATASETS)


def test_defaults_are_the_loaders() -> None:
    from bnas.binarize import BinarizeConfig
    from bnas.train import Recipe

    schema = RecipeSchema.model_validate({}).model_dump()
    for f in dataclasses.fields(Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if isinstance(default, dict):  # a section: the schema spells out every default key
            assert {k: schema[f.name][k] for k in default} == default, f.name
        else:
            assert schema[f.name] == default, f.name
    assert set(schema) == {f.name for f in dataclasses.fields(Recipe)}
    assert Binarization.model_validate({}).model_dump() == dataclasses.asdict(BinarizeConfig())


# --------------------------------------------------------------------------------------
# JSON Schemas: committed, current, and they accept what ships
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_committed_json_schemas_are_current(kind: str) -> None:
    path = SCHEMAS / f"{kind}.schema.json"
    assert path.exists(), f"run: python scripts/write_schemas.py (then commit {path.relative_to(REPO)})"
    assert path.read_text() == json_schema_text(kind), (
        "stale: run python scripts/write_schemas.py and commit the result"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_key_has_hover_text(kind: str) -> None:
    schema = json_schema(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for name, definition in [("", schema), *schema.get("$defs", {}).items()]:
        for key, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{kind}: {name}.{key} has no description"


@pytest.mark.parametrize("kind,path", SHIPPED, ids=lambda x: getattr(x, "name", x))
def test_shipped_files_pass_the_json_schema(kind: str, path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{kind}.schema.json").read_text()))
    errors = [e.message for e in validator.iter_errors(_load(path))]
    assert errors == []


def test_the_json_schema_refuses_typical_mistakes() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema("genotype"))
    good = yaml.safe_load(GENOTYPE)
    assert list(validator.iter_errors(good)) == []
    for change in (
        {"nmae": "x"},
        {"body": [{"cell": "normal"}]},
        {"body": [{"op": "x", "cell": "normal"}]},
        {"body": [{"op": "x", "stride": 3}]},
        {"training": {"epoch": 3}},
        {"input": [3, 8]},
    ):
        assert list(validator.iter_errors({**good, **change})), change
    space = jsonschema.Draft202012Validator(json_schema("space"))
    for change in ({"objectives": ["ops"]}, {"dataset": "mnsit"}, {"sampler": "cmaes"}, {"macro": {"channels": []}}):
        assert list(space.iter_errors({**yaml.safe_load(SPACE), **change})), change


# --------------------------------------------------------------------------------------
# `bnas schema`
# --------------------------------------------------------------------------------------
def test_cli_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "genotype"]) == 0
    assert capsys.readouterr().out == json_schema_text("genotype")


def test_cli_writes_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "space.schema.json"
    assert main(["schema", "space", "--out", str(out)]) == 0
    assert out.read_text() == json_schema_text("space")
    assert capsys.readouterr().out == ""


def test_cli_refuses_an_unwritable_out_in_one_line(read_only_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "recipe", "--out", str(read_only_dir / "recipe.schema.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_refuses_an_unknown_kind() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bnas", "schema", "genome"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "invalid choice: 'genome'" in proc.stderr and "Traceback" not in proc.stderr


def test_write_schemas_script_checks_freshness() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "write_schemas.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
