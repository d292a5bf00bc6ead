"""benchmarks/search_efficiency.py --oneshot: the summary of route runs, the rerank and the proxy route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_benchmark, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "search_efficiency.py"


def route(name: str, seed: int, acc: float, cpu: float, **extra: object) -> str:
    row = {
        "benchmark": "search_efficiency_oneshot",
        "space": "fashion_mnist_cells",
        "seed": seed,
        "route": name,
        "trials": 40 if name == "per_trial" else 50,
        "retrained_test_acc": acc,
        "cpu_s": cpu,
        **extra,
    }
    return json.dumps(row)


def summarize_cli(*files: Path) -> subprocess.CompletedProcess[str]:
    """``--oneshot --summarize FILES`` as a user runs it, in a process of its own."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--oneshot", "--summarize", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )


# The summaries and the refusals run the script's main() in this process: in a process of their
# own each spent about 2.5 s importing torch and bnas (summarize_cli keeps one test on the CLI).
def summarize(capsys: pytest.CaptureFixture[str], *files: Path) -> list[dict[str, Any]]:
    """The summary lines ``--oneshot --summarize FILES`` prints."""
    return run_benchmark("search_efficiency", ["--oneshot", "--summarize", *map(str, files)], capsys)[1]


def refusal(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """The one line the script exits with for ``flags``: argparse's error (exit status 2) or
    its own ``SystemExit`` message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        load_benchmark("search_efficiency").main(list(flags))
    if stopped.value.code == 2:
        return capsys.readouterr().err.strip().splitlines()[-1]
    assert isinstance(stopped.value.code, str), stopped.value.code
    return stopped.value.code


def route_line(flags: list[str]) -> dict[str, Any]:
    """The one route line of a benchmark run with ``flags``, on one OpenMP thread."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    return row


def tiny_space(folder: Path, name: str, train_subset: int, epochs: int) -> Path:
    """A tiny cell space on synthetic data, written to ``folder/tiny.yaml``."""
    import yaml
    from conftest import TINY_CELL_SPACE

    tiny = {**TINY_CELL_SPACE, "name": name, "train_subset": train_subset}
    tiny["budget"] = {"epochs": epochs, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01}}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny), encoding="utf-8")
    return path


def test_summary_pairs_routes_by_seed(tmp_path: Path) -> None:
    per_trial, oneshot = tmp_path / "per_trial.jsonl", tmp_path / "oneshot.jsonl"
    per_trial.write_text(route("per_trial", 0, 0.82, 4000.0) + "\n" + route("per_trial", 1, 0.83, 5000.0) + "\n")
    oneshot.write_text(
        route("oneshot", 0, 0.825, 760.0, supernet_epochs=3)
        + "\n"
        + route("oneshot", 1, 0.82, 900.0, supernet_epochs=3)
        + "\n"
    )
    done = summarize_cli(per_trial, oneshot)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seed"] for r in rows] == [0, 1]
    first, second = rows
    assert first["cpu_ratio_ours_over_baseline"] == 0.19  # 760 / 4000
    assert first["reached_baseline_acc"] and first["meets_one_fifth"]
    assert second["cpu_ratio_ours_over_baseline"] == 0.18 and not second["reached_baseline_acc"]
    assert not second["meets_one_fifth"]


def test_summary_without_both_routes_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only = tmp_path / "per_trial.jsonl"
    only.write_text(route("per_trial", 0, 0.82, 4000.0) + "\n")
    message = refusal(capsys, "--oneshot", "--summarize", str(only))
    assert "no space and seed with both a per_trial and a oneshot or proxy line" in message


def test_summary_compares_mean_accuracy_over_the_same_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    per_trial, oneshot = tmp_path / "per_trial.jsonl", tmp_path / "oneshot.jsonl"
    # One retraining each says the one-shot network is worse; the mean of three says otherwise.
    per_trial.write_text(route("per_trial", 0, 0.84, 4000.0, eval_test_accs={"0": 0.84, "1": 0.82, "2": 0.83}) + "\n")
    oneshot.write_text(
        route("oneshot", 0, 0.83, 700.0, supernet_epochs=3, eval_test_accs={"0": 0.83, "1": 0.84, "2": 0.835}) + "\n"
    )
    (row,) = summarize(capsys, per_trial, oneshot)
    assert not row["reached_baseline_acc"] and not row["meets_one_fifth"]
    assert row["eval_seeds"] == [0, 1, 2]
    assert row["baseline_test_acc_mean"] == 0.83 and row["ours_test_acc_mean"] == 0.835
    assert row["reached_baseline_mean_acc"] and row["meets_one_fifth_by_mean"]


