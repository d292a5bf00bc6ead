"""Architecture search: space validation, reproducibility, constraints, duplicates, crashes,
SIGKILL + resume, bad storage and conflicting studies."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

import bnas
from bnas.cli import main
from bnas.errors import GenotypeError
from bnas.search.runner import SearchConfig, SearchError, make_sampler, run_search_study
from bnas.search.space import load_space, sample_genotype

REPO = Path(__file__).resolve().parents[1]
TINY = """
name: tiny
dataset: digits
input: [1, 8, 8]
num_classes: 10
stem:
  - {op: conv_bn, channels: 8}
cells:
  ops: [binary_conv_3x3, skip_connect, bireal_block]
  nodes: 2
  inputs: 2
  edges_per_node: 1
  combine: sum
macro:
  stages: 2
  channels: [8, 16]
  cells_per_stage: [1]
head:
  - {op: global_avgpool}
  - {op: linear}
budget:
  epochs: 2
  batch_size: 128
  optimizer: {name: adam, lr: 0.01}
"""


def _space(tmp_path: Path, text: str = TINY, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "old,new,path,fragment",
    [
        ("binary_conv_3x3, skip", "binary_conv_3x4, skip", "cells.ops[0]", "did you mean binary_conv_3x3"),
        ("nodes: 2", "nodes: 0", "cells.nodes", "positive integer"),
        ("combine: sum", "combine: max", "cells.combine", "invalid combine"),
        ("channels: [8, 16]", "channels: [8, -1]", "macro.channels", "positive integer"),
        ("epochs: 2", "epochs: two", "budget", "positive integer"),
        ("name: tiny", "name: tiny\nobjectives: [ops]", "objectives", "starting with val_acc"),
        ("name: tiny", "name: tiny\nconstraints: {max_flops: 3}", "constraints.max_flops", "unknown constraint"),
        ("name: tiny", "name: tiny\nsampler: cmaes", "sampler", "tpe, random, nsga2 or gp"),
    ],
)
def test_invalid_space_files(tmp_path: Path, old: str, new: str, path: str, fragment: str) -> None:
    file = _space(tmp_path, TINY.replace(old, new, 1))
    with pytest.raises(GenotypeError) as info:
        load_space(file)
    assert info.value.path == path and fragment in info.value.message
    assert str(info.value).startswith(str(file))


def test_shipped_spaces_load_and_sample() -> None:
    spaces = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert {p.stem for p in spaces} >= {"quickstart", "mnist_cells", "fashion_mnist_cells", "bars_macro", "darts_binary"}
    for path in spaces:
        space = load_space(path)
        study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(3):
            genotype = sample_genotype(study.ask(), space)
            model = bnas.build(genotype)
            assert model(torch.zeros(2, *genotype.input)).shape == (2, space.num_classes)


def _first_genotypes(space_path: Path, sampler: str, seed: int, n: int = 4) -> list[str]:
    space = load_space(space_path)
    study = optuna.create_study(directions=space.directions, sampler=make_sampler(sampler, seed, False))
    hashes = []
    for _ in range(n):
        trial = study.ask()
        hashes.append(sample_genotype(trial, space).canonical_hash())
        study.tell(trial, 0.5)
    return hashes


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_same_seed_same_first_genotypes(sampler: str) -> None:
    path = REPO / "search_spaces" / "quickstart.yaml"
    assert _first_genotypes(path, sampler, 7) == _first_genotypes(path, sampler, 7)
    assert _first_genotypes(path, sampler, 7) != _first_genotypes(path, sampler, 8)


def test_search_writes_outputs_and_skips_over_budget_and_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = TINY.replace("name: tiny", "name: tiny\nconstraints: {max_ops: 60000}")
    space = _space(tmp_path, text)
    out = tmp_path / "run"
    assert main(["search", str(space), "--trials", "8", "--out", str(out), "--quiet", "--pruner", "none"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 8
    over = [t for t in study.trials if "constraint" in t.user_attrs]
    assert over and all(t.user_attrs["epochs"] == 0 and t.state.name == "PRUNED" for t in over)
    assert all(t.user_attrs["ops"] > 60000 for t in over)
    dups = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert all(t.user_attrs["epochs"] == 0 for t in dups)
    hashes = [t.user_attrs["genotype_hash"] for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert len(hashes) == len(set(hashes)), "a genotype was trained twice"
    for t in finished:
        g = bnas.load_genotype(out / "genotypes" / f"trial-{t.number}.yaml")
        assert bnas.build(g)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert (out / "best.yaml").is_file() and (out / "summary.md").is_file()
    for png in ("history.png", "pareto.png", "importances.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,values,val_acc,ops") and len(rows) == len(study.trials) + 1
    capsys.readouterr()
    assert main(["search", "--show", str(out)]) == 0
    assert "Search 'tiny'" in capsys.readouterr().out


@bnas.register_primitive("test_crashing_op", override=True)
def _crashing_op(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    class Crash(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:  # builds (probe batch 2) but crashes in training
                raise RuntimeError("deliberate crash in training")
            return x[:, :, ::stride, ::stride]

    return Crash()


def test_crashed_trial_is_recorded_and_study_goes_on(tmp_path: Path) -> None:
    text = TINY.replace("ops: [binary_conv_3x3, skip_connect, bireal_block]", "ops: [test_crashing_op, binary_conv_3x3]")
    text = text.replace("nodes: 2", "nodes: 1").replace("stages: 2", "stages: 1")
    space = load_space(_space(tmp_path, text))
    cfg = SearchConfig(space=space, out=tmp_path / "run", trials=4, progress=False, sampler="random", pruner="none")
    study = run_search_study(cfg)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all("deliberate crash" in t.user_attrs["error"] for t in failed)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4


def test_unreachable_storage_and_conflicting_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(tmp_path)
    assert main(["search", str(space), "--trials", "1", "--out", str(tmp_path / "a"), "--quiet",
                 "--storage", "sqlite:////nonexistent-dir/x/study.db"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the study storage" in err and "Traceback" not in err
    out = tmp_path / "run"
    assert main(["search", str(space), "--trials", "2", "--out", str(out), "--quiet"]) == 0
    before = (out / "study.db").read_bytes()
    multi = _space(tmp_path, TINY.replace("name: tiny", "name: tiny\nobjectives: [val_acc, ops]"), "multi.yaml")
    capsys.readouterr()
    assert main(["search", str(multi), "--trials", "3", "--out", str(out), "--quiet", "--study", "tiny"]) == 2
    assert "exists with objectives ['val_acc'], not ['val_acc', 'ops']" in capsys.readouterr().err
    assert (out / "study.db").read_bytes() == before


def test_multi_objective_returns_pareto_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    multi = _space(tmp_path, TINY.replace("name: tiny", "name: tiny\nobjectives: [val_acc, ops]"))
    out = tmp_path / "run"
    assert main(["search", str(multi), "--trials", "3", "--out", str(out), "--sampler", "nsga2"]) == 0
    captured = capsys.readouterr()
    assert "cannot prune multi-objective studies" in captured.err
    front = list((out / "pareto").glob("*.yaml"))
    assert front and all(bnas.load_genotype(p) for p in front)


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    text = TINY.replace("epochs: 2", "epochs: 3")
    space = _space(tmp_path, text)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bnas", "search", str(space), "--trials", "4", "--out", str(out), "--quiet", "--pruner", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if db.is_file():
            try:
                with sqlite3.connect(db) as con:
                    rows = con.execute("select number, state from trials").fetchall()
            except sqlite3.Error:
                rows = []
            if any(n >= 1 and s == "RUNNING" for n, s in rows) and any(s == "COMPLETE" for _, s in rows):
                time.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.1)
    proc.wait()
    assert killed, "the search finished before it could be killed"
    with sqlite3.connect(db) as con:
        before = dict(con.execute("select number, state from trials").fetchall())
    completed_before = {n for n, s in before.items() if s == "COMPLETE"}
    running = {n for n, s in before.items() if s == "RUNNING"}
    assert running
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    states = {t.number: t for t in study.trials}
    for n in running:
        assert states[n].state.name == "FAIL" and "killed" in states[n].user_attrs["error"]
    for n in completed_before:
        assert states[n].state.name == "COMPLETE"
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4
