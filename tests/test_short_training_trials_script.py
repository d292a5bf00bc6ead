"""benchmarks/short_training_trials.py: a finished search's trials scored by a short training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_CELL_SPACE, load_benchmark

from bnas.genotype import load_genotype
from bnas.search.objective import search_data
from bnas.search.space import load_space
from bnas.search.supernet import supernet_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "short_training_trials.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False, env=ENV, timeout=300
    )


@pytest.fixture(scope="module")
def per_trial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-trial per-trial search on a tiny space (search_efficiency.py --keep)."""
    tmp = tmp_path_factory.mktemp("short_trials")
    space_file = tmp / "tiny.yaml"
    tiny = {**TINY_CELL_SPACE, "name": "tiny_short_trials", "train_subset": 256}
    tiny["budget"] = {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01}}
    space_file.write_text(yaml.safe_dump(tiny), encoding="utf-8")
    flags = ["--oneshot", "--route", "per_trial", "--space", str(space_file), "--trials", "4", "--keep", str(tmp)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"), *flags],
        capture_output=True,
        text=True,
        check=False,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "seed0" / "per-trial"


def test_every_completed_trial_is_scored_as_the_ranking_benchmark_scores_it(per_trial_run: Path) -> None:
    done = run_script(str(per_trial_run), "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, summary = [json.loads(line) for line in done.stdout.splitlines()]
    manifest = json.loads((per_trial_run / "run.json").read_text(encoding="utf-8"))
    study = optuna.load_study(study_name=manifest["study"], storage=manifest["storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, "the tiny search should complete at least one trial"
    assert [r["trial"] for r in lines] == [t.number for t in complete]
    assert [r["search_value"] for r in lines] == [t.values[0] for t in complete]

    ranking = load_benchmark("oneshot_ranking")
    space = load_space(manifest["space"])
    data, recipe = search_data(space, 0), supernet_recipe(space)
    for row in lines:
        genotype = load_genotype(per_trial_run / "genotypes" / f"trial-{row['trial']}.yaml")
        assert ranking.short_training_score(genotype, data, recipe, 2, 0) == pytest.approx(
            row["short_training_val_acc"], abs=1e-5
        )

    assert summary["summary"] and summary["trials"] == len(lines) and summary["steps"] == 2
    by_short = sorted(lines, key=lambda r: -r["short_training_val_acc"])
    best = max(lines, key=lambda r: r["search_value"])
    assert summary["best_by_search"] == best["trial"]
    assert summary["best_by_search_short_rank"] == 1 + by_short.index(best)
    assert summary["best_by_short"] == by_short[0]["trial"]
    if len(lines) > 1:
        from scipy.stats import kendalltau

        tau = kendalltau([r["search_value"] for r in lines], [r["short_training_val_acc"] for r in lines]).statistic
        assert summary["kendall_tau"] == (None if tau != tau else pytest.approx(tau, abs=1e-4))


def test_a_folder_that_is_not_a_search_run_is_refused_in_one_line(tmp_path: Path) -> None:
    done = run_script(str(tmp_path))
    assert done.returncode != 0
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'run.json'}: no such file; RUN must be a search's output folder (bnas search --out)"
    )


def test_zero_steps_is_refused(tmp_path: Path) -> None:
    done = run_script(str(tmp_path), "--steps", "0")
    assert done.returncode == 2 and "--steps must be at least 1" in done.stderr