def test_summary_refuses_means_over_different_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    per_trial, oneshot = tmp_path / "per_trial.jsonl", tmp_path / "oneshot.jsonl"
    per_trial.write_text(route("per_trial", 0, 0.84, 4000.0, eval_test_accs={"0": 0.84, "1": 0.82}) + "\n")
    oneshot.write_text(
        route("oneshot", 0, 0.83, 700.0, supernet_epochs=3, eval_test_accs={"0": 0.83, "2": 0.84}) + "\n"
    )
    message = refusal(capsys, "--oneshot", "--summarize", str(per_trial), str(oneshot))
    assert "--eval-seeds differ between the routes: ['0', '1'] and ['0', '2']" in message


def test_summary_gives_each_routes_retraining_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    per_trial, oneshot = tmp_path / "per_trial.jsonl", tmp_path / "oneshot.jsonl"
    per_trial.write_text(route("per_trial", 0, 0.83, 3000.0, retrain_epochs=2) + "\n")
    oneshot.write_text(route("oneshot", 0, 0.84, 550.0, supernet_epochs=2, retrain_epochs=3) + "\n")
    (row,) = summarize(capsys, per_trial, oneshot)
    assert (row["baseline_retrain_epochs"], row["ours_retrain_epochs"]) == (2, 3)
    assert row["same_retrain_epochs"] is False
    oneshot.write_text(route("oneshot", 0, 0.84, 550.0, supernet_epochs=2, retrain_epochs=2) + "\n")
    (row,) = summarize(capsys, per_trial, oneshot)
    assert row["same_retrain_epochs"] is True


def test_rerank_retrains_the_best_of_the_top_by_short_training(tmp_path: Path) -> None:
    """--rerank-top K: the K best trials by supernet score each get a short training from
    scratch, and only the best of them by it is retrained."""
    from bnas.genotype import load_genotype
    from bnas.search.objective import search_data
    from bnas.search.space import load_space
    from bnas.search.supernet import supernet_recipe

    space_file = tiny_space(tmp_path, "tiny_rerank", train_subset=256, epochs=1)
    keep = tmp_path / "keep"
    flags = ["--oneshot", "--route", "oneshot", "--space", str(space_file), "--supernet-epochs", "1"]
    flags += ["--oneshot-trials", "5", "--rerank-top", "3", "--rerank-steps", "2", "--keep", str(keep)]
    row = route_line(flags)
    short, supernet = row["rerank_short_val_acc"], row["rerank_supernet_acc"]
    assert len(short) == 3 and short.keys() == supernet.keys()
    assert row["retrained"] == 1 and row["rerank_steps"] == 2 and row["rerank_cpu_s"] > 0
    # The retrained trial is the best by the short training (the better supernet score of equals).
    by_supernet = sorted(short, key=lambda n: (-supernet[n], int(n)))
    assert str(row["trial"]) == max(by_supernet, key=lambda n: short[n])
    # Each short-training score is the ranking benchmark's, recomputed here.
    ranking = load_benchmark("oneshot_ranking")
    space = load_space(space_file)
    data, recipe = search_data(space, 0), supernet_recipe(space)
    folder = keep / "seed0" / "oneshot"
    for number, acc in short.items():
        genotype = load_genotype(folder / "genotypes" / f"trial-{number}.yaml")
        assert ranking.short_training_score(genotype, data, recipe, 2, 0) == pytest.approx(acc, abs=1e-5)
    # Only the chosen trial was retrained.
    assert sorted(p.name for p in (folder / "retrain").iterdir()) == [f"trial-{row['trial']}"]
    assert row["retrain_from"] == "scratch"
    assert "init_from" not in json.loads((folder / "retrain" / f"trial-{row['trial']}" / "report.json").read_text())


