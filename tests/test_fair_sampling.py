"""``bnas supernet --sampling fair`` (FairNAS's strict fairness): per batch a group of paths
in which every choice takes each of its options equally often, trained in one optimiser step
whose gradients are the sum of the paths' own; runs resume bit-identically and remember the
mode; combinations that cannot train are refused."""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_space, write_space

from bnas.search import SupernetError
from bnas.search.objective import search_data
from bnas.search.path_sampling import PathSampler, check_sampling
from bnas.search.space import SearchSpace, load_space
from bnas.search.supernet import Supernet, supernet_recipe, supernet_step
from bnas.search.supernet_run import SUPERNET_FILE, load_supernet, train_supernet

OPS = ["binary_conv_3x3", "skip_connect", "max_pool_3x3", "binary_conv_5x5"]


def four_op_text() -> str:
    """The tiny digits space with four ops and two edges per node: op choices have the most
    options (4), inputs 2 or 3, widths and depths 2; 384 training images (3 batches)."""
    return tiny_space(ops=OPS, edges_per_node=2, train_subset=384)


def four_op_space(folder: Path) -> SearchSpace:
    return load_space(write_space(folder, four_op_text()))


def test_a_fair_group_gives_every_option_its_share(tmp_path: Path) -> None:
    supernet = Supernet(four_op_space(tmp_path))
    lists = supernet._lists
    assert max(len(options) for options in lists.values()) == len(OPS)
    groups = [supernet.fair_choices(random.Random(seed)) for seed in range(5)]
    for group in groups:
        assert len(group) == len(OPS)
        for key, options in lists.items():
            counts = collections.Counter(str(path[key]) for path in group)
            assert set(counts) <= {str(o) for o in options}, key
            if len(options) == len(OPS):  # an op choice: each op exactly once
                assert sorted(counts) == sorted(str(o) for o in options) and set(counts.values()) == {1}, key
            else:  # fewer options: as even as four paths allow
                assert max(counts.values()) - min(counts.get(str(o), 0) for o in options) <= 1, key
        # Every path is a genotype of the space the supernet can serve.
        for path in group:
            supernet.network(supernet.genotype(path))
    # Seeded: the same seed draws the same group, other seeds other orders.
    assert supernet.fair_choices(random.Random(0)) == groups[0]
    assert len({str(g) for g in groups}) == len(groups)


