"""One-shot search (issue 14): `bnas search SPACE --supernet RUN/supernet.pt` scores trials with
a trained supernet's inherited weights, and `--retrain-top K` retrains the best from scratch."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import TWO_GENOTYPES, sigkill_when, tiny_space, write_space
from scipy.stats import kendalltau

import bnas
import bnas.search.retrain as retrain_module
from bnas.cli import main
from bnas.search.objective import search_data
from bnas.search.retrain import retrain_candidates
from bnas.search.space import load_space
from bnas.search.supernet import calibration_batches, path_angle, score
from bnas.search.supernet_run import initial_supernet, load_supernet, train_supernet

# The tests' tiny space with an OPs budget that some of its genotypes exceed (seed 3 samples some).
BUDGETED = tiny_space().replace("name: tiny", "name: tiny\nconstraints: {max_ops: 60000}")


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The budgeted space's file and a supernet trained on it for one epoch."""
    folder = tmp_path_factory.mktemp("budgeted")
    space_file = write_space(folder, BUDGETED)
    train_supernet(load_space(space_file), folder / "supernet", epochs=1, seed=3)  # the searches' seed
    return space_file, folder / "supernet" / "supernet.pt"


def _search(space: Path, out: Path, supernet: Path | None, *extra: str, trials: int = 6) -> int:
    argv = ["search", str(space), "--trials", str(trials), "--out", str(out), "--seed", "3", "--quiet", *extra]
    return main(argv + (["--supernet", str(supernet)] if supernet is not None else []))


