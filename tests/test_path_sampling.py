"""``bnas supernet --paths`` (bnas.search.path_sampling): which paths a supernet trains.
``feasible`` keeps exactly the uniform draws that meet the space's cost bounds, counted as
``bnas search`` counts them; runs with it resume bit-identically and remember the mode."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_space, write_space

from bnas.search import SupernetError
from bnas.search.constraints import violations
from bnas.search.objective import _trial_metrics
from bnas.search.path_sampling import PathSampler
from bnas.search.space import SearchSpace, load_space
from bnas.search.supernet import Supernet
from bnas.search.supernet_run import SUPERNET_FILE, load_supernet, monitor_paths, train_supernet


def bounded_space(folder: Path) -> tuple[SearchSpace, float]:
    """The tiny space with ``max_ops`` at the median OPs of 40 uniform draws (so about half of
    the paths break it); returns the space and the bound."""
    text = tiny_space(ops=["binary_conv_3x3", "skip_connect", "max_pool_3x3"], edges_per_node=2)
    space = load_space(write_space(folder, text))
    supernet, rng = Supernet(space), random.Random(1)
    ops = [_trial_metrics(supernet.genotype(supernet.sample_choices(rng)), False)["ops"] for _ in range(40)]
    bound = statistics.median(ops)
    assert min(ops) < bound < max(ops)
    return replace(space, constraints={"max_ops": bound}), bound


def test_feasible_paths_are_the_uniform_draws_that_meet_the_bounds(tmp_path: Path) -> None:
    space, bound = bounded_space(tmp_path)
    supernet = Supernet(space)
    sampler = PathSampler(supernet, "feasible")
    rng = random.Random(7)
    kept = [sampler(rng) for _ in range(12)]
    # The same stream of uniform draws, filtered by the search's own count of a fresh build.
    uniform, expected = random.Random(7), []
    rejected = 0
    while len(expected) < 12:
        choices = supernet.sample_choices(uniform)
        metrics = _trial_metrics(supernet.genotype(choices), False)
        if violations(metrics, {"max_ops": bound}):
            rejected += 1
        else:
            expected.append(choices)
    assert kept == expected
    assert rejected > 0  # the bound did cut paths: the test would see a sampler that ignores it
    assert sampler.kept == 12 and sampler.draws == 12 + rejected
    for choices in kept:
        assert sampler.metrics(choices)["ops"] == _trial_metrics(supernet.genotype(choices), False)["ops"]


def test_a_floor_keeps_the_paths_at_or_above_it(tmp_path: Path) -> None:
    space, median = bounded_space(tmp_path)
    floored = replace(space, constraints={"min_ops": median})
    sampler, rng = PathSampler(Supernet(floored), "feasible"), random.Random(3)
    kept = [sampler(rng) for _ in range(8)]
    assert all(sampler.metrics(choices)["ops"] >= median for choices in kept)
    assert sampler.draws > sampler.kept == 8  # paths under the floor were drawn and dropped


def test_violations_name_each_broken_bound_in_its_direction() -> None:
    band = {"min_ops": 100.0, "max_ops": 200.0}
    assert violations({"ops": 50.0}, band) == ["50 ops < min_ops 100"]
    assert violations({"ops": 250.0}, band) == ["250 ops > max_ops 200"]
    assert violations({"ops": 100.0}, band) == [] and violations({"ops": 200.0}, band) == []  # bounds included


def test_all_paths_and_unbounded_spaces_draw_uniformly(tmp_path: Path) -> None:
    space, _ = bounded_space(tmp_path)
    for mode, s in (("all", space), ("feasible", replace(space, constraints={}))):
        supernet = Supernet(s)
        sampler, rng, uniform = PathSampler(supernet, mode), random.Random(3), random.Random(3)
        assert [sampler(rng) for _ in range(10)] == [supernet.sample_choices(uniform) for _ in range(10)]
    # A latency bound is not a cost bound: it is not applied while training.
    timed = replace(space, constraints={"max_latency_ms": 0.001})
    assert PathSampler(Supernet(timed), "feasible").bounds == {}


def test_refusals(tmp_path: Path) -> None:
    space, _ = bounded_space(tmp_path)
    supernet = Supernet(space)
    with pytest.raises(SupernetError, match="paths must be one of all, feasible, got 'some'"):
        PathSampler(supernet, "some")
    impossible = Supernet(replace(space, constraints={"max_ops": 1.0}))
    with pytest.raises(
        SupernetError,
        match=r"none of 5 paths drawn in a row from .*space\.yaml meets its constraints \(max_ops 1\);.*--paths all",
    ):
        PathSampler(impossible, "feasible", max_draws=5)(random.Random(0))


def test_feasible_run_resumes_bit_identically_and_remembers_its_paths(tmp_path: Path) -> None:
    space, bound = bounded_space(tmp_path)
    train_supernet(space, tmp_path / "straight", epochs=2, paths="feasible")
    train_supernet(space, tmp_path / "split", epochs=1, paths="feasible")
    with pytest.raises(SupernetError, match="paths 'feasible', not 'all'.*--paths"):
        train_supernet(space, tmp_path / "split", epochs=2, resume=True)
    train_supernet(space, tmp_path / "split", epochs=2, resume=True, paths="feasible")
    a = torch.load(tmp_path / "straight" / SUPERNET_FILE, weights_only=True)
    b = torch.load(tmp_path / "split" / SUPERNET_FILE, weights_only=True)
    assert a["paths"] == b["paths"] == "feasible"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert load_supernet(tmp_path / "split" / SUPERNET_FILE, space).meta["paths"] == "feasible"
    # Its monitor paths (after the largest) are feasible ones as well.
    supernet = Supernet(space)
    sampler = PathSampler(supernet, "feasible")
    for name, choices in monitor_paths(supernet, 3, 0, sampler)[1:]:
        assert _trial_metrics(supernet.genotype(choices), False)["ops"] <= bound, name


def test_feasible_training_steps_only_feasible_paths(tmp_path: Path) -> None:
    """Every path a ``feasible`` epoch trains meets the bound (seen through the step itself)."""
    import bnas.search.supernet as supernet_module

    space, bound = bounded_space(tmp_path)
    stepped: list[dict[str, object]] = []
    real_step = supernet_module.supernet_step

    def recording_step(supernet: Supernet, choices: dict[str, object], *args: object, **kwargs: object):
        stepped.append(dict(choices))
        return real_step(supernet, choices, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(supernet_module, "supernet_step", recording_step)
        supernet = train_supernet(space, None, epochs=1, paths="feasible", monitor=0)
    assert len(stepped) >= 5
    assert all(_trial_metrics(supernet.genotype(c), False)["ops"] <= bound for c in stepped)


def test_cli_paths_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bnas.cli import main

    _, bound = bounded_space(tmp_path)
    text = tiny_space(
        ops=["binary_conv_3x3", "skip_connect", "max_pool_3x3"], edges_per_node=2, constraints={"max_ops": bound}
    )
    path = write_space(tmp_path, text, name="bounded.yaml")
    args = ["supernet", str(path), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet", "--monitor-paths", "0"]
    assert main([*args, "--paths", "feasible"]) == 0
    assert torch.load(tmp_path / "run" / SUPERNET_FILE, weights_only=True)["paths"] == "feasible"
    assert main([*args, "--resume", "--epochs", "2"]) == 2  # --paths all (the default) is refused
    assert "trained with paths 'feasible', not 'all'" in capsys.readouterr().err
