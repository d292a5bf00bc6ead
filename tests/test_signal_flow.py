"""bnas.signal_flow: genotypes whose network output cannot depend on the input, judged on the
genotype and checked against the built network itself; the search rejects them untrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import randomize, tiny_space, write_space

import bnas
from bnas.genotype import genotype_from_dict
from bnas.search.runner import SearchConfig, run_search_study
from bnas.search.space import load_space
from bnas.signal_flow import carries_signal, cell_output_is_live, constant_output


def _genotype(normal: dict[str, Any], body: list[dict[str, Any]] | None = None, **cells: dict[str, Any]) -> Any:
    return genotype_from_dict(
        {
            "name": "flow",
            "input": [1, 8, 8],
            "num_classes": 10,
            "stem": [{"op": "conv_bn", "channels": 8}],
            "cells": {"normal": normal, **cells},
            "body": body or [{"cell": "normal", "channels": 8}],
            "head": [{"op": "global_avgpool"}, {"op": "linear"}],
        }
    )


def _cell(n0: list[list[str]], n1: list[list[str]] | None = None, residual: bool = False) -> dict[str, Any]:
    nodes = {"n0": n0, **({"n1": n1} if n1 else {})}
    output: dict[str, Any] = {"combine": "sum", "nodes": list(nodes)}
    if residual:
        output["residual"] = True
    return {"inputs": 2, "nodes": nodes, "output": output}


def _output_varies(genotype: Any) -> bool:
    """Whether the built network (random weights and BN statistics, eval mode) gives two
    different images different logits: the ground truth the genotype-level check predicts."""
    model = randomize(bnas.build(genotype), seed=1)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    return not torch.equal(out[0], out[1])


ZERO_CELL = _cell([["zero", "in1"], ["zero", "in0"]], [["binary_conv_3x3", "n0"]])
LIVE_CELL = _cell([["zero", "in1"], ["binary_conv_3x3", "in0"]], [["skip_connect", "n0"]])


def test_zero_family_ops_carry_nothing() -> None:
    assert not carries_signal("zero") and not carries_signal("none")  # DARTS's name for it
    assert carries_signal("skip_connect") and carries_signal("binary_conv_3x3") and carries_signal("max_pool_3x3")


def test_a_cell_cut_off_by_zero_edges_makes_the_output_constant() -> None:
    dead = _genotype(ZERO_CELL)
    assert constant_output(dead) == (
        "body[0] (cell 'normal'): every path from its inputs to its output passes a zero op"
    )
    assert not _output_varies(dead)
    live = _genotype(LIVE_CELL)
    assert constant_output(live) is None and _output_varies(live)


def test_a_residual_cell_passes_its_input_on_whatever_its_edges_do() -> None:
    genotype = _genotype(_cell([["zero", "in1"], ["zero", "in0"]], [["binary_conv_3x3", "n0"]], residual=True))
    assert constant_output(genotype) is None and _output_varies(genotype)


def test_a_dead_cell_is_bypassed_by_the_next_cells_k_minus_2_input() -> None:
    # The second cell reads the first cell's input (in0 = k-2) through a conv, so the flow
    # goes around the dead first cell.
    bypass = _cell([["zero", "in1"], ["binary_conv_3x3", "in0"]])
    genotype = _genotype(
        ZERO_CELL, [{"cell": "normal", "channels": 8}, {"cell": "bypass", "channels": 8}], bypass=bypass
    )
    assert constant_output(genotype) is None and _output_varies(genotype)
    # Reading its k-2 input only through a zero op, it is dead too, and the message says
    # where each of its inputs stopped.
    only_k1 = _cell([["binary_conv_3x3", "in1"], ["zero", "in0"]])
    genotype = _genotype(ZERO_CELL, [{"cell": "normal", "channels": 8}, {"cell": "k1", "channels": 8}], k1=only_k1)
    assert constant_output(genotype) == (
        "body[1] (cell 'k1'): every path from its inputs to its output passes a zero op or starts from its "
        "k-1 input, constant since body[0] (cell 'normal'): every path from its inputs to its output passes a zero op"
    )
    assert not _output_varies(genotype)


def test_a_cell_whose_live_path_starts_from_a_dead_input_is_dead() -> None:
    # in0 dead, in1 live: only the edge from in0 carries a signal, so nothing live reaches out.
    spec = _genotype(_cell([["binary_conv_3x3", "in0"], ["zero", "in1"]])).cells["normal"]
    assert not cell_output_is_live(spec, {"in0": False, "in1": True})
    assert cell_output_is_live(spec, {"in0": True, "in1": False})


def test_a_zero_op_layer_ends_the_flow() -> None:
    genotype = genotype_from_dict(
        {
            "name": "flow",
            "input": [1, 8, 8],
            "num_classes": 10,
            "stem": [{"op": "conv_bn", "channels": 8}],
            "body": [{"op": "skip_connect"}, {"op": "zero"}, {"op": "skip_connect"}],
            "head": [{"op": "global_avgpool"}, {"op": "linear"}],
        }
    )
    assert constant_output(genotype) == "body[1] is the op 'zero', which outputs zeros"
    assert not _output_varies(genotype)


def test_search_rejects_constant_output_genotypes_before_training(tmp_path: Path) -> None:
    # With only zero and skip_connect on the edges, about half the tiny space's normal cells
    # are cut off; those trials must be pruned at step 0 with the reason, never trained.
    text = tiny_space(ops=["zero", "skip_connect"], epochs=1)
    space = load_space(write_space(tmp_path, text))
    cfg = SearchConfig(space=space, out=tmp_path / "run", trials=8, seed=0, progress=False)
    study = run_search_study(cfg)
    rejected, trained = [], []
    for t in study.trials:
        genotype = bnas.load_genotype(tmp_path / "run" / "genotypes" / f"trial-{t.number}.yaml")
        (rejected if constant_output(genotype) else trained).append((t, genotype))
    assert rejected and trained, "the space should give both kinds in 8 trials"
    for t, genotype in rejected:
        assert t.state == optuna.trial.TrialState.PRUNED and not t.intermediate_values
        assert t.user_attrs["constraint"] == f"constant output: {constant_output(genotype)}"
        assert "train_time_s" not in t.user_attrs
    for t, _ in trained:
        assert "constraint" not in t.user_attrs
        assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["epochs"] == 1


def test_eval_warns_about_a_constant_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bnas.evaluate import evaluate

    dead = _genotype(ZERO_CELL)
    with caplog.at_level("WARNING", logger="bnas.evaluate"):
        evaluate(dead, "digits", overrides={"epochs": 1, "batch_size": 256}, progress=False, test=False)
    assert "the network's output does not depend on its input (body[0] (cell 'normal')" in caplog.text


def test_a_space_of_only_constant_outputs_stops_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bnas.cli import main

    # Within the OPs bound, yet every draw is cut off by its zero edges: the stop says so
    # instead of quoting a "smallest sampled" value that meets the bound.
    for n, bounds in enumerate(({"max_ops": 1e9}, None)):  # with a bound it meets, and with none
        text = tiny_space(ops=["zero"], **({"constraints": bounds} if bounds else {}))
        out = tmp_path / f"run{n}"
        assert main(["search", str(write_space(tmp_path, text)), "--trials", "4", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: none of the 4 sampled genotypes meets the constraints") and "\n" not in err
        assert "smallest sampled" not in err and "Loosen" not in err
        assert ": 4 with a constant output (cut off by zero ops); nothing was trained. Offer ops other than zero" in err


def test_info_warns_about_a_constant_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bnas.cli import main

    for genotype, warned in ((ZERO_CELL, True), (LIVE_CELL, False)):
        path = tmp_path / "g.yaml"
        _genotype(genotype).to_yaml(path)
        assert main(["info", str(path)]) == 0
        err = capsys.readouterr().err
        assert ("warning: the network's output does not depend on its input: body[0] (cell 'normal')" in err) is warned
