"""The one-shot supernet (issue 14): weight sharing by key, sampling, single-path training,
extraction, BN recalibration and scoring, on tiny spaces (input 1x8x8)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnas
from bnas.binarize import binary_layers, clip_latent_weights
from bnas.binarize.layers import BinaryLayer
from bnas.builder import _build
from bnas.data import load_dataset
from bnas.genotype import genotype_from_dict
from bnas.search import Supernet, SupernetError, extract
from bnas.search.space import SearchSpace, load_space, parse_space
from bnas.search.supernet import (
    calibration_batches,
    make_supernet_optimizer,
    recalibrate_bn,
    score,
    supernet_recipe,
    supernet_step,
    train_supernet_epoch,
)
from bnas.train.loop import fit
from bnas.train.optimiser import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
OPS = ["binary_conv_3x3", "skip_connect", "max_pool_3x3"]


def tiny_space(ops: list[str] = OPS, reduce_cell: bool = False, **macro: Any) -> SearchSpace:
    """Two stages (widths 4/8 or 6/12, doubling), depths 1-2, two-node sum cells over ``ops``
    (three by default), with a reduction cell of their own if ``reduce_cell``."""
    cells: dict[str, Any] = {"ops": ops, "nodes": 2, "inputs": 2, "edges_per_node": 2, "combine": "sum"}
    if reduce_cell:
        cells["reduce_cell"] = True
    return parse_space(
        {
            "name": "tiny",
            "dataset": "synthetic",
            "input": [1, 8, 8],
            "num_classes": 4,
            "stem": [{"op": "conv_bn", "channels": 4, "kernel": 3}],
            "cells": cells,
            "macro": {"stages": 2, "channels": [4, 6], "cells_per_stage": [1, 2], **macro},
            "budget": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01}},
        }
    )


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return tiny_space()


@pytest.fixture
def supernet(space: SearchSpace) -> Supernet:
    torch.manual_seed(0)
    return Supernet(space)


def choices(supernet: Supernet, **changes: Any) -> dict[str, Any]:
    """The first choice everywhere, with ``changes`` (``stage0_cells=2`` sets ``stage0.cells``)."""
    base = {k: v[0] for k, v in supernet._lists.items()}
    base.update({k.replace("__", ".").replace("_", "."): v for k, v in changes.items()})
    return base


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-default BN statistics and affine weights, so copying them is visible."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, _BatchNorm):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
            if bn.affine:
                bn.weight.data.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
                bn.bias.data.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.1)


def without_widths(name: str) -> str:
    """A shared-table name less its widths (its last part): every width of one module."""
    return name.rsplit("/", 1)[0]


def path_names(supernet: Supernet, network: nn.Module) -> set[str]:
    """The shared-table names of the modules ``network`` is made of."""
    ids = {id(m) for m in network.modules()}
    return {name for name, m in supernet.shared.items() if id(m) in ids}


# --------------------------------------------------------------------------------------
# Sharing
# --------------------------------------------------------------------------------------
def test_edge_modules_counted_by_hand(supernet: Supernet) -> None:
    # Per width: stage 0 has positions 0 and 1 (depth 1 or 2), each 2 nodes x 2 slots x 3 ops
    # at stride 1 = 12. Stage 1 opens with the reduce cell: n0 reads only cell inputs
    # (stride 2: 2 slots x 3 ops = 6), n1 reads an input or n0 (both strides: 2 x 3 x 2 = 12);
    # its position 1 is a normal cell (12). Two widths: 2 x (24 + 18 + 12) = 108.
    edges = [k for k in supernet.shared if "/n0%2Ee" in k or "/n1%2Ee" in k]
    assert len(edges) == 108
    assert sum("/s2/" in k for k in edges) == 2 * (6 + 6)
    # One set per width choice (stage 1 doubles it: 4/8 or 6/12).
    assert sum("/4>4" in k for k in edges) == sum("/6>6" in k for k in edges) == 24
    assert sum("/8>8" in k for k in edges) == sum("/12>12" in k for k in edges) == 30


def test_shared_network_uses_the_supernets_tensors(supernet: Supernet) -> None:
    a = supernet.network(supernet.genotype(choices(supernet, normal__n1__e1__op="max_pool_3x3")))
    own = {id(p) for p in supernet.parameters()} | {id(b) for b in supernet.buffers()}
    assert {id(p) for p in a.parameters()} <= own
    assert {id(b) for b in a.buffers()} <= own
    assert sum(p.numel() for p in a.parameters()) > 0
    # Same op on the same edge slot at the same position: the same module, whatever the
    # rest of the cell; the stage-0 depth-2 network starts with the depth-1 network's cell.
    b = supernet.network(supernet.genotype(choices(supernet, stage0_cells=2)))
    assert a is not b
    assert a.body[0].edges["n0_0"] is b.body[0].edges["n0_0"]
    assert a.body[0].edges["n0_0"].__class__.__name__ != "Identity"
    assert a.body[0].edges["n1_1"] is not b.body[0].edges["n1_1"]  # max_pool vs binary_conv
    assert len(a.body) == 2 and len(b.body) == 3
    # Another width: nothing shared in the body (widths="separate", the default).
    c = supernet.network(supernet.genotype(choices(supernet, channels=6)))
    body_a = {id(p) for p in a.body.parameters()}
    assert body_a and not body_a & {id(p) for p in c.body.parameters()}
    assert not {p.untyped_storage().data_ptr() for p in a.body.parameters()} & {
        p.untyped_storage().data_ptr() for p in c.body.parameters()
    }
    assert supernet.num_params() == sum(p.numel() for p in supernet.parameters())
    # Cached by architecture.
    assert supernet.network(supernet.genotype(choices(supernet, stage0_cells=2))) is b


def test_sliced_widths_are_one_tensor(space: SearchSpace) -> None:
    torch.manual_seed(0)
    supernet = Supernet(space, widths="sliced")
    a = supernet.network(supernet.genotype(choices(supernet, normal__n1__e1__op="max_pool_3x3")))
    c = supernet.network(supernet.genotype(choices(supernet, channels=6, normal__n1__e1__op="max_pool_3x3")))
    body_a, body_c = dict(a.body.named_parameters()), dict(c.body.named_parameters())
    common = body_a.keys() & body_c.keys()  # the wider one also aligns its cell inputs to 6
    assert len(common) > 10 and not {id(p) for p in body_a.values()} & {id(p) for p in body_c.values()}
    for name in common:
        narrow, wide = body_a[name], body_c[name]
        assert narrow.untyped_storage().data_ptr() == wide.untyped_storage().data_ptr(), name
        assert torch.equal(narrow, wide[tuple(slice(0, n) for n in narrow.shape)]), name
    groups: dict[str, list[int]] = {}
    for name, module in supernet.shared.items():
        groups.setdefault(without_widths(name), []).append(sum(p.numel() for p in module.parameters()))
    # Each module less its widths is stored once, at its widest.
    assert supernet.num_params() == sum(max(sizes) for sizes in groups.values())
    assert supernet.num_params() < sum(p.numel() for p in supernet.parameters())
    narrow_name = next(k for k in supernet.shared if k.startswith("s0%2Ep0/n0%2Ee0/binary_conv") and k.endswith("/4>4"))
    wide_name = narrow_name[: -len("4>4")] + "6>6"
    narrow, wide = supernet.shared[narrow_name], supernet.shared[wide_name]
    # Moving or casting the supernet keeps the ties.
    supernet.to(torch.float64)
    (nw, narrow_w), (_, wide_w) = next(
        ((n, p), (n2, q))
        for (n, p), (n2, q) in zip(narrow.named_parameters(), wide.named_parameters(), strict=True)
        if p.dim() == 4
    )
    assert (
        narrow_w.dtype == torch.float64 and narrow_w.untyped_storage().data_ptr() == wide_w.untyped_storage().data_ptr()
    )
    supernet.to(torch.float32)
    # A step on the narrow path writes the wide weight's leading block, nothing else of it.
    before = wide_w.detach().clone()
    recipe = supernet_recipe(space)
    optimizer = make_supernet_optimizer(supernet, recipe)
    # The reduce cell reads the first cell (in1), so the first cell's edges get gradients.
    path = choices(supernet, channels=4, normal__n0__e0__op="binary_conv_3x3", reduce__n0__e0__input="in1")
    assert narrow in set(supernet.network(supernet.genotype(path)).modules())
    supernet_step(supernet, path, torch.randn(8, *space.input), torch.randint(0, 4, (8,)), optimizer, recipe)
    after = wide_w.detach()
    assert not torch.equal(before[:4, :4], after[:4, :4]), nw
    outside = torch.ones_like(after, dtype=torch.bool)
    outside[:4, :4] = False
    assert torch.equal(before[outside], after[outside])
    assert torch.equal(narrow_w.detach(), after[:4, :4])


def test_one_width_ties_nothing() -> None:
    # Cell-input alignments reading the stem or a cell differ in their last key part too;
    # they are not one module at two widths, so a one-width space keeps them apart.
    supernet = Supernet(tiny_space(channels=[6]), widths="sliced")  # the stem gives 4 channels, a cell 6
    assert supernet._width_groups() and supernet._tied == 0
    assert supernet.num_params() == sum(p.numel() for p in supernet.parameters())
    assert make_supernet_optimizer(supernet, supernet_recipe(supernet.space)).defaults["fused"]


def test_sampling_covers_the_space_and_needs_no_new_modules(supernet: Supernet, space: SearchSpace) -> None:
    names = list(supernet.state_dict())
    count = len(supernet.shared)
    rng = random.Random(1)
    ops: set[str] = set()
    depths: dict[str, set[int]] = {"stage0.cells": set(), "stage1.cells": set()}
    widths: set[int] = set()
    x = torch.randn(2, *space.input)
    for _ in range(300):
        picked = supernet.sample_choices(rng)
        ops |= {v for k, v in picked.items() if k.endswith(".op")}
        for k in depths:
            depths[k].add(picked[k])
        widths.add(picked["channels"])
        out = supernet.network(supernet.genotype(picked))(x)
        assert out.shape == (2, space.num_classes)
    assert ops == set(OPS)
    assert depths == {"stage0.cells": {1, 2}, "stage1.cells": {1, 2}}
    assert widths == {4, 6}
    assert len(supernet.shared) == count and list(supernet.state_dict()) == names
    # The table is the same for every supernet of the space: a state_dict loads into a new one.
    torch.manual_seed(5)
    other = Supernet(space)
    assert list(other.state_dict()) == names
    other.load_state_dict(supernet.state_dict())


def test_a_pass_through_provider_builds_the_same_network(supernet: Supernet) -> None:
    data = supernet.genotype(choices(supernet, stage0_cells=2, stage1_cells=2)).to_dict()
    for cell in data["cells"].values():
        cell["output"]["residual"] = True
    genotype = genotype_from_dict(data)
    keys: list[str] = []

    def provider(key: str, make: Any) -> nn.Module:
        keys.append(key)
        return make()

    torch.manual_seed(0)
    plain = bnas.build(genotype).state_dict()
    torch.manual_seed(0)
    provided = _build(genotype, provider=provider).state_dict()
    assert list(plain) == list(provided)
    assert all(torch.equal(plain[k], provided[k]) for k in plain)
    # stem 1 + head 2 + four cells of (2 inputs + 4 edges + 1 residual): 31 distinct keys.
    assert len(keys) == len(set(keys)) == 31
    assert [k for k in keys if "/residual/" in k] == [
        "s0.p0/residual/4x8x8>4x8x8",
        "s0.p1/residual/4x8x8>4x8x8",
        "s1.p0/residual/4x8x8>8x4x4",
        "s1.p1/residual/8x4x4>8x4x4",
    ]


def test_unknown_widths_mode_is_refused(space: SearchSpace) -> None:
    with pytest.raises(SupernetError, match=r"widths must be one of separate, sliced, got 'shared'"):
        Supernet(space, widths="shared")


def test_genotype_outside_the_space_is_refused(supernet: Supernet) -> None:
    genotype = supernet.genotype(choices(supernet))
    data = genotype.to_dict()
    data["body"][0]["channels"] = 5
    with pytest.raises(SupernetError, match=r"not among the space's choices"):
        supernet.network(bnas.genotype.genotype_from_dict(data))


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------
def test_extract_matches_build_and_shared_network(supernet: Supernet, space: SearchSpace) -> None:
    randomise_bn(supernet)
    genotype = supernet.sample(random.Random(3))
    shared = supernet.network(genotype).eval()
    extracted = extract(supernet, genotype).eval()
    scratch = bnas.build(genotype).eval()
    x = torch.randn(5, *space.input)
    with torch.no_grad():
        before = scratch(x)
        scratch.load_state_dict(shared.state_dict())
        out = extracted(x)
        assert not torch.allclose(before, out)  # the inherited weights matter
        assert torch.equal(out, scratch(x))
        assert torch.equal(out, shared(x))
    # Independent copies: changing the extracted network leaves the supernet alone.
    ext_ids = {id(p) for p in extracted.parameters()}
    assert not ext_ids & {id(p) for p in supernet.parameters()}
    assert sum(p.numel() for p in extracted.parameters()) == sum(p.numel() for p in shared.parameters())


# --------------------------------------------------------------------------------------
# BN recalibration and scoring
# --------------------------------------------------------------------------------------
def test_recalibrate_bn_touches_only_bn_statistics(supernet: Supernet, space: SearchSpace) -> None:
    randomise_bn(supernet)
    net = supernet.network(supernet.sample(random.Random(4)))
    net.train()
    net.body[0].eval()  # a mixed mode, to be restored exactly
    modes = {m: m.training for m in net.modules()}
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    before = snapshot(supernet)
    batches = [torch.randn(16, *space.input) for _ in range(3)]
    assert recalibrate_bn(net, [(x, torch.zeros(16)) for x in batches]) == 3
    after = supernet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.rsplit(".", 1)[1] in stats for k in changed)
    assert all(int(bn.num_batches_tracked) == 3 for bn in bns)
    assert {m: m.training for m in net.modules()} == modes
    assert [bn.momentum for bn in bns] == momenta
    # A cumulative average: the first BN's mean is the mean of its three batch means.
    first = net.stem[0]
    bn0 = next(m for m in first.modules() if isinstance(m, _BatchNorm))
    conv = next(m for m in first.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        means = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in batches])
    assert torch.allclose(bn0.running_mean, means.mean(0), atol=1e-5)


def test_score_leaves_the_supernet_unchanged(supernet: Supernet) -> None:
    data = load_dataset("synthetic", val_fraction=0.25, seed=0, shape=(1, 8, 8), num_classes=4)
    randomise_bn(supernet)
    before = snapshot(supernet)
    genotype = supernet.sample(random.Random(6))
    acc = score(supernet, genotype, data, num_batches=2, batch_size=32)
    assert 0.0 <= acc <= 1.0
    after = supernet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The same score on an extracted copy recalibrated on the same batches.
    batches = calibration_batches(data, 2, 32, seed=0)
    copy = extract(supernet, genotype)
    recalibrate_bn(copy, batches)
    acc_copy, _ = bnas.train.evaluate_accuracy(copy, data.loader("val", 512), "cpu")
    assert acc == pytest.approx(acc_copy, abs=1e-9)


def test_finetuned_score_trains_a_copy_for_the_given_steps(supernet: Supernet, space: SearchSpace) -> None:
    data = load_dataset("synthetic", val_fraction=0.25, seed=0, shape=(1, 8, 8), num_classes=4)
    before = snapshot(supernet)
    genotype = supernet.sample(random.Random(6))
    recipe = supernet_recipe(space)
    tuned = score(supernet, genotype, data, num_batches=2, batch_size=32, seed=5, finetune_steps=3, with_loss=True)
    assert all(torch.equal(before[k], v) for k, v in supernet.state_dict().items())  # the supernet is untouched
    # The same as fine-tuning an extracted copy by hand: the recipe's optimiser on the first 3
    # training batches shuffled with the seed, latent weights clipped, then recalibrated.
    copy = extract(supernet, genotype)
    optimizer = make_optimizer(copy, recipe)
    copy.train()
    for x, y in itertools.islice(data.loader("train", recipe.batch_size, shuffle=True, seed=5), 3):
        loss = torch.nn.functional.cross_entropy(copy(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clip_latent_weights(copy)
    recalibrate_bn(copy, calibration_batches(data, 2, 32, seed=5))
    by_hand = bnas.train.evaluate_accuracy(copy, data.loader("val", 512), "cpu")
    assert tuned[0] == pytest.approx(by_hand[0], abs=1e-9)
    assert tuned[1] == pytest.approx(by_hand[1], rel=1e-4)
    # Repeatable whatever torch's RNG holds, and different from the untuned score's loss.
    torch.manual_seed(123)
    again = score(supernet, genotype, data, num_batches=2, batch_size=32, seed=5, finetune_steps=3, with_loss=True)
    assert again == tuned
    plain = score(supernet, genotype, data, num_batches=2, batch_size=32, seed=5, with_loss=True)
    assert plain[1] != tuned[1]
    # Zero steps is the plain score.
    assert score(supernet, genotype, data, num_batches=2, batch_size=32, seed=5, finetune_steps=0) == plain[0]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def test_step_changes_only_the_sampled_path(supernet: Supernet, space: SearchSpace) -> None:
    recipe = supernet_recipe(space, {"optimizer.weight_decay": 0.01})
    optimizer = make_supernet_optimizer(supernet, recipe)
    x, y = torch.randn(8, *space.input), torch.randint(0, 4, (8,))
    # A first step on another path, so Adam holds moments for modules the next path skips.
    supernet_step(supernet, choices(supernet, channels=6, stage0_cells=2), x, y, optimizer, recipe)
    path = choices(supernet, stage1_cells=2, normal__n1__e0__op="skip_connect")
    net = supernet.network(supernet.genotype(path))
    layers = list(binary_layers(net))
    assert layers
    for layer in layers:  # a clip value H the step must enforce on the path
        layer.latent_clip_value = 0.01
    layers[0].weight.data[(0,) * layers[0].weight.dim()] = 5.0
    before = snapshot(supernet)
    supernet_step(supernet, path, x, y, optimizer, recipe)
    after = supernet.state_dict()
    on_path = path_names(supernet, net)
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= on_path
    assert all(name.startswith(("stem", "head", "s0%2Ep0", "s1%2Ep0", "s1%2Ep1")) for name in changed)
    for layer in layers:
        assert layer.weight.abs().max() <= 0.01


def test_step_with_inplace_distillation_trains_the_largest_path(supernet: Supernet, space: SearchSpace) -> None:
    recipe = supernet_recipe(space)
    optimizer = make_supernet_optimizer(supernet, recipe)
    small = choices(supernet)
    largest = supernet.largest_choices(small)
    assert largest["channels"] == 6 and largest["stage0.cells"] == 2 and largest["stage1.cells"] == 2
    big = supernet.network(supernet.genotype(largest))
    before = snapshot(supernet)
    x, y = torch.randn(8, *space.input), torch.randint(0, 4, (8,))
    supernet_step(supernet, small, x, y, optimizer, recipe, distill=True)
    after = supernet.state_dict()
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed & path_names(supernet, big) - path_names(supernet, supernet.network(supernet.genotype(small)))


def test_a_supernet_trained_on_one_path_trains_it_as_the_trainer_does(supernet: Supernet, space: SearchSpace) -> None:
    """Sampling the same path for every batch is stand-alone training: from the same initial
    weights, two epochs of the supernet's trainer and of ``bnas.train.fit`` (same recipe,
    batches, learning-rate schedule, clipping) end bit for bit alike. So what weight sharing
    does to a path's score comes from the sharing, not from the supernet's training loop."""
    path = choices(supernet, stage0_cells=2)
    genotype = supernet.genotype(path)
    initial = {k: v.clone() for k, v in extract(supernet, genotype).state_dict().items()}
    data = load_dataset("synthetic", val_fraction=0.25, seed=0, shape=(1, 8, 8), num_classes=4)
    recipe = supernet_recipe(space, {"epochs": 2})
    optimizer = make_supernet_optimizer(supernet, recipe)
    for epoch in range(recipe.epochs):
        train_supernet_epoch(supernet, data, optimizer, recipe, random.Random(0), epoch, sample=lambda rng: path)
    alone = bnas.build(genotype)
    alone.load_state_dict(initial)
    fit(alone, data, recipe, progress=False)
    shared, trained = extract(supernet, genotype).state_dict(), alone.state_dict()
    binary_weights = [f"{name}.weight" for name, m in alone.named_modules() if isinstance(m, BinaryLayer)]
    # Trained: every binary conv moved but those of body.1, whose output no later cell reads
    # on this path (every edge picks the first input, k-2).
    moved = {k.split(".")[1] for k in binary_weights if not torch.equal(trained[k], initial[k])}
    assert moved == {k.split(".")[1] for k in binary_weights} - {"1"}
    assert shared.keys() == trained.keys()
    assert [k for k in shared if not torch.equal(shared[k], trained[k])] == []


def test_training_improves_sampled_paths_on_digits() -> None:
    """Uniform single-path training lifts the mean inherited accuracy of sampled paths.

    The quickstart budget (4 epochs of 17 steps) is far too short for weight sharing over its
    seven ops: each op module of an edge sees a seventh of the steps, and zero and max_pool
    edges slow the shared weights most. Five epochs of batch 32 at lr 0.02 (170 steps, a few
    seconds) took the mean of these six paths from 0.086 to 0.191; seeds 1-3 of this setup
    gained 0.06 to 0.12, hence the margin of 0.04.
    """
    torch.manual_seed(0)
    space = load_space(ROOT / "search_spaces" / "quickstart.yaml")
    data = load_dataset("digits", val_fraction=0.25, seed=0)
    supernet = Supernet(space)
    recipe = supernet_recipe(space, {"epochs": 5, "batch_size": 32, "optimizer.lr": 0.02})
    paths = [supernet.sample(random.Random(100 + i)) for i in range(6)]
    batches = calibration_batches(data, 4, 64, seed=0)

    def mean_score() -> float:
        return sum(score(supernet, g, data, calibration=batches) for g in paths) / len(paths)

    untrained = mean_score()
    optimizer = make_supernet_optimizer(supernet, recipe)
    rng = random.Random(0)
    for epoch in range(recipe.epochs):
        stats = train_supernet_epoch(supernet, data, optimizer, recipe, rng, epoch)
        assert stats.steps == 34 and stats.samples == 1078  # 1,437 training images less 25 % validation
    trained = mean_score()
    assert untrained < 0.15  # ten classes: chance
    assert trained > untrained + 0.04


def kernel_space() -> SearchSpace:
    """``tiny_space`` with 3x3, 5x5 and Bi-Real conv ops (a stride-2 Bi-Real also holds 1x1
    shortcut projections) beside a skip, and a reduction cell."""
    return tiny_space(ops=["binary_conv_3x3", "binary_conv_5x5", "bireal_block", "skip_connect"], reduce_cell=True)


def conv_kernel(module: nn.Module) -> nn.Parameter:
    return module.conv.weight  # type: ignore[union-attr,return-value]


def test_entangled_kernels_are_the_centre_of_the_largest() -> None:
    space = kernel_space()
    torch.manual_seed(0)
    separate = Supernet(space)
    torch.manual_seed(0)
    entangled = Supernet(space, kernels="entangled")
    places = {
        name.rsplit("/", 3)[0] + "|" + "/".join(name.rsplit("/", 2)[1:])
        for name in entangled.shared
        if "/bireal_block/" in name
    }
    assert len(places) >= 8
    tied = 0
    for place in places:
        where, rest = place.split("|")
        five = conv_kernel(entangled.shared[f"{where}/binary_conv_5x5/{rest}"])
        for op in ("binary_conv_3x3", "bireal_block"):
            three = conv_kernel(entangled.shared[f"{where}/{op}/{rest}"])
            assert three.shape[2:] == (3, 3) and five.shape[2:] == (5, 5)
            assert three.untyped_storage().data_ptr() == five.untyped_storage().data_ptr(), (place, op)
            assert torch.equal(three, five[:, :, 1:4, 1:4]), (place, op)
            tied += 1
        bireal = entangled.shared[f"{where}/bireal_block/{rest}"]
        for name, tensor in bireal.named_parameters():
            if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):  # a stride-2 shortcut's projections
                assert tensor.untyped_storage().data_ptr() != five.untyped_storage().data_ptr(), name
    assert entangled._tied == tied and separate._tied == 0
    # Each tied 3x3 kernel is stored once, inside its 5x5; the rest is as in the separate supernet.
    threes = sum(
        conv_kernel(m).numel() for n, m in separate.shared.items() if "/binary_conv_3x3/" in n or "/bireal_block/" in n
    )
    assert entangled.num_params() == separate.num_params() - threes
    # The same initial values except the tied kernels; a state_dict of one loads into the other.
    assert entangled.state_dict().keys() == separate.state_dict().keys()
    separate.load_state_dict(entangled.state_dict())


def test_a_step_on_a_3x3_path_trains_the_5x5_centre_only() -> None:
    space = kernel_space()
    torch.manual_seed(0)
    supernet = Supernet(space, kernels="entangled")
    supernet.to(torch.float64).to(torch.float32)  # moving or casting keeps the ties
    path = {k: v[0] for k, v in supernet._lists.items()}
    path.update({"normal.n0.e0.op": "binary_conv_3x3", "reduce.n0.e0.input": "in1"})
    network = supernet.network(supernet.genotype(path))
    three_name = next(
        n
        for n, m in supernet.shared.items()
        if n.startswith("s0%2Ep0/n0%2Ee0/binary_conv_3x3/") and m in set(network.modules())
    )
    five = conv_kernel(supernet.shared[three_name.replace("binary_conv_3x3", "binary_conv_5x5")])
    three = conv_kernel(supernet.shared[three_name])
    assert three.untyped_storage().data_ptr() == five.untyped_storage().data_ptr()
    before = five.detach().clone()
    recipe = supernet_recipe(space)
    optimizer = make_supernet_optimizer(supernet, recipe)
    assert not optimizer.defaults["fused"]  # strided views
    x, y = torch.randn(8, *space.input), torch.randint(0, 4, (8,))
    supernet_step(supernet, path, x, y, optimizer, recipe)
    after = five.detach()
    assert not torch.equal(before[:, :, 1:4, 1:4], after[:, :, 1:4, 1:4])
    border = torch.ones_like(after, dtype=torch.bool)
    border[:, :, 1:4, 1:4] = False
    assert torch.equal(before[border], after[border])
    assert torch.equal(three.detach(), after[:, :, 1:4, 1:4])


def test_entangled_kernels_with_sliced_widths_share_one_tensor() -> None:
    torch.manual_seed(0)
    supernet = Supernet(kernel_space(), widths="sliced", kernels="entangled")
    narrow = conv_kernel(supernet.shared["s0%2Ep0/n0%2Ee0/binary_conv_3x3/s1/4>4"])
    wide_five = conv_kernel(supernet.shared["s0%2Ep0/n0%2Ee0/binary_conv_5x5/s1/6>6"])
    assert narrow.untyped_storage().data_ptr() == wide_five.untyped_storage().data_ptr()
    assert torch.equal(narrow, wide_five[:4, :4, 1:4, 1:4])


def test_unknown_kernels_mode_is_refused(space: SearchSpace) -> None:
    with pytest.raises(SupernetError, match=r"kernels must be one of separate, entangled, got 'shared'"):
        Supernet(space, kernels="shared")
