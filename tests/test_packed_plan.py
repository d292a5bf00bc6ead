"""The fused execution plan of packed networks (bnas.export.plan): residual adds in the binary
conv's epilogue, packed outputs chained between binary layers, channels_last glue."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
from conftest import randomize
from torch import nn

import bnas
from bnas import kernels
from bnas.binarize import BinarizeConfig, BinaryConv2d
from bnas.export import PackedNetwork, load_packed, pack_model
from bnas.export.plan import ChannelsLastMaxPool2d, PackedStep
from bnas.kernels import cpu_backend

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

ROOT = Path(__file__).resolve().parents[1]
GENOTYPES = ROOT / "search_spaces" / "genotypes"
SHIPPED = sorted(p.stem for p in GENOTYPES.glob("*.yaml") if p.stem != "bireal_resnet18_imagenet")
# its cell inputs pad odd-sized maps: Python control flow on a shape, which torch.fx cannot trace
UNTRACEABLE = {"kim2020_bnas_a"}


def packed_of(name: str, seed: int = 0) -> tuple[nn.Module, PackedNetwork, torch.Tensor]:
    genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    torch.manual_seed(seed)
    model = randomize(bnas.build(genotype), seed=seed)
    return model, pack_model(model), torch.randn(2, *genotype.input)


def _shortcuts_on_pytorch() -> AbstractContextManager[object]:
    """A CPU backend other than cpu-avx512: the plan's 1x1 float convs then run PyTorch's ops."""
    others = [b for b in ("cpu-avx2", "cpu-popcnt") if b in cpu_backend.supported_backends()]
    return kernels.use_backend(others[0]) if others else nullcontext()


def steps_of(packed: PackedNetwork) -> list[PackedStep]:
    plan = packed.plan()
    assert plan is not None
    return [m for m in plan.modules() if isinstance(m, PackedStep)]


@pytest.mark.parametrize("name", SHIPPED)
def test_plan_predicts_like_the_module_tree_on_every_shipped_genotype(name: str) -> None:
    model, packed, x = packed_of(name)
    with torch.no_grad():
        tree = packed.net(x)
        fused = packed(x)
        # channels_last input gives PyTorch's float convs the plan's summation order: then,
        # with the shortcuts on PyTorch's ops, every value is the same, bit for bit (the fused
        # epilogue rounds as the separate add did)
        tree_cl = packed.net(x.contiguous(memory_format=torch.channels_last)) if x.dim() == 4 else tree
    assert (packed.plan() is None) == (name in UNTRACEABLE)
    # 1x1 float convs run on bnas's kernel on AVX-512 CPUs, in a summation order of its own
    torch.testing.assert_close(fused, tree_cl, rtol=1e-5, atol=1e-5 * tree_cl.abs().max().item())
    with _shortcuts_on_pytorch(), torch.no_grad():
        assert torch.equal(packed(x), tree_cl)
    assert torch.equal(fused.argmax(1), tree.argmax(1))
    torch.testing.assert_close(fused, tree, rtol=1e-4, atol=1e-4 * tree.abs().max().item())


def test_bireal_units_become_one_step_each_with_chained_packed_outputs() -> None:
    _, packed, x = packed_of("bireal_resnet18")
    steps = steps_of(packed)
    assert len(steps) == 16  # one per binary conv: no separate add, no separate packing
    assert all(s.residual for s in steps)  # every Bi-Real unit's shortcut add is in the epilogue
    # only the first unit packs its own input (the stem is a float conv); the others read
    # the packed signs their predecessor wrote in the same pass as its float output
    assert [s.packed_input for s in steps] == [False] + [True] * 15
    assert all(s.pack_output and s.float_output for s in steps[:15])
    assert not steps[15].pack_output and steps[15].float_output  # feeds the average pool
    code = packed.plan().code  # type: ignore[union-attr]
    assert "add" not in code.replace("residual", "")  # no float add survives
    assert "Identity" not in code and ".bn" not in code  # folded BNs are gone from the program


def test_threshold_convs_read_signs_packed_against_their_threshold_and_grouped_convs_pack_their_own() -> None:
    """rsign (a per-channel threshold before the sign) reads the producer's output packed
    against its threshold; a grouped conv reads float input (the producer's packed words are
    not grouped)."""
    genotype = {
        "name": "mixed",
        "input": [3, 10, 10],
        "num_classes": 4,
        "stem": [{"op": "conv_bn", "channels": 64}],
        "body": [
            {"op": "bireal_block", "channels": 64},
            {"op": "bireal_block", "channels": 64, "binarize": {"activation": "rsign", "weight": "xnor"}},
            {
                "op": "conv_unit",
                "channels": 64,
                "order": "conv_bn_act",
                "shortcut": True,
                "groups": 2,
                "binarize": {"activation": "ste", "weight": "sign"},
            },
        ],
        "head": [{"op": "global_avgpool"}, {"op": "linear"}],
    }
    torch.manual_seed(0)
    model = randomize(bnas.build(bnas.genotype.genotype_from_dict(genotype)), seed=1)
    packed = pack_model(model)
    x = torch.randn(3, 3, 10, 10)
    with _shortcuts_on_pytorch(), torch.no_grad():
        assert torch.equal(packed(x), packed.net(x.contiguous(memory_format=torch.channels_last)))
    steps = steps_of(packed)
    threshold = steps[1].conv.threshold
    assert threshold is not None and bool((threshold != 0).all()) and steps[2].conv.groups == 2
    assert [s.packed_input for s in steps] == [False, True, False]
    assert [s.pack_output for s in steps] == [True, False, False]
    assert steps[0].pack_threshold is threshold and steps[0].float_output  # the shortcut reads it too
    with torch.no_grad():  # read at every call: a changed threshold changes the bits
        threshold.add_(0.5)
    with _shortcuts_on_pytorch(), torch.no_grad():
        assert torch.equal(packed(x), packed.net(x.contiguous(memory_format=torch.channels_last)))


class Untraceable(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def test_untraceable_network_runs_as_its_module_tree() -> None:
    packed = PackedNetwork(Untraceable(), None, [])
    assert packed.plan() is None
    x = torch.ones(2, 4)
    torch.testing.assert_close(packed(x), packed.net.lin(x))
    torch.testing.assert_close(packed(-x), -packed.net.lin(-x))


def test_fused_off_runs_the_module_tree_and_the_plan_is_not_saved(tmp_path: Path) -> None:
    _, packed, x = packed_of("bireal_resnet18", seed=2)
    fused = packed(x)
    packed.fused = False
    with torch.no_grad():
        assert torch.equal(packed(x), packed.net(x))
    packed.fused = True
    keys = set(packed.state_dict())
    assert not any("_plan" in k for k in keys)  # the plan is not a child module
    loaded = load_packed(packed.save(tmp_path / "m.bnas"))
    assert set(loaded.state_dict()) == keys
    assert torch.equal(loaded(x), fused)


def test_plan_sees_weights_loaded_after_it_was_built() -> None:
    """The plan shares the network's modules: a state_dict loaded later is what it runs,
    whether copied into the buffers or replacing them (each step's bound kernel call is
    made again when its conv's buffers are other tensors)."""
    _, a, x = packed_of("bireal_resnet18", seed=0)
    _, b, _ = packed_of("bireal_resnet18", seed=5)
    _, c, _ = packed_of("bireal_resnet18", seed=9)
    a(x)  # builds a's plan and binds its steps
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))
    a.load_state_dict({k: v.clone() for k, v in c.state_dict().items()}, assign=True)
    assert torch.equal(a(x), c(x))