def _study(out: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _rows(out: Path) -> dict[int, dict[str, str]]:
    with (out / "trials.csv").open() as f:
        return {int(r["number"]): r for r in csv.DictReader(f)}


def test_trials_are_scored_with_the_supernet_never_trained(
    budgeted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space_file, supernet_file = budgeted
    out = tmp_path / "run"
    assert _search(space_file, out, supernet_file) == 0
    study = _study(out)
    rows = _rows(out)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and len(rows) == len(study.trials)
    # Over budget: pruned before any scoring.
    over = [t for t in study.trials if "constraint" in t.user_attrs]
    assert over, "the OPs budget should exclude some of these genotypes"
    for t in over:
        assert t.state.name == "PRUNED" and t.user_attrs["ops"] > 60000
        assert "supernet_acc" not in t.user_attrs and "score_time_s" not in t.user_attrs
        assert "supernet_loss" not in t.user_attrs
        assert rows[t.number]["supernet_acc"] == rows[t.number]["supernet_loss"] == ""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete
    for t in complete:
        acc = t.user_attrs["supernet_acc"]
        assert t.values == [acc] and t.user_attrs["val_acc"] == acc and t.user_attrs["epochs"] == 0
        assert "train_time_s" not in t.user_attrs and not t.intermediate_values
        row = rows[t.number]
        assert float(row["supernet_acc"]) == acc and row["epochs"] == "0"
        assert float(row["supernet_loss"]) == t.user_attrs["supernet_loss"] > 0
        assert row["retrain_val_acc"] == row["retrain_test_acc"] == ""
    # Each score is supernet.score on the search's calibration batches (seed 3, 8 of 64).
    space = load_space(space_file)
    supernet = load_supernet(supernet_file, space)
    data = search_data(space, 3)
    batches = calibration_batches(data, num_batches=8, batch_size=64, seed=3, device="cpu")
    for t in complete:
        genotype = bnas.load_genotype(out / "genotypes" / f"trial-{t.number}.yaml")
        acc, loss = score(supernet, genotype, data, calibration=batches, with_loss=True)
        assert (acc, loss) == (t.user_attrs["supernet_acc"], t.user_attrs["supernet_loss"])
    # The study and run.json name the supernet; the summary says the search was one-shot.
    recorded = study.user_attrs["supernet"]
    assert recorded["path"] == str(supernet_file.resolve()) and recorded["epochs"] == 1
    assert recorded["sha256"] == hashlib.sha256(supernet_file.read_bytes()).hexdigest()
    assert recorded["calibration_batches"] == 8
    assert json.loads((out / "run.json").read_text())["supernet"] == str(supernet_file.resolve())
    capsys.readouterr()
    assert main(["search", "--show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"the supernet `{supernet_file.resolve()}` (trained 1 epoch(s)" in shown
    assert "no epochs trained (one-shot)" in shown and "supernet score" in shown


def test_trials_scored_by_angle(
    budgeted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space_file, supernet_file = budgeted
    out = tmp_path / "run"
    assert _search(space_file, out, supernet_file, "--supernet-score", "angle", "--retrain-top", "1", trials=8) == 0
    study = _study(out)
    rows = _rows(out)
    assert study.user_attrs["supernet"]["score"] == "angle"
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert len(complete) >= 2
    # Each score is path_angle against the supernet as its training started (seed 3, separate widths).
    space = load_space(space_file)
    trained = load_supernet(supernet_file, space)
    initial = initial_supernet(space, 3, "separate")
    for t in complete:
        genotype = bnas.load_genotype(out / "genotypes" / f"trial-{t.number}.yaml")
        angle = path_angle(trained, initial, genotype)
        assert 0 < angle < math.pi / 2
        assert t.values == [angle] and t.user_attrs["supernet_angle"] == angle
        assert "val_acc" not in t.user_attrs and "supernet_acc" not in t.user_attrs
        assert float(rows[t.number]["supernet_angle"]) == angle and rows[t.number]["supernet_acc"] == ""
    # --retrain-top retrains the largest angle.
    best = max(complete, key=lambda t: (t.values[0], -t.number))
    assert {n for n, r in rows.items() if r["retrain_test_acc"]} == {best.number}
    summary = (out / "summary.md").read_text()
    assert "every trial scored by ABS's angle" in summary and "no data read" in summary
    # Resuming it with the accuracy score is refused, and nothing changes.
    before = (out / "study.db").read_bytes()
    capsys.readouterr()
    assert _search(space_file, out, supernet_file, trials=10) == 2
    assert "scored each trial by its angle, not by its accuracy; resume it with --supernet-score angle" in (
        capsys.readouterr().err
    )
    assert (out / "study.db").read_bytes() == before
    # The angle reads no data: the flags that change how data scores a trial are refused beside it.
    for flag in ("--calibration-batches", "--finetune-steps", "--probe-samples"):
        assert _search(space_file, tmp_path / "x", supernet_file, "--supernet-score", "angle", flag, "4") == 2
        assert f"{flag} changes how the inherited weights are evaluated on data" in capsys.readouterr().err
    assert _search(space_file, tmp_path / "x", None, "--supernet-score", "angle") == 2
    assert "--supernet-score applies to a one-shot search" in capsys.readouterr().err


@pytest.mark.parametrize("by", ["accuracy", "angle"])
def test_duplicates_reuse_the_score(tmp_path: Path, by: str) -> None:
    space_file = write_space(tmp_path, TWO_GENOTYPES)
    train_supernet(load_space(space_file), tmp_path / "sn", epochs=1, seed=3)
    out = tmp_path / "run"
    assert _search(space_file, out, tmp_path / "sn" / "supernet.pt", "--supernet-score", by, trials=5) == 0
    trials = _study(out, "two").trials
    dups = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert dups and len(trials) == 5
    by_number = {t.number: t for t in trials}
    recorded = ["supernet_angle"] if by == "angle" else ["supernet_acc", "supernet_loss"]
    for t in dups:
        twin = by_number[t.user_attrs["duplicate_of"]]
        assert t.values == twin.values
        assert all(t.user_attrs[key] == twin.user_attrs[key] for key in recorded)
        assert "score_time_s" not in t.user_attrs  # not scored again
    scored = [t for t in trials if "score_time_s" in t.user_attrs]
    assert len(scored) == len({t.user_attrs["genotype_hash"] for t in trials}) <= 2


def test_refused_supernets_and_studies(
    budgeted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space_file, supernet_file = budgeted
    # A supernet of another space: one line before any trial, no study made.
    two = write_space(tmp_path, TWO_GENOTYPES, "two.yaml")
    out = tmp_path / "two"
    capsys.readouterr()
    assert _search(two, out, supernet_file) == 2
    err = capsys.readouterr().err
    assert f"{supernet_file.resolve()} was trained on search space 'tiny'" in err and len(err.strip().splitlines()) == 1
    assert not (out / "study.db").exists() and not (out / "genotypes").exists()
    assert _search(space_file, tmp_path / "x", None, "--calibration-batches", "4") == 2
    assert "--calibration-batches applies to a one-shot search" in capsys.readouterr().err
    # A one-shot study resumed without its supernet, with another one, or other calibration.
    oneshot = tmp_path / "oneshot"
    assert _search(space_file, oneshot, supernet_file, trials=2) == 0
    before = (oneshot / "study.db").read_bytes()
    capsys.readouterr()
    assert _search(space_file, oneshot, None, trials=3) == 2
    assert f"is a one-shot study scored with the supernet {supernet_file.resolve()}" in capsys.readouterr().err
    other = tmp_path / "other"
    data = search_data(load_space(space_file), 3)
    data.train_x, data.train_y = data.train_x[:128], data.train_y[:128]  # one step: only its hash matters here
    train_supernet(load_space(space_file), other, epochs=1, seed=3, data=data)
    assert _search(space_file, oneshot, other / "supernet.pt", trials=3) == 2
    assert "was scored with another supernet" in capsys.readouterr().err
    # A supernet trained with another seed held out other validation images.
    train_supernet(load_space(space_file), tmp_path / "seed1", epochs=1, seed=1, data=data)
    assert _search(space_file, oneshot, tmp_path / "seed1" / "supernet.pt", trials=3) == 2
    assert "was trained with --seed 1, which holds out the validation images" in capsys.readouterr().err
    assert _search(space_file, oneshot, supernet_file, "--calibration-batches", "4", trials=3) == 2
    assert "resume it with --calibration-batches 8" in capsys.readouterr().err
    assert (oneshot / "study.db").read_bytes() == before
    # A per-trial study resumed as a one-shot one.
    per_trial = tmp_path / "per-trial"
    assert _search(space_file, per_trial, None, trials=1) == 0
    before = (per_trial / "study.db").read_bytes()
    capsys.readouterr()
    assert _search(space_file, per_trial, supernet_file, trials=2) == 2
    assert "trains every trial (it was made without --supernet)" in capsys.readouterr().err
    assert (per_trial / "study.db").read_bytes() == before


@pytest.fixture
def retrain_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``evaluate`` call the retraining makes (each still runs)."""
    calls: list[dict[str, Any]] = []
    real = retrain_module.evaluate

    def recording(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "evaluate", recording)
    return calls


def test_retrain_top_retrains_once_and_resumes(
    budgeted: tuple[Path, Path], tmp_path: Path, retrain_calls: list[dict[str, Any]]
) -> None:
    calls = retrain_calls
    space_file, supernet_file = budgeted
    out = tmp_path / "run"
    flags = ("--retrain-epochs", "1")
    assert _search(space_file, out, supernet_file, "--retrain-top", "2", *flags, trials=10) == 0
    study = _study(out)
    ranked = sorted(
        (t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs),
        key=lambda t: (-t.values[0], t.number),
    )
    assert len(ranked) >= 3
    rows = _rows(out)
    done = {n for n, r in rows.items() if r["retrain_val_acc"]}
    assert done == {t.number for t in ranked[:2]} == {n for n, r in rows.items() if r["retrain_test_acc"]}
    assert len(calls) == 2 and all(c["overrides"] == {"seed": 3, "epochs": 1} and c["test"] for c in calls)
    for n in done:
        report = json.loads((out / "retrain" / f"trial-{n}" / "report.json").read_text())
        assert float(rows[n]["retrain_val_acc"]) == report["best_val_acc"] and report["epochs_run"] == 1
        assert float(rows[n]["retrain_test_acc"]) == report["test_acc"]
    assert "Kendall tau" not in (out / "summary.md").read_text()  # two trials rank nothing
    # A rerun retrains nothing again: with a larger K, only the new one.
    assert _search(space_file, out, supernet_file, "--retrain-top", "3", *flags, trials=10) == 0
    assert len(calls) == 3 and calls[-1]["out"] == out / "retrain" / f"trial-{ranked[2].number}"
    retrained = {int(n): r for n, r in _study(out).user_attrs["retrained"].items()}
    assert set(retrained) == {t.number for t in ranked[:3]}
    tau = kendalltau([t.values[0] for t in ranked[:3]], [retrained[t.number]["val_acc"] for t in ranked[:3]]).statistic
    summary = (out / "summary.md").read_text()
    expected = "undefined (one of the two is constant)" if tau != tau else f"{tau:.3f}"
    assert (
        f"Kendall tau between the supernet score and the retrained val acc over these 3 trials: {expected}" in summary
    )
    # An interrupted retrain (its checkpoint, no report) resumes from the checkpoint.
    first = ranked[0].number
    (out / "retrain" / f"trial-{first}" / "report.json").unlink()
    assert _search(space_file, out, supernet_file, "--retrain-top", "3", *flags, trials=10) == 0
    assert len(calls) == 4 and calls[-1]["resume"] is True
    assert _rows(out)[first]["retrain_val_acc"] == rows[first]["retrain_val_acc"]


def test_retrain_recipe_replaces_the_budgets_keys_and_is_checked(
    budgeted: tuple[Path, Path],
    tmp_path: Path,
    retrain_calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = retrain_calls
    space_file, supernet_file = budgeted
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("epochs: 2\noptimizer: {name: sgd, lr: 0.05}\n")
    out = tmp_path / "run"
    assert _search(space_file, out, supernet_file, "--retrain-top", "1", "--retrain-recipe", str(recipe_file)) == 0
    assert len(calls) == 1 and calls[0]["overrides"] == {
        "seed": 3,
        "epochs": 2,
        "optimizer": {"name": "sgd", "lr": 0.05},
    }
    (folder,) = (out / "retrain").iterdir()
    recipe = json.loads((folder / "report.json").read_text())["recipe"]
    budget = load_space(space_file).budget
    # The file's keys replace the budget's whole (SGD's momentum is its default, not Adam's betas);
    # every other key is the budget's; the seed is the search's.
    assert recipe["optimizer"] == {"name": "sgd", "lr": 0.05} and recipe["epochs"] == 2 and recipe["seed"] == 3
    assert recipe["batch_size"] == budget["batch_size"] == 128 and recipe["schedule"] == {"name": "cosine"}
    # --retrain-epochs wins over the file's epochs; the finished retraining is kept, with a warning.
    capsys.readouterr()
    assert (
        _search(
            space_file,
            out,
            supernet_file,
            "--retrain-top",
            "1",
            "--retrain-recipe",
            str(recipe_file),
            "--retrain-epochs",
            "1",
        )
        == 0
    )
    assert len(calls) == 1
    assert (
        f"{folder / 'report.json'} was retrained with another recipe (epochs: 2, now 1); kept"
        in capsys.readouterr().err
    )
    # A genotype file gives its training: section.
    assert (
        retrain_module.load_retrain_recipe(
            Path(bnas.__file__).parents[1] / "search_spaces/genotypes/fashion_searched.yaml", load_space(space_file)
        )["epochs"]
        == 3
    )
    # Bad recipes fail before the search starts, naming the file and the key; no run folder is made.
    capsys.readouterr()
    for text, message in [
        ("epochs: 0\n", "recipe.yaml: epochs: expected a positive integer, got 0"),
        ("epochz: 3\n", "recipe.yaml: unknown recipe key(s) epochz"),
        ("val_fraction: 0.5\n", "recipe.yaml: val_fraction: val_fraction 0.5 differs from the search's 0.1"),
        ("name: g\nbody: []\n", "recipe.yaml: training: a genotype file whose training: section is missing"),
    ]:
        recipe_file.write_text(text)
        assert (
            _search(
                space_file, tmp_path / "bad", supernet_file, "--retrain-top", "1", "--retrain-recipe", str(recipe_file)
            )
            == 2
        )
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert _search(space_file, tmp_path / "bad", supernet_file, "--retrain-recipe", str(recipe_file)) == 2
    assert "--retrain-recipe applies to --retrain-top K: add --retrain-top K, or drop it" in capsys.readouterr().err


def test_retrain_candidates_skip_duplicates_and_over_budget_and_take_the_pareto_front() -> None:
    def trial(values: list[float], **attrs: Any) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(values=values, user_attrs=attrs)

    single = optuna.create_study(direction="maximize")
    for values, attrs in [
        ([0.5], {}),
        ([0.9], {"duplicate_of": 0}),  # reused a twin's result: retrained as its twin, if at all
        ([0.7], {}),
        ([0.7], {}),  # a tie: the earlier trial first
        ([0.8], {"constraint": "max_ops"}),
        ([0.6], {}),
    ]:
        single.add_trial(trial(values, **attrs))
    single.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    assert [t.number for t in retrain_candidates(single, 3)] == [2, 3, 5]
    assert [t.number for t in retrain_candidates(single, 10)] == [2, 3, 5, 0]
    multi = optuna.create_study(directions=["maximize", "minimize"])
    for values in ([0.5, 10.0], [0.7, 30.0], [0.6, 20.0], [0.4, 40.0], [0.6, 5.0]):
        multi.add_trial(trial(values))
    multi.add_trial(trial([0.7, 30.0], duplicate_of=1))
    # The front is 1 (0.7, 30), 4 (0.6, 5) and its duplicate 5; 2 and 0 are dominated by 4.
    assert [t.number for t in retrain_candidates(multi, 5)] == [1, 4]
    assert [t.number for t in retrain_candidates(multi, 1)] == [1]


def test_sigkilled_oneshot_search_resumes(budgeted: tuple[Path, Path], tmp_path: Path) -> None:
    space_file, supernet_file = budgeted
    out = tmp_path / "run"
    # Scoring a trial takes well under a second, so the search needs many more trials than the
    # kill waits for; with 6, a loaded machine once let all 6 start between two polls.
    total = 30
    cmd = [sys.executable, "-m", "bnas", "search", str(space_file), "--trials", str(total), "--out", str(out)]
    cmd += ["--quiet", "--seed", "3", "--sampler", "random", "--supernet", str(supernet_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    two_done = lambda rows: sum(s == "COMPLETE" for _, s in rows) >= 2  # noqa: E731
    assert sigkill_when(proc, db, two_done, timeout=120), "the search finished before it could be killed"
    with sqlite3.connect(db) as con:
        before = dict(con.execute("select number, state from trials").fetchall())
    assert len(before) < total
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    study = _study(out)
    states = {t.number: t for t in study.trials}
    for n, s in before.items():
        if s == "RUNNING":  # killed mid-trial: failed with the reason, not left running
            assert states[n].state.name == "FAIL" and "killed" in states[n].user_attrs["error"]
        elif s == "COMPLETE":
            assert states[n].state.name == "COMPLETE"
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == total
    assert all("supernet_acc" in t.user_attrs for t in finished if t.state.name == "COMPLETE")


@pytest.mark.parametrize(
    ("flag", "value", "key", "shown", "refused"),
    [
        (
            "--finetune-steps",
            2,
            "finetune_steps",
            "a copy of them fine-tuned for 2 steps",
            "fine-tuned each trial's inherited weights for 2 steps before scoring, not 0",
        ),
        (
            "--probe-samples",
            128,
            "probe_samples",
            "a linear probe refitted on its features for 128 training images",
            "a linear probe fitted on 128 training images, not as asked now",
        ),
    ],
)
def test_scoring_options_are_recorded_and_checked_on_resume(
    budgeted: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: int,
    key: str,
    shown: str,
    refused: str,
) -> None:
    space_file, supernet_file = budgeted
    out = tmp_path / "scored"
    assert _search(space_file, out, supernet_file, flag, str(value), trials=3) == 0
    study = _study(out)
    assert study.user_attrs["supernet"][key] == value
    # Each score is supernet.score with the option, seeded with the search's seed.
    space = load_space(space_file)
    supernet = load_supernet(supernet_file, space)
    data = search_data(space, 3)
    batches = calibration_batches(data, num_batches=8, batch_size=64, seed=3, device="cpu")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete
    for t in complete:
        genotype = bnas.load_genotype(out / "genotypes" / f"trial-{t.number}.yaml")
        expected = score(supernet, genotype, data, calibration=batches, seed=3, **{key: value})
        assert expected == t.user_attrs["supernet_acc"]
    capsys.readouterr()
    assert main(["search", "--show", str(out)]) == 0
    assert shown in capsys.readouterr().out
    # Resumed without the option: refused, nothing changed.
    before = (out / "study.db").read_bytes()
    assert _search(space_file, out, supernet_file, trials=4) == 2
    assert refused in capsys.readouterr().err
    assert (out / "study.db").read_bytes() == before
    assert _search(space_file, tmp_path / "x", None, flag, str(value)) == 2
    assert f"{flag} applies to a one-shot search" in capsys.readouterr().err
    assert _search(space_file, tmp_path / "y", supernet_file, flag, "-1") == 2
    assert f"{flag} must be 0 or more, got -1" in capsys.readouterr().err