def test_rerank_can_retrain_from_the_supernets_weights(tmp_path: Path) -> None:
    """--retrain-from supernet: the pick's retraining and its --eval-seeds retrainings start
    from the weights it inherits from the supernet."""
    space_file = tiny_space(tmp_path, "tiny_inherit", train_subset=256, epochs=1)
    keep = tmp_path / "keep"
    flags = ["--oneshot", "--route", "oneshot", "--space", str(space_file), "--supernet-epochs", "1"]
    flags += ["--oneshot-trials", "3", "--rerank-top", "2", "--rerank-steps", "2", "--keep", str(keep)]
    row = route_line([*flags, "--retrain-from", "supernet", "--eval-seeds", "1"])
    assert row["retrain_from"] == "supernet" and set(row["eval_test_accs"]) == {"0", "1"}
    folder = keep / "seed0"
    supernet = str(folder / "supernet" / "supernet.pt")
    for report in (folder / "oneshot" / "retrain" / f"trial-{row['trial']}", folder / "oneshot" / "eval" / "seed1"):
        assert json.loads((report / "report.json").read_text())["init_from"] == supernet


def test_summary_compares_the_proxy_route_with_the_per_trial_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    per_trial, proxy = tmp_path / "per_trial.jsonl", tmp_path / "proxy.jsonl"
    per_trial.write_text(route("per_trial", 0, 0.83, 4000.0, eval_test_accs={"0": 0.83, "1": 0.84}) + "\n")
    proxy.write_text(
        route("proxy", 0, 0.84, 500.0, proxy_subset=3200, proxy_epochs=1, eval_test_accs={"0": 0.84, "1": 0.82}) + "\n"
    )
    (row,) = summarize(capsys, per_trial, proxy)
    assert row["ours"] == "proxy" and (row["ours_proxy_subset"], row["ours_proxy_epochs"]) == (3200, 1)
    assert "ours_supernet_epochs" not in row
    assert row["cpu_ratio_ours_over_baseline"] == 0.125  # 500 / 4000
    assert row["meets_one_fifth"] and not row["meets_one_fifth_by_mean"]  # 0.84 once; 0.83 < 0.835 by the mean