def test_stem_max_pool_runs_channels_last_packs_for_the_first_unit_and_units_overwrite_their_shortcut_buffer() -> None:
    _, packed, _ = packed_of("bireal_resnet18_imagenet")
    x = torch.randn(1, 3, 224, 224)
    kept = x.clone()
    first = packed(x)
    assert torch.equal(x, kept)  # the caller's image is never a buffer the plan writes into
    assert torch.equal(packed(x), first)  # nothing a call overwrites is read by the next call
    with torch.no_grad():
        tree = packed.net(x.contiguous(memory_format=torch.channels_last))
    # the shortcuts' 1x1 convs sum in the kernel's order (tests/test_pointwise_conv.py checks
    # the plan against the tree bit for bit on PyTorch's shortcut ops)
    torch.testing.assert_close(first, tree, rtol=1e-5, atol=1e-5 * tree.abs().max().item())
    plan = packed.plan()
    assert plan is not None
    (pool,) = [m for m in plan.modules() if isinstance(m, ChannelsLastMaxPool2d)]
    # the pool writes the first unit's packed input beside its float output (the shortcut)
    assert pool.pack_output and all(s.packed_input for s in steps_of(packed))
    assert all(s.into_residual for s in steps_of(packed))  # every unit's shortcut is read once


class ShortcutReadTwice(nn.Module):
    """y feeds a binary unit's shortcut and, after it, another add: the unit must not write
    its output into y's buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = BinaryConv2d(32, 32, 3, padding=1, config=BinarizeConfig(activation="ste", weight="xnor"))
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        z = self.bn(self.conv(y)) + y
        return (z + y).mean(dim=(2, 3))


def test_a_shortcut_read_again_later_is_not_overwritten() -> None:
    torch.manual_seed(0)
    model = randomize(ShortcutReadTwice())
    packed = pack_model(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = packed.net(x.contiguous(memory_format=torch.channels_last))
    # the global average pool runs on bnas's kernel on AVX-512 CPUs, in a summation order of its own
    torch.testing.assert_close(packed(x), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    with _shortcuts_on_pytorch(), torch.no_grad():
        assert torch.equal(packed(x), ref)
    (step,) = steps_of(packed)
    assert step.residual and not step.into_residual