def test_a_fair_step_sums_the_paths_gradients_in_one_update(tmp_path: Path) -> None:
    space = four_op_space(tmp_path)
    torch.manual_seed(0)
    supernet = Supernet(space)
    recipe = supernet_recipe(space)
    group = supernet.fair_choices(random.Random(1))
    x, y = torch.randn(16, *space.input), torch.randint(0, 10, (16,))
    params = dict(supernet.named_parameters())
    # Each path's gradients on its own (BN in training mode uses batch statistics, so the
    # running statistics these passes move do not change any gradient).
    expected: dict[str, torch.Tensor] = {}
    for path in group:
        supernet.zero_grad(set_to_none=True)
        net = supernet.network(supernet.genotype(path))
        net.train()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        for name, p in params.items():
            if p.grad is not None:
                expected[name] = expected.get(name, torch.zeros_like(p)) + p.grad
    supernet.zero_grad(set_to_none=True)

    seen: list[dict[str, torch.Tensor]] = []

    class Recording(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            seen.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
            return super().step(closure)

    loss, hits = supernet_step(supernet, group, x, y, Recording(supernet.parameters(), lr=0.0), recipe)
    assert len(seen) == 1  # one update for the whole group
    assert seen[0].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(seen[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Each op appears once per edge in the group, so both ops with weights on the first cell's
    # first edge (present in every path) got their gradient in this one step.
    edge = "shared.s0%2Ep0/n0%2Ee0/"
    assert {name[len(edge) :].split("/")[0] for name in expected if name.startswith(edge)} == {
        "binary_conv_3x3",
        "binary_conv_5x5",
    }
    assert 0 <= hits <= len(group) * len(y) and loss > 0


def test_a_fair_epoch_trains_groups_and_counts_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnas.search.supernet as supernet_module

    space = four_op_space(tmp_path)
    steps: list[int] = []
    real_step = supernet_module.supernet_step

    def recording_step(supernet: Supernet, choices: Any, *args: Any, **kwargs: Any) -> Any:
        steps.append(len(choices) if isinstance(choices, list) else 1)
        return real_step(supernet, choices, *args, **kwargs)

    monkeypatch.setattr(supernet_module, "supernet_step", recording_step)
    trained = train_supernet(space, tmp_path / "run", epochs=1, sampling="fair", monitor=0)
    batches = len(search_data(space, 0).loader("train", 128, shuffle=True, seed=0))
    assert batches == 3 and len(steps) == batches and set(steps) == {len(OPS)}
    saved = torch.load(tmp_path / "run" / SUPERNET_FILE, weights_only=True)
    assert saved["sampling"] == "fair"
    assert load_supernet(tmp_path / "run" / SUPERNET_FILE).meta["sampling"] == "fair"
    assert trained.meta["sampling"] == "fair"


def test_a_fair_run_resumes_bit_identically_and_remembers_its_sampling(tmp_path: Path) -> None:
    space = four_op_space(tmp_path)
    train_supernet(space, tmp_path / "straight", epochs=2, sampling="fair", monitor=1)
    train_supernet(space, tmp_path / "split", epochs=1, sampling="fair", monitor=1)
    with pytest.raises(SupernetError, match="sampling 'fair', not 'uniform'.*--sampling"):
        train_supernet(space, tmp_path / "split", epochs=2, resume=True)
    train_supernet(space, tmp_path / "split", epochs=2, resume=True, sampling="fair", monitor=1)
    a = torch.load(tmp_path / "straight" / SUPERNET_FILE, weights_only=True)
    b = torch.load(tmp_path / "split" / SUPERNET_FILE, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # A uniform run differs from it (the mode is not ignored), and older files read as uniform.
    train_supernet(space, tmp_path / "uniform", epochs=2, monitor=1)
    c = torch.load(tmp_path / "uniform" / SUPERNET_FILE, weights_only=True)
    assert c["sampling"] == "uniform"
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    del c["sampling"]
    torch.save(c, tmp_path / "uniform" / SUPERNET_FILE)
    assert load_supernet(tmp_path / "uniform" / SUPERNET_FILE).meta["sampling"] == "uniform"


def test_uniform_sampling_is_unchanged_by_the_group_api(tmp_path: Path) -> None:
    supernet = Supernet(four_op_space(tmp_path))
    sampler, rng, uniform = PathSampler(supernet), random.Random(4), random.Random(4)
    assert [sampler(rng) for _ in range(6)] == [supernet.sample_choices(uniform) for _ in range(6)]
    assert [sampler.draw(rng) for _ in range(6)] == [supernet.sample_choices(uniform) for _ in range(6)]


def test_refusals(tmp_path: Path) -> None:
    space = four_op_space(tmp_path)
    with pytest.raises(SupernetError, match="sampling must be one of uniform, fair, got 'even'"):
        check_sampling("all", "even")
    with pytest.raises(SupernetError, match="use --paths all with --sampling fair"):
        PathSampler(Supernet(space), "feasible", sampling="fair")
    with pytest.raises(SupernetError, match="drop --distill or --sampling fair"):
        train_supernet(space, tmp_path / "run", epochs=1, sampling="fair", distill=True)
    assert not (tmp_path / "run").exists()  # refused before anything was made
    supernet = Supernet(space)
    recipe = supernet_recipe(space)
    optimizer = torch.optim.SGD(supernet.parameters(), lr=0.1)
    x, y = torch.randn(4, *space.input), torch.randint(0, 10, (4,))
    with pytest.raises(SupernetError, match="does not combine with a group of paths"):
        supernet_step(supernet, supernet.fair_choices(random.Random(0)), x, y, optimizer, recipe, distill=True)


def test_cli_sampling_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bnas.cli import main

    path = write_space(tmp_path, four_op_text())
    args = ["supernet", str(path), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet", "--monitor-paths", "0"]
    assert main([*args, "--sampling", "fair", "--paths", "feasible"]) == 2
    assert "use --paths all with --sampling fair" in capsys.readouterr().err
    assert main([*args, "--sampling", "fair"]) == 0
    assert torch.load(tmp_path / "run" / SUPERNET_FILE, weights_only=True)["sampling"] == "fair"
    assert main([*args, "--resume", "--epochs", "2"]) == 2  # uniform (the default) is refused
    assert "trained with sampling 'fair', not 'uniform'" in capsys.readouterr().err