def test_proxy_route_searches_on_the_subset_and_retrains_the_best_with_the_full_budget(tmp_path: Path) -> None:
    """--route proxy: every trial trains --proxy-epochs epochs on --proxy-subset images; the best
    trial's choices are retrained with the space's own budget and training set."""
    import optuna
    import torch
    import yaml

    from bnas.evaluate import evaluate
    from bnas.genotype import genotype_from_dict, load_genotype
    from bnas.search.objective import search_data
    from bnas.search.space import load_space

    space_file = tiny_space(tmp_path, "tiny_proxy", train_subset=512, epochs=2)
    tiny = yaml.safe_load(space_file.read_text(encoding="utf-8"))
    keep = tmp_path / "keep"
    flags = ["--oneshot", "--route", "proxy", "--space", str(space_file), "--trials", "4"]
    flags += ["--proxy-subset", "128", "--proxy-epochs", "1", "--retrain-top", "2", "--keep", str(keep)]
    row = route_line(flags)
    assert (row["route"], row["proxy_subset"], row["proxy_epochs"], row["retrain_epochs"]) == ("proxy", 128, 1, 2)
    folder = keep / "seed0" / "proxy"
    study = optuna.load_study(study_name="tiny_proxy", storage=f"sqlite:///{folder / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 2 and all(t.user_attrs["epochs"] == 1 for t in complete)
    # The two best by proxy score are retrained; the better of them by retrained validation is kept.
    top = sorted(complete, key=lambda t: (-t.values[0], t.number))[:2]
    assert row["proxy_val_acc"] == {str(t.number): t.values[0] for t in top}
    reports = {
        t.number: json.loads((folder / "retrain" / f"trial-{t.number}" / "report.json").read_text(encoding="utf-8"))
        for t in top
    }
    assert sorted(p.name for p in (folder / "retrain").iterdir()) == sorted(f"trial-{t.number}" for t in top)
    assert row["trial"] == max(reports, key=lambda n: (reports[n]["best_val_acc"], -n))
    best = next(t for t in top if t.number == row["trial"])
    # The trial's value is a 1-epoch training on the 128-image subset: repeated here.
    space = load_space(space_file)
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump({**tiny, "train_subset": 128}), encoding="utf-8")
    proxy_data = search_data(load_space(tmp_path / "proxy.yaml"), 0)
    assert len(proxy_data.train_y) == 128
    trial_genotype = load_genotype(folder / "genotypes" / f"trial-{best.number}.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = evaluate(trial_genotype, space.dataset, data=proxy_data, progress=False, overrides={"seed": 0})
        assert again["best_val_acc"] == pytest.approx(best.values[0], abs=1e-9)
        # The retraining: the same network with the space's 2-epoch budget on all 512 of its
        # training images, also repeated here.
        full = trial_genotype.to_dict()
        full["training"] = {**tiny["budget"], "seed": 0}
        retrained = evaluate(genotype_from_dict(full), space.dataset, data=search_data(space, 0), progress=False)
    finally:
        torch.set_num_threads(threads)
    report = reports[best.number]
    assert report["recipe"]["epochs"] == 2 and report["epochs_run"] == 2
    assert report["test_acc"] == row["retrained_test_acc"]
    assert retrained["best_val_acc"] == pytest.approx(row["retrained_val_acc"], abs=1e-9)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--retrain-top", "0"], "must be at least 1"),
        (["--route", "proxy", "--proxy-subset", "0"], "must be at least 1"),
        # fine-tuning from the supernet needs the one-shot route's rerank
        (
            ["--route", "oneshot", "--retrain-from", "supernet"],
            "--retrain-from supernet applies to the one-shot route with --rerank-top",
        ),
        (["--route", "per_trial", "--oneshot-min-ops", "1000"], "applies to the one-shot route"),
        (["--route", "oneshot", "--oneshot-min-ops", "0"], "--oneshot-min-ops must be positive"),
        # fashion_mnist_cells' max_ops is 369120: refused before its data is read
        (["--route", "oneshot", "--oneshot-min-ops", "4e5"], "is above the space's max_ops 369120"),
    ],
)
def test_bad_route_settings_are_refused_before_any_work(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in refusal(capsys, "--oneshot", *flags)


def test_oneshot_route_scores_by_angle(tmp_path: Path) -> None:
    """--supernet-score angle: the route's search scores its trials by ABS's angle, and the
    largest angle is the one retrained; --oneshot-sampler random draws every trial as
    bnas's per-trial-seeded random sampler does."""
    import optuna

    from bnas.search.space import load_space, sample_genotype
    from bnas.search.study import PerTrialSeeded

    space_file = tiny_space(tmp_path, "tiny_angle", train_subset=256, epochs=1)
    keep = tmp_path / "keep"
    flags = ["--oneshot", "--route", "oneshot", "--space", str(space_file), "--supernet-epochs", "1"]
    flags += ["--oneshot-trials", "12", "--retrain-top", "1", "--supernet-score", "angle"]
    flags += ["--oneshot-sampler", "random", "--keep", str(keep)]
    row = route_line(flags)
    assert row["supernet_score"] == "angle" and row["sampler"] == "random" and row["retrained"] == 1
    folder = keep / "seed0" / "oneshot"
    study = optuna.load_study(study_name="tiny_angle", storage=f"sqlite:///{folder / 'study.db'}")
    assert study.user_attrs["supernet"]["score"] == "angle"
    scored = [t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert scored and all(t.values == [t.user_attrs["supernet_angle"]] for t in scored)
    assert row["trial"] == max(scored, key=lambda t: (t.values[0], -t.number)).number
    # Past TPE's 10 random start-up trials, only the random sampler still draws these.
    space = load_space(space_file)
    again = optuna.create_study(sampler=PerTrialSeeded("random", 0))
    for kept in sorted(study.trials, key=lambda t: t.number):
        trial = again.ask()
        sample_genotype(trial, space)
        again.tell(trial, 0.0)
        assert trial.params == kept.params, kept.number
    assert len(study.trials) == 12


def test_angle_with_finetuning_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    message = refusal(capsys, "--oneshot", "--supernet-score", "angle", "--finetune-steps", "3")
    assert "--supernet-score angle reads none" in message


def test_oneshot_route_trains_an_entangled_supernet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--kernels entangled reaches the route's supernet: it is saved entangled, its 3x3
    kernels the centre of its 5x5 ones, and the route line and the summary say so."""
    import yaml

    from bnas.search.supernet_run import load_supernet

    space_file = tiny_space(tmp_path, "tiny_kernels", train_subset=256, epochs=1)
    raw = yaml.safe_load(space_file.read_text(encoding="utf-8"))
    raw["cells"]["ops"] = ["binary_conv_3x3", "binary_conv_5x5", "skip_connect"]
    space_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    keep = tmp_path / "keep"
    flags = ["--oneshot", "--route", "oneshot", "--space", str(space_file), "--supernet-epochs", "1"]
    flags += ["--oneshot-trials", "3", "--retrain-top", "1", "--kernels", "entangled", "--keep", str(keep)]
    row = route_line(flags)
    assert row["kernels"] == "entangled"
    supernet = load_supernet(keep / "seed0" / "supernet" / "supernet.pt")
    assert supernet.kernels == "entangled" and supernet._tied > 0
    weights = supernet.state_dict()
    threes = [k for k in weights if "/binary_conv_3x3/" in k and k.endswith("conv.weight")]
    assert threes and all(
        torch.equal(weights[k], weights[k.replace("binary_conv_3x3", "binary_conv_5x5")][:, :, 1:4, 1:4])
        for k in threes
    )
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps(row) + "\n", encoding="utf-8")
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text(route("per_trial", 0, 0.5, 1000.0, space=row["space"]) + "\n", encoding="utf-8")
    assert summarize(capsys, theirs, ours)[-1]["ours_kernels"] == "entangled"


def test_oneshot_route_with_a_floor_searches_and_trains_within_the_band(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--oneshot-min-ops: the route's search rejects genotypes under the floor before scoring
    them, and it retrains one above it (its supernet's feasible paths keep to the floor too:
    tests/test_path_sampling.py)."""
    import random

    import optuna

    from bnas.search.path_sampling import PathSampler
    from bnas.search.space import load_space
    from bnas.search.supernet import Supernet

    space_file = tiny_space(tmp_path, "tiny_floor", train_subset=256, epochs=1)
    paths, rng = PathSampler(Supernet(load_space(space_file))), random.Random(0)
    ops = sorted(paths.metrics(paths.supernet.sample_choices(rng))["ops"] for _ in range(30))
    floor = ops[len(ops) // 2]  # about half the space is under it
    assert ops[0] < floor
    keep = tmp_path / "keep"
    flags = ["--oneshot", "--route", "oneshot", "--space", str(space_file), "--supernet-epochs", "1"]
    flags += ["--oneshot-trials", "12", "--retrain-top", "1", "--paths", "feasible"]
    flags += ["--oneshot-min-ops", str(floor), "--keep", str(keep)]
    row = route_line(flags)
    assert row["min_ops"] == floor and row["paths"] == "feasible"
    folder = keep / "seed0" / "oneshot"
    study = optuna.load_study(study_name="tiny_floor", storage=f"sqlite:///{folder / 'study.db'}")
    assert study.user_attrs["constraints"]["min_ops"] == floor
    under = [t for t in study.trials if t.user_attrs["ops"] < floor]
    within = [t for t in study.trials if t.user_attrs["ops"] >= floor]
    assert under and within  # the search drew both, or the test would not see the floor at work
    assert all("< min_ops" in t.user_attrs.get("constraint", "") for t in under)
    assert all("constraint" not in t.user_attrs for t in within)
    assert study.trials[row["trial"]].user_attrs["ops"] >= floor
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps(row) + "\n", encoding="utf-8")
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text(route("per_trial", 0, 0.5, 1000.0, space=row["space"]) + "\n", encoding="utf-8")
    assert summarize(capsys, theirs, ours)[-1]["ours_min_ops"] == floor
