"""benchmarks/oneshot_ranking.py on a tiny space (synthetic 1x8x8 data, one-epoch budget):
the JSON lines, the rank correlations against scipy's, the stand-alone cache, and sampling."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_CELL_SPACE
from scipy.stats import kendalltau, rankdata, spearmanr

from bnas.search import Supernet
from bnas.search.objective import search_data
from bnas.search.space import load_space
from bnas.search.supernet import calibration_batches, path_angle, score, supernet_recipe
from bnas.search.supernet_run import initial_supernet, load_supernet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "oneshot_ranking.py"
TINY = {
    **TINY_CELL_SPACE,
    "name": "tiny_ranking",
    "train_subset": 256,  # a proxy task: seconds per training
    "budget": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01}},
}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("oneshot_ranking", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT_MODULE = load_script()


def write_space(folder: Path, **changes: Any) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}), encoding="utf-8")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )


def lines(proc: subprocess.CompletedProcess[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records and records[-1].get("summary") is True
    return records[:-1], records[-1]


def assert_reported(reported: float | None, expected: float) -> None:
    """A rank correlation the summary reports matches ``expected`` (scipy's), both undefined
    (null in the JSON, nan from scipy) when one side is constant."""
    if reported is None:
        assert expected != expected
    else:
        assert reported == pytest.approx(expected, abs=1e-4)


def main_lines(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The script's ``main`` run in this process (its thread setting undone)."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        SCRIPT_MODULE.main(list(args))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    return lines(subprocess.CompletedProcess([], 0, out, ""))


def test_ranking_run_then_rerun_from_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path)
    cache = tmp_path / "cache.json"
    common = ["--space", str(space), "--archs", "4", "--seed", "3", "--standalone-cache", str(cache)]
    archs, summary = lines(run(*common, "--supernet-epochs", "1", "--supernet-out", str(tmp_path / "sn")))
    assert len(archs) == 4 and summary["archs"] == 4
    assert len({a["hash"] for a in archs}) == 4
    assert [a["arch"] for a in archs] == [0, 1, 2, 3]
    assert not any(a["cached"] for a in archs) and summary["standalone_trained"] == 4
    assert all(0.0 <= a["standalone_val_acc"] <= 1.0 and 0.0 <= a["supernet_val_acc"] <= 1.0 for a in archs)
    assert all(a["standalone_cpu_s"] > 0 for a in archs)
    assert summary["supernet_epochs"] == 1 and summary["distill"] is False
    assert summary["calibration_batches"] == 8 and summary["supernet_train_cpu_s"] > 0
    standalone = [a["standalone_val_acc"] for a in archs]
    supernet = [a["supernet_val_acc"] for a in archs]
    tau, rho = kendalltau(standalone, supernet).statistic, spearmanr(standalone, supernet).statistic
    if summary["kendall_tau"] is None:  # a constant side: scipy's nan, printed as null
        assert tau != tau
    else:
        assert -1.0 <= summary["kendall_tau"] <= 1.0
        assert summary["kendall_tau"] == pytest.approx(tau, abs=1e-4)
    if summary["spearman_rho"] is None:
        assert rho != rho
    else:
        assert -1.0 <= summary["spearman_rho"] <= 1.0
        assert summary["spearman_rho"] == pytest.approx(rho, abs=1e-4)
    # Ranked by the inherited validation loss as well (lower loss ranks higher).
    by_loss = kendalltau(standalone, [-a["supernet_val_loss"] for a in archs]).statistic
    assert_reported(summary["kendall_tau_by_loss"], by_loss)
    assert all(a["supernet_val_loss"] > 0 for a in archs)
    # The cache holds every arch, keyed by hash, with the printed accuracies.
    stored = json.loads(cache.read_text())
    assert stored["seed"] == 3 and sorted(stored["archs"]) == sorted(a["hash"] for a in archs)
    assert [stored["archs"][a["hash"]]["val_acc"] for a in archs] == standalone

    # Rerun in this process (one import less), scoring with the saved supernet: nothing is
    # trained stand-alone, and the loaded supernet scores every arch exactly as the one
    # trained in the first run did.
    again, summary2 = main_lines(capsys, *common, "--supernet", str(tmp_path / "sn" / "supernet.pt"))
    assert all(a["cached"] for a in again) and summary2["standalone_trained"] == 0
    assert summary2["standalone_cpu_s"] < 0.5
    assert [a["hash"] for a in again] == [a["hash"] for a in archs]
    assert [a["standalone_val_acc"] for a in again] == standalone
    assert [a["supernet_val_acc"] for a in again] == supernet
    assert summary2["supernet_epochs"] == 1 and summary2["supernet_train_cpu_s"] == 0.0
    assert summary2["kendall_tau"] == summary["kendall_tau"]
    assert summary2["finetune_steps"] == 0

    # With --finetune-steps, each score is supernet.score after that many steps on a copy.
    tuned, summary3 = main_lines(
        capsys, *common, "--supernet", str(tmp_path / "sn" / "supernet.pt"), "--finetune-steps", "2"
    )
    assert summary3["finetune_steps"] == 2
    loaded_space = load_space(space)
    supernet_loaded = load_supernet(tmp_path / "sn" / "supernet.pt", loaded_space)
    data = search_data(loaded_space, 3)
    batches = calibration_batches(data, 8, 64, 3, "cpu")
    genotypes = {a["hash"]: a["genotype"] for a in SCRIPT_MODULE.sample_archs(loaded_space, 4, 3)}
    for arch in tuned:
        expected = score(supernet_loaded, genotypes[arch["hash"]], data, calibration=batches, seed=3, finetune_steps=2)
        assert arch["supernet_val_acc"] == expected

    # ABS's angle: each path's weights in the supernet against the untrained one of its seed,
    # the same from the supernet trained in the first run and from its file.
    initial = initial_supernet(loaded_space, 3)
    angles = [path_angle(supernet_loaded, initial, genotypes[a["hash"]]) for a in again]
    assert all(angle > 0 for angle in angles)
    assert [a["supernet_angle"] for a in again] == angles == [a["supernet_angle"] for a in archs]
    by_angle = kendalltau(standalone, angles).statistic
    assert_reported(summary2["kendall_tau_by_angle"], by_angle)

    # A cache made with another seed is refused, naming the flag.
    with pytest.raises(
        SCRIPT_MODULE.RankingError, match=r"--standalone-cache .*seed 3 \(asked: 'tiny_ranking', seed 4\)"
    ):
        main_lines(capsys, *common[:-4], "--seed", "4", "--standalone-cache", str(cache), "--standalone-only")


def test_sampling_matches_the_supernets_and_keeps_the_constraints(tmp_path: Path) -> None:
    script = SCRIPT_MODULE
    space = load_space(write_space(tmp_path))
    archs = script.sample_archs(space, 6, seed=5)
    # The same draws as Supernet.sample_choices from the same seeded rng, twins skipped.
    supernet, rng = Supernet(space), random.Random(5)
    expected: list[str] = []
    while len(expected) < 6:
        digest = supernet.genotype(supernet.sample_choices(rng)).canonical_hash()
        if digest not in expected:
            expected.append(digest)
    assert [a["hash"] for a in archs] == expected
    # With a bound between the smallest and the largest of those, only archs within it are kept.
    ops = sorted(a["metrics"]["ops"] for a in archs)
    bound = ops[len(ops) // 2]
    bounded = load_space(write_space(tmp_path, constraints={"max_ops": bound}))
    kept = script.sample_archs(bounded, 3, seed=5)
    assert all(a["metrics"]["ops"] <= bound for a in kept)
    within = [a["hash"] for a in archs if a["metrics"]["ops"] <= bound]
    assert len(within) >= 3 and [a["hash"] for a in kept] == within[:3]
    nothing = load_space(write_space(tmp_path, constraints={"max_ops": 1}))
    with pytest.raises(
        script.RankingError, match=r"--archs 2: only 0 distinct genotypes .* after 5 draws \(5 rejected: over budget"
    ):
        script.sample_archs(nothing, 2, seed=5, max_draws=5)


def test_train_seeds_rank_by_the_mean_and_compare_the_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path)
    cache = tmp_path / "cache.json"
    common = ["--space", str(space), "--archs", "4", "--seed", "3", "--standalone-cache", str(cache)]
    archs, summary = main_lines(capsys, *common, "--standalone-only", "--train-seeds", "3", "4")
    # One cache per training seed: the given file for --seed itself, a -train4 one beside it.
    first, second = json.loads(cache.read_text()), json.loads((tmp_path / "cache-train4.json").read_text())
    assert (first["seed"], first["train_seed"]) == (3, 3) and (second["seed"], second["train_seed"]) == (3, 4)
    assert summary["train_seeds"] == [3, 4] and summary["standalone_trained"] == 4
    accs3 = [first["archs"][a["hash"]]["val_acc"] for a in archs]
    accs4 = [second["archs"][a["hash"]]["val_acc"] for a in archs]
    assert accs3 != accs4  # another initialisation and batch order: other accuracies
    for arch, a3, a4 in zip(archs, accs3, accs4, strict=True):
        assert arch["standalone_val_accs"] == [a3, a4]
        assert arch["standalone_val_acc"] == pytest.approx((a3 + a4) / 2)
    tau = kendalltau(accs3, accs4).statistic
    assert_reported(summary["standalone_seed_tau"], tau)
    # The seed-3 cache is the one a single-seed run uses: nothing is trained again.
    again, summary2 = main_lines(capsys, *common, "--standalone-only")
    assert summary2["standalone_trained"] == 0 and "standalone_seed_tau" not in summary2
    assert [a["standalone_val_acc"] for a in again] == accs3
    # A cache trained with another seed is refused, naming both seeds.
    with pytest.raises(SCRIPT_MODULE.RankingError, match=r"trained with seed 4 \(asked: training seed 5\)"):
        SCRIPT_MODULE.load_cache(tmp_path / "cache-train4.json", load_space(space), 3, 5)


def test_mean_ranks_share_ties() -> None:
    assert SCRIPT_MODULE.mean_ranks([0.5, 0.2, 0.5, 0.9]) == [2.5, 1.0, 2.5, 4.0]
    assert SCRIPT_MODULE.mean_ranks([3.0, 3.0, 3.0]) == [2.0, 2.0, 2.0]
    assert SCRIPT_MODULE.mean_ranks([1.0]) == [1.0]


def test_an_ensemble_of_supernets_ranks_by_the_mean_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path)
    cache = tmp_path / "cache.json"
    common = ["--space", str(space), "--archs", "5", "--seed", "3", "--standalone-cache", str(cache)]
    # Two supernets trained apart (one path per step, and fair groups), each scored alone first.
    alone = []
    for name, extra in (("uniform", []), ("fair", ["--sampling", "fair"])):
        archs, summary = main_lines(
            capsys, *common, "--supernet-epochs", "1", "--supernet-out", str(tmp_path / name), *extra
        )
        alone.append((archs, summary))
    paths = [str(tmp_path / name / "supernet.pt") for name in ("uniform", "fair")]
    assert not [k for _, s in alone for k in s if "_and_" in k]  # one score: nothing to combine
    archs, summary = main_lines(capsys, *common, "--supernet", *paths, "--training-free")
    standalone = [a["standalone_val_acc"] for a in archs]
    accs = [[a["supernet_val_acc"] for a in run_archs] for run_archs, _ in alone]
    assert accs[0] != accs[1]  # two different supernets
    assert [a["supernet_val_accs"] for a in archs] == [list(pair) for pair in zip(*accs, strict=True)]
    assert [a["supernet_val_acc"] for a in archs] == pytest.approx([(x + y) / 2 for x, y in zip(*accs, strict=True)])
    # The mean rank, by hand: rank each supernet's accuracies (ties share), then average.
    ranks = [SCRIPT_MODULE.mean_ranks(run) for run in accs]
    mean_rank = [(x + y) / 2 for x, y in zip(*ranks, strict=True)]
    assert [a["supernet_mean_rank"] for a in archs] == mean_rank
    tau = kendalltau(standalone, mean_rank).statistic
    assert_reported(summary["kendall_tau"], tau)
    assert summary["per_supernet_kendall_tau"] == [s["kendall_tau"] for _, s in alone]
    # The angle too: each supernet's own, and the mean rank over them.
    angles = [[a["supernet_angle"] for a in run_archs] for run_archs, _ in alone]
    assert [a["supernet_angles"] for a in archs] == [list(pair) for pair in zip(*angles, strict=True)]
    angle_rank = [(x + y) / 2 for x, y in zip(*(SCRIPT_MODULE.mean_ranks(run) for run in angles), strict=True)]
    assert [a["supernet_mean_rank_by_angle"] for a in archs] == angle_rank
    by_angle = kendalltau(standalone, angle_rank).statistic
    assert_reported(summary["kendall_tau_by_angle"], by_angle)
    by_mean_acc = kendalltau(standalone, [a["supernet_val_acc"] for a in archs]).statistic
    assert_reported(summary["kendall_tau_by_mean_acc"], by_mean_acc)
    assert summary["supernet"] == paths and summary["sampling"] == ["uniform", "fair"]
    assert summary["supernet_epochs"] == 1
    # With --training-free beside it: the ensemble and the training-free score combined by
    # their mean rank, by hand.
    together = (rankdata(mean_rank) + rankdata([a["training_free_score"] for a in archs])) / 2
    assert_reported(summary["kendall_tau_supernet_and_training_free"], kendalltau(standalone, together).statistic)
    # A supernet trained with another seed (another validation split) is refused, naming it,
    # before anything is trained stand-alone.
    with pytest.raises(
        SCRIPT_MODULE.RankingError, match=r"--supernet .*uniform/supernet.pt: trained with seed 3 \(asked: --seed 4\)"
    ):
        main_lines(
            capsys, *common[:4], "--seed", "4", "--standalone-cache", str(tmp_path / "c4.json"), "--supernet", *paths
        )
    assert not (tmp_path / "c4.json").exists()


def test_parts_share_the_stand_alone_phase_and_its_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path)
    cache = tmp_path / "cache.json"
    common = ["--space", str(space), "--archs", "4", "--seed", "3", "--standalone-cache", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Two processes at once, on one cache file: each trains its half and loses none of the other's.
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *common, "--standalone-only", "--part", part],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for part in ("1/2", "2/2")
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    parts = [
        lines(subprocess.CompletedProcess([], p.returncode, out, err))
        for p, (out, err) in zip(procs, outputs, strict=True)
    ]
    assert [[a["arch"] for a in archs] for archs, _ in parts] == [[0, 2], [1, 3]]
    assert [s["part"] for _, s in parts] == ["1/2", "2/2"]
    assert all(s["archs"] == 2 and s["standalone_trained"] == 2 for _, s in parts)
    stored = json.loads(cache.read_text())
    printed = {a["hash"]: a["standalone_val_acc"] for archs, _ in parts for a in archs}
    assert {h: e["val_acc"] for h, e in stored["archs"].items()} == printed
    # The whole sample afterwards: everything from the cache, in sample order.
    whole, summary = main_lines(capsys, *common, "--standalone-only")
    assert summary["standalone_trained"] == 0 and summary["part"] is None
    assert [a["arch"] for a in whole] == [0, 1, 2, 3]
    assert [a["hash"] for a in whole] == [parts[i % 2][0][i // 2]["hash"] for i in range(4)]
    assert {a["hash"]: a["standalone_val_acc"] for a in whole} == printed


def test_saving_merges_into_the_cache_on_disk(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path))
    path = tmp_path / "cache.json"
    first, second = SCRIPT_MODULE.load_cache(path, space, 3), SCRIPT_MODULE.load_cache(path, space, 3)
    first["archs"]["a"] = {"val_acc": 0.5}
    second["archs"]["b"] = {"val_acc": 0.25}
    SCRIPT_MODULE.save_cache(path, first, space)
    merged = SCRIPT_MODULE.save_cache(path, second, space)  # loaded before "a" was saved
    assert merged["archs"] == {"a": {"val_acc": 0.5}, "b": {"val_acc": 0.25}}
    assert json.loads(path.read_text())["archs"] == merged["archs"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--part", "3/2", "--standalone-only"], r"'3/2': give K/N with 1 <= K <= N"),
        (["--part", "1-2", "--standalone-only"], r"'1-2': give K/N"),
        (["--part", "1/2", "--supernet", "x.pt"], r"--part applies to --standalone-only"),
        (["--part", "1/5", "--archs", "4", "--standalone-only"], r"--part 1/5: at most --archs \(4\) parts"),
        (["--short-training", "0", "--standalone-only"], r"--short-training must be at least 1 step"),
    ],
)
def test_part_flag_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        SCRIPT_MODULE.parse_args(flags)
    assert re.search(message, capsys.readouterr().err)


def test_sign_code_logdet_by_hand() -> None:
    codes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    # Agreement fractions: rows 0-1 agree at 3 of 4 positions, 0-2 at 1, 1-2 at none.
    # det [[1, .75, .25], [.75, 1, 0], [.25, 0, 1]] = 1 - .75 * .75 - .25 * .25 = 0.375.
    assert SCRIPT_MODULE.sign_code_logdet(codes) == pytest.approx(-0.980829, abs=1e-5)
    # Images the codes cannot tell apart score far lower than any that differ.
    twins = torch.tensor([[1, 0, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    assert SCRIPT_MODULE.sign_code_logdet(twins) < -10.0


def test_sign_codes_are_each_binarizing_layers_signs(tmp_path: Path) -> None:
    from bnas.binarize.layers import binary_layers
    from bnas.builder import build

    space = load_space(write_space(tmp_path))
    genotype = next(a["genotype"] for a in SCRIPT_MODULE.sample_archs(space, 6, seed=5) if "binary_conv_3x3" in str(a))
    torch.manual_seed(0)
    network = build(genotype).train()
    images = torch.randn(5, 1, 8, 8)
    layers = [layer for layer in binary_layers(network) if layer.binarizes_input]
    assert layers
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone())) for layer in layers
    ]
    codes = SCRIPT_MODULE.sign_codes(network, images)
    for hook in hooks:
        hook.remove()
    # The quantizers here take the plain sign: a code is 1 exactly where the layer's input is positive.
    expected = torch.cat([(x > 0).flatten(1).float() for x in seen], dim=1)
    assert torch.equal(codes, expected)
    # The full-precision twin binarizes nothing: a clear error, not an empty score.
    with pytest.raises(SCRIPT_MODULE.RankingError, match=r"--training-free: the network has no layer binarizing"):
        SCRIPT_MODULE.sign_codes(build(genotype, binarize=False), images)


def test_short_training_is_a_seeded_training_from_scratch(tmp_path: Path) -> None:
    from bnas.binarize.layers import clip_latent_weights
    from bnas.builder import build
    from bnas.train.loop import evaluate_accuracy
    from bnas.train.losses import task_loss
    from bnas.train.optimiser import make_optimizer

    space = load_space(write_space(tmp_path))
    data = search_data(space, 2)
    recipe = supernet_recipe(space)
    genotype = next(a["genotype"] for a in SCRIPT_MODULE.sample_archs(space, 6, seed=5) if "binary_conv_3x3" in str(a))

    def trained_by_hand(seed: int, steps: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        network = build(genotype).train()
        optimizer = make_optimizer(network, recipe)
        for step, (x, y) in enumerate(data.loader("train", recipe.batch_size, shuffle=True, seed=seed)):
            if step == steps:
                break
            loss = task_loss(network(x).float(), y, recipe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clip_latent_weights(network)
        return network

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    by_hand = trained_by_hand(7, 3)
    assert same(SCRIPT_MODULE.short_trained(genotype, data, recipe, 3, 7), by_hand)
    # Three steps really trained it, and on its own seed's batches.
    assert not same(by_hand, trained_by_hand(7, 0))
    assert not same(SCRIPT_MODULE.short_trained(genotype, data, recipe, 3, 8), trained_by_hand(8, 0))
    first, second = (
        evaluate_accuracy(net.eval(), data.loader("val", 512), "cpu")[0] for net in (by_hand, trained_by_hand(8, 3))
    )
    assert SCRIPT_MODULE.short_training_score(genotype, data, recipe, 3, 7, inits=1) == first
    assert SCRIPT_MODULE.short_training_score(genotype, data, recipe, 3, 7) == (first + second) / 2


def test_baselines_rank_by_ops_and_at_initialisation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path)
    common = ["--space", str(space), "--archs", "5", "--seed", "3", "--standalone-cache", str(tmp_path / "c.json")]
    archs, summary = main_lines(capsys, *common, "--standalone-only", "--training-free", "--short-training", "2")
    standalone = [a["standalone_val_acc"] for a in archs]
    loaded = load_space(space)
    sampled = {a["hash"]: a["genotype"] for a in SCRIPT_MODULE.sample_archs(loaded, 5, 3)}
    (images,) = calibration_batches(search_data(loaded, 3), 1, SCRIPT_MODULE.TRAINING_FREE_IMAGES, 3, "cpu")
    for arch in archs:
        assert arch["training_free_score"] == SCRIPT_MODULE.training_free_score(sampled[arch["hash"]], images, 3)
    for suffix, scores in (
        ("_by_ops", [a["ops"] for a in archs]),
        ("_training_free", [a["training_free_score"] for a in archs]),
        ("_short_training", [a["short_training_val_acc"] for a in archs]),
    ):
        tau = kendalltau(standalone, scores).statistic
        assert_reported(summary[f"kendall_tau{suffix}"], tau)
    assert summary["training_free_cpu_s"] > 0
    # The two scores combined by their mean rank, by hand (ties share their mean rank).
    free_rank = rankdata([a["training_free_score"] for a in archs])
    short_rank = rankdata([a["short_training_val_acc"] for a in archs])
    together = kendalltau(standalone, (free_rank + short_rank) / 2).statistic
    assert_reported(summary["kendall_tau_training_free_and_short_training"], together)
    assert not [k for k in summary if k.startswith("kendall_tau_supernet")]  # no supernet here
    assert summary["short_training_steps"] == 2 and summary["short_training_cpu_s"] > 0
    recipe = supernet_recipe(loaded)
    data = search_data(loaded, 3)
    for arch in archs[:2]:
        expected = SCRIPT_MODULE.short_training_score(sampled[arch["hash"]], data, recipe, 2, 3)
        assert arch["short_training_val_acc"] == expected
    # Without the flags only the OPs baseline, which costs nothing, is given.
    archs2, summary2 = main_lines(capsys, *common, "--standalone-only")
    assert "training_free_score" not in archs2[0] and "kendall_tau_training_free" not in summary2
    assert "short_training_val_acc" not in archs2[0] and "kendall_tau_short_training" not in summary2
    assert not [k for k in summary2 if "_and_" in k]
    assert summary2["kendall_tau_by_ops"] == summary["kendall_tau_by_ops"]
