"""The study runner and `bnas search`: outputs, constraints before training, duplicates,
crashes, SIGKILL + resume, seeds, retraining the best genotype, bad storage and studies."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import TWO_GENOTYPES, sigkill_when, tiny_space, write_space
from optuna.distributions import CategoricalDistribution
from torch import nn

import bnas
from bnas.cli import main
from bnas.evaluate import evaluate
from bnas.search.runner import SearchConfig, SearchError, run_search_study
from bnas.search.space import load_space, sample_genotype
from bnas.search.workers import fail_dead_local_workers

TINY = tiny_space()


def _space(tmp_path: Path, text: str = TINY, name: str = "space.yaml") -> Path:
    return write_space(tmp_path, text, name)


def _study(out: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def test_search_outputs_constraints_before_training_and_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(tmp_path, TINY.replace("name: tiny", "name: tiny\nconstraints: {max_ops: 60000}"))
    out = tmp_path / "run"
    assert main(["search", str(space), "--trials", "6", "--out", str(out), "--seed", "3"]) == 0
    captured = capsys.readouterr()
    study = _study(out)
    finished = _finished(study)
    assert len(finished) == 6
    # Over-budget genotypes: pruned at step 0 with the reason, never trained.
    over = [t for t in study.trials if "constraint" in t.user_attrs]
    assert over, "the OPs budget should exclude some of this space"
    for t in over:
        assert t.state.name == "PRUNED" and t.user_attrs["epochs"] == 0 and t.user_attrs["ops"] > 60000
        assert (
            "max_ops" in t.user_attrs["constraint"] and not t.intermediate_values and "train_time_s" not in t.user_attrs
        )
    trained = [t for t in finished if "constraint" not in t.user_attrs]
    assert all(t.user_attrs["ops"] <= 60000 and t.user_attrs["epochs"] >= 1 for t in trained)
    # Every finished trial's genotype is a loadable, buildable file carrying the search's seed.
    for t in finished:
        g = bnas.load_genotype(out / "genotypes" / f"trial-{t.number}.yaml")
        assert g.canonical_hash() == t.user_attrs["genotype_hash"] and g.training["seed"] == 3
        assert bnas.build(g)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    best = bnas.load_genotype(out / "best.yaml")
    assert best.canonical_hash() == study.best_trial.user_attrs["genotype_hash"]
    for png in ("history.png", "pareto.png", "importances.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    rows = (out / "trials.csv").read_text().splitlines()
    assert (
        rows[0].startswith("number,state,values,val_acc,ops,size_bytes,params") and len(rows) == len(study.trials) + 1
    )
    assert json.loads((out / "run.json").read_text())["study"] == "tiny"
    # Progress lines and the epochs-saved figure.
    assert "[6/6]" in captured.err and "best val acc" in captured.err and "ETA" in captured.err
    assert "saved (" in captured.err and "by constraints checked before training" in captured.err
    summary = (out / "summary.md").read_text()
    assert "## Best: trial" in summary and "rejected by constraints, never trained" in summary
    assert main(["search", "--show", str(out)]) == 0
    assert "Search 'tiny'" in capsys.readouterr().out


def test_duplicate_genotypes_are_not_trained_twice(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path, TWO_GENOTYPES))
    study = run_search_study(
        SearchConfig(space=space, out=tmp_path / "run", trials=5, progress=False, sampler="random", pruner="none")
    )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    trained = [t for t in complete if "duplicate_of" not in t.user_attrs]
    assert len({t.user_attrs["genotype_hash"] for t in trained}) == len(trained) <= 2
    dups = [t for t in complete if "duplicate_of" in t.user_attrs]
    assert len(dups) >= 3
    by_number = {t.number: t for t in study.trials}
    for t in dups:
        twin = by_number[t.user_attrs["duplicate_of"]]
        assert t.user_attrs["genotype_hash"] == twin.user_attrs["genotype_hash"] and t.values == twin.values
        assert t.user_attrs["epochs"] == 0 and "train_time_s" not in t.user_attrs


def test_duplicate_of_a_pruned_trial_is_pruned_without_training(tmp_path: Path) -> None:
    text = TWO_GENOTYPES.replace("ops: [skip_connect, binary_conv_3x3]", "ops: [skip_connect]")
    space = load_space(_space(tmp_path, text))
    choices = {"channels": 8, "normal.n0.e0.input": "in1", "normal.n0.e0.op": "skip_connect", "stage0.cells": 1}
    digest = sample_genotype(optuna.trial.FixedTrial(choices), space).canonical_hash()  # the space's only genotype
    out = tmp_path / "run"
    out.mkdir()
    planted = optuna.create_study(study_name="two", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    planted.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED,
            params=choices,
            distributions={k: CategoricalDistribution([v]) for k, v in choices.items()},
            intermediate_values={1: 0.125},
            user_attrs={"genotype_hash": digest, "epochs": 1, "val_acc": 0.125},
        )
    )
    study = run_search_study(SearchConfig(space=space, out=out, trials=2, progress=False))
    new = study.trials[1]
    assert new.state.name == "PRUNED" and new.user_attrs["duplicate_of"] == 0 and new.user_attrs["epochs"] == 0
    assert new.intermediate_values == {1: 0.125} and "train_time_s" not in new.user_attrs


def _crashing_op(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    class Crash(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:  # builds (probe batch 2) but crashes in training
                raise RuntimeError("deliberate crash in training")
            return x[:, :, ::stride, ::stride]

    return Crash()


def test_crashed_trial_is_recorded_and_study_goes_on(tmp_path: Path, isolated_registry: None) -> None:
    # Registered for this test only: an op registered at import would join the parametrisation
    # of test_ops.py over every primitive whenever this file is collected first.
    bnas.register_primitive("test_crashing_op")(_crashing_op)
    text = TWO_GENOTYPES.replace("ops: [skip_connect, binary_conv_3x3]", "ops: [test_crashing_op, binary_conv_3x3]")
    space = load_space(_space(tmp_path, text))
    out = tmp_path / "run"
    study = run_search_study(
        SearchConfig(space=space, out=out, trials=3, progress=False, sampler="random", pruner="none", seed=1)
    )
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs["error"] == "RuntimeError: deliberate crash in training" for t in failed)
    assert all("deliberate crash" in (out / "errors" / f"trial-{t.number}.txt").read_text() for t in failed)
    assert len(_finished(study)) == 3


def test_same_seed_same_first_trials_through_the_runner(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path, TINY.replace("epochs: 2", "epochs: 1")))

    def hashes(out: str, seed: int) -> list[str]:
        study = run_search_study(
            SearchConfig(space=space, out=tmp_path / out, trials=3, progress=False, seed=seed, pruner="none")
        )
        return [t.user_attrs["genotype_hash"] for t in study.trials]

    first = hashes("a", 11)
    assert hashes("b", 11) == first
    assert hashes("c", 12) != first


def test_best_genotype_retrains_to_the_reported_accuracy(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path, TINY))
    out = tmp_path / "run"
    study = run_search_study(SearchConfig(space=space, out=out, trials=3, progress=False, seed=4, pruner="none"))
    report = evaluate(
        out / "best.yaml"
        if (out / "best.yaml").exists()
        else out / "genotypes" / f"trial-{study.best_trial.number}.yaml",
        "digits",
        progress=False,
        test=False,
    )
    # Same split, seed, recipe and thread count: the very same number.
    assert report["best_val_acc"] == pytest.approx(study.best_value, abs=1e-12)


def test_eval_threads_repeats_a_trial_trained_on_that_many_threads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "search",
                str(_space(tmp_path, TINY)),
                "--trials",
                "2",
                "--out",
                str(out),
                "--quiet",
                "--seed",
                "4",
                "--pruner",
                "none",
            ]
        )
        == 0
    )
    study = _study(out)
    assert {t.user_attrs["threads"] for t in study.trials} == {1}
    assert (
        "`--threads 1` (the CPU threads its trials trained on) repeats a trial's training exactly"
        in (out / "summary.md").read_text()
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what `bnas eval` would use by default on this machine
    try:
        assert (
            main(
                [
                    "eval",
                    str(out / "best.yaml"),
                    "--dataset",
                    "digits",
                    "--threads",
                    "1",
                    "--out",
                    str(tmp_path / "eval"),
                    "--quiet",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["threads"] == 1
    assert report["best_val_acc"] == pytest.approx(study.best_value, abs=1e-12)
    assert main(["eval", str(out / "best.yaml"), "--threads", "0", "--out", str(tmp_path / "e0")]) == 2


def test_unreachable_storage_conflicting_study_and_changed_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(tmp_path, TINY.replace("epochs: 2", "epochs: 1"))
    assert (
        main(
            [
                "search",
                str(space),
                "--trials",
                "1",
                "--out",
                str(tmp_path / "a"),
                "--quiet",
                "--storage",
                "sqlite:////nonexistent-dir/x/study.db",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot open the study storage" in err and "Traceback" not in err
    assert (
        main(
            [
                "search",
                str(space),
                "--trials",
                "1",
                "--out",
                str(tmp_path / "b"),
                "--quiet",
                "--storage",
                "postgresql://bnas:secret@127.0.0.1:1/none",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot open the study storage 'postgresql://bnas:***@127.0.0.1:1/none'" in err and "secret" not in err
    out = tmp_path / "run"
    assert main(["search", str(space), "--trials", "2", "--out", str(out), "--quiet"]) == 0
    before = (out / "study.db").read_bytes()
    multi = _space(tmp_path, TINY.replace("name: tiny", "name: tiny\nobjectives: [val_acc, ops]"), "multi.yaml")
    capsys.readouterr()
    assert main(["search", str(multi), "--trials", "3", "--out", str(out), "--quiet", "--study", "tiny"]) == 2
    assert "exists with objectives ['val_acc'], not ['val_acc', 'ops']" in capsys.readouterr().err
    changed = _space(tmp_path, TINY.replace("epochs: 2", "epochs: 3"), "changed.yaml")
    assert main(["search", str(changed), "--trials", "3", "--out", str(out), "--quiet"]) == 2
    assert "different version of the search space 'tiny'" in capsys.readouterr().err
    assert main(["search", str(space), "--trials", "3", "--out", str(out), "--quiet", "--seed", "9"]) == 2
    assert "resume it with --seed 0" in capsys.readouterr().err
    assert (out / "study.db").read_bytes() == before
    assert main(["search", "--show", str(tmp_path / "nowhere")]) == 2
    assert "not a bnas search folder" in capsys.readouterr().err


def test_multi_objective_returns_pareto_front(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    multi = _space(
        tmp_path, TINY.replace("name: tiny", "name: tiny\nobjectives: [val_acc, ops]").replace("epochs: 2", "epochs: 1")
    )
    out = tmp_path / "run"
    assert main(["search", str(multi), "--trials", "4", "--out", str(out), "--sampler", "nsga2"]) == 0
    # A warning of the library's log (the CLI shows warnings on stderr).
    assert any(
        r.levelname == "WARNING" and "cannot prune multi-objective studies" in r.getMessage() for r in caplog.records
    )
    study = _study(out)
    assert len(study.directions) == 2
    front = sorted((out / "pareto").glob("*.yaml"))
    assert {p.name for p in front} == {f"trial-{t.number}.yaml" for t in study.best_trials}
    for t in study.best_trials:  # values are (val acc, OPs) and the OPs are the genotype's
        assert t.values[1] == t.user_attrs["ops"]
        assert (
            bnas.load_genotype(out / "pareto" / f"trial-{t.number}.yaml").canonical_hash()
            == t.user_attrs["genotype_hash"]
        )
    assert "cannot prune multi-objective" in (out / "summary.md").read_text()


def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    space = _space(tmp_path, TINY.replace("epochs: 2", "epochs: 3"))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "bnas",
        "search",
        str(space),
        "--trials",
        "4",
        "--out",
        str(out),
        "--quiet",
        "--pruner",
        "none",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"

    def mid_trial(rows: list[tuple[int, str]]) -> bool:
        if any(s == "RUNNING" for _, s in rows) and any(s == "COMPLETE" for _, s in rows):
            time.sleep(0.2)  # inside the running trial's training
            return True
        return False

    assert sigkill_when(proc, db, mid_trial, timeout=180), "the search finished before it could be killed"
    with sqlite3.connect(db) as con:
        before = dict(con.execute("select number, state from trials").fetchall())
    completed_before = {n for n, s in before.items() if s == "COMPLETE"}
    running = {n for n, s in before.items() if s == "RUNNING"}
    assert running and completed_before
    rerun = subprocess.run(cmd[:-3] + ["--pruner", "none"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "marked 1 trial(s) left running by a killed search as failed" in rerun.stderr
    study = _study(out)
    states = {t.number: t for t in study.trials}
    for n in running:
        assert states[n].state.name == "FAIL" and "killed" in states[n].user_attrs["error"]
    for n in completed_before:
        assert states[n].state.name == "COMPLETE"
    assert len(_finished(study)) == 4
    assert "FAIL" in (out / "trials.csv").read_text()
    # The rerun drew fresh proposals: no trial after the restart is the same genotype as one
    # before it (a sampler seeded once per process replayed trial 0, 1, ... here).
    first_new = max(before) + 1
    old = {t.user_attrs.get("genotype_hash") for t in study.trials if t.number < first_new} - {None}
    new = [t for t in study.trials if t.number >= first_new]
    assert old and new and not any(t.user_attrs["genotype_hash"] in old or "duplicate_of" in t.user_attrs for t in new)


def test_rerun_with_a_larger_count_continues_the_study(tmp_path: Path) -> None:
    space = _space(tmp_path, TWO_GENOTYPES)
    out = tmp_path / "run"
    assert main(["search", str(space), "--trials", "2", "--out", str(out), "--quiet"]) == 0
    first = [(t.number, t.state.name, t.values) for t in _study(out, "two").trials]
    assert main(["search", str(space), "--trials", "2", "--out", str(out), "--quiet"]) == 0
    assert len(_study(out, "two").trials) == 2  # already complete: nothing more runs
    assert main(["search", str(space), "--trials", "4", "--out", str(out), "--quiet"]) == 0
    study = _study(out, "two")
    assert [(t.number, t.state.name, t.values) for t in study.trials[:2]] == first
    assert len(_finished(study)) == 4


@pytest.mark.slow
def test_latency_objective_measures_the_packed_model(tmp_path: Path) -> None:
    text = TWO_GENOTYPES.replace(
        "name: two", "name: two\nobjectives: [val_acc, latency]\nconstraints: {max_latency_ms: 1000}"
    )
    space = load_space(_space(tmp_path, text))
    study = run_search_study(
        SearchConfig(space=space, out=tmp_path / "run", trials=2, progress=False, sampler="random")
    )
    for t in _finished(study):
        assert 0 < t.user_attrs["latency_ms"] < 1000 and t.values[1] == t.user_attrs["latency_ms"]


def test_latency_constraint_is_checked_before_training(tmp_path: Path) -> None:
    # No network runs in a nanosecond: every trial is over budget, none is trained, and the
    # search says that no sampled genotype meets the constraint.
    text = TWO_GENOTYPES.replace("name: two", "name: two\nconstraints: {max_latency_ms: 1.0e-6}")
    space = load_space(_space(tmp_path, text))
    with pytest.raises(
        SearchError, match=r"none of the 2 sampled genotypes meets the constraints.*max_latency_ms 1e-06"
    ):
        run_search_study(SearchConfig(space=space, out=tmp_path / "run", trials=2, progress=False, sampler="random"))
    study = _study(tmp_path / "run", "two")
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state.name == "PRUNED" and t.user_attrs["epochs"] == 0 and not t.intermediate_values
        assert "latency_ms > max_latency_ms" in t.user_attrs["constraint"] and t.user_attrs["latency_ms"] > 0


def test_train_subset_is_a_seeded_subset_and_validation_is_untouched(tmp_path: Path) -> None:
    from bnas.search.runner import search_data

    full = load_space(_space(tmp_path, TINY, "full.yaml"))
    proxy = load_space(_space(tmp_path, TINY.replace("name: tiny", "name: tiny\ntrain_subset: 300"), "proxy.yaml"))
    a, b, whole = search_data(proxy, seed=0), search_data(proxy, seed=0), search_data(full, seed=0)
    assert len(a.train_y) == 300 and torch.equal(a.train_x, b.train_x)
    assert torch.equal(a.val_x, whole.val_x) and torch.equal(a.test_y, whole.test_y)
    # Every kept image comes from the full training split.
    rows = {bytes(x.numpy().tobytes()) for x in whole.train_x}
    assert all(bytes(x.numpy().tobytes()) in rows for x in a.train_x)
    assert not torch.equal(search_data(proxy, seed=1).train_y, a.train_y)


def test_orphaned_running_trial_is_failed_after_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trial whose worker vanished before naming itself (the database went away right after
    # the trial was created) would hold a slot of the study forever; it is failed instead.
    monkeypatch.delenv("BNAS_ORPHAN_GRACE_S", raising=False)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    orphan = study.ask()
    alive = study.ask()
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert fail_dead_local_workers(study) == 0  # both just started: within the 120 s grace
    monkeypatch.setenv("BNAS_ORPHAN_GRACE_S", "soon")
    with pytest.raises(SearchError, match=r"^BNAS_ORPHAN_GRACE_S must be a number of seconds >= 0, got 'soon'$"):
        fail_dead_local_workers(study)
    monkeypatch.setenv("BNAS_ORPHAN_GRACE_S", "0")  # one host: no clock skew to allow for
    assert fail_dead_local_workers(study) == 1
    states = {t.number: t for t in study.trials}
    assert states[orphan.number].state.name == "FAIL"
    assert (
        states[orphan.number].user_attrs["error"]
        == "interrupted: its worker never registered (0 s after the trial started)"
    )
    assert states[alive.number].state.name == "RUNNING"
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))  # nothing sampled, nothing to retry
