"""The lowered plan (bnas.export.program): a packed network's binary steps and float kernel
modules as direct kernel calls. It must compute what the plan computes, call for call, and
follow every change the plan follows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize
from torch import nn

import bnas
from bnas import kernels
from bnas.binarize import BinarizeConfig, BinaryConv2d
from bnas.export import PackedNetwork, pack_model
from bnas.export.plan import (
    ChannelsLastPointwiseConv2d,
    GlobalAvgPool2d,
    ImageConv2d,
    ImageConvMaxPool2d,
    KernelLinear,
    PackedStep,
)
from bnas.kernels import cpu_backend

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"
TRACEABLE = sorted(p.stem for p in GENOTYPES.glob("*.yaml") if p.stem != "kim2020_bnas_a")
needs_kernels = pytest.mark.skipif(not cpu_backend.supported_backends(), reason="no CPU kernel extension")
needs_avx512 = pytest.mark.skipif(
    "cpu-avx512" not in cpu_backend.supported_backends(), reason="the float kernels run on cpu-avx512 only"
)
FLOAT_KERNEL_MODULES = (ChannelsLastPointwiseConv2d, GlobalAvgPool2d, ImageConv2d, ImageConvMaxPool2d, KernelLinear)


def packed_of(name: str, seed: int = 0, batch: int = 2) -> tuple[PackedNetwork, torch.Tensor]:
    genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    torch.manual_seed(seed)
    packed = pack_model(randomize(bnas.build(genotype), seed=seed))
    packed.adaptive_threads = False  # both paths on the same thread count
    return packed, torch.randn(batch, *genotype.input)


def plan_and_lowered(packed: PackedNetwork, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed.lowered = False
    plan = packed(x)
    packed.lowered = True
    return plan, packed(x)


def step_calls(monkeypatch: pytest.MonkeyPatch) -> list[PackedStep]:
    """Every PackedStep.forward call from now on."""
    calls: list[PackedStep] = []
    forward = PackedStep.forward
    monkeypatch.setattr(PackedStep, "forward", lambda self, *a: calls.append(self) or forward(self, *a))
    return calls


@needs_kernels
@pytest.mark.parametrize("name", TRACEABLE)
def test_lowered_program_computes_the_plans_outputs_bit_for_bit(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packed, x = packed_of(name, batch=1 if name == "bireal_resnet18_imagenet" else 2)
    plan, lowered = plan_and_lowered(packed, x)
    assert torch.equal(lowered, plan)
    route = kernels.backend()
    program = packed.program(route)
    plan_module = packed.plan()
    assert plan_module is not None
    called = [plan_module.get_submodule(str(n.target)) for n in plan_module.graph.nodes if n.op == "call_module"]
    steps = [s for s in called if isinstance(s, PackedStep)]
    assert (program.bound_steps if program is not None else 0) == len(steps)
    calls = step_calls(monkeypatch)
    assert torch.equal(packed(x), plan)
    assert not any(s in steps for s in calls)  # bound steps run without the module


@needs_kernels
def test_bireal_imagenet_binds_every_unit_in_both_stem_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    packed, x = packed_of("bireal_resnet18_imagenet", batch=1)
    for precision in ("float32", "int8") if cpu_backend.int8_supported() else ("float32",):
        packed.stem_precision = precision
        plan, lowered = plan_and_lowered(packed, x)
        assert torch.equal(lowered, plan)
        program = packed.program(kernels.backend())
        assert program is not None and program.bound_steps == 16
    calls = step_calls(monkeypatch)
    packed(x)
    assert calls == []


@needs_kernels
def test_each_code_path_gets_its_own_program() -> None:
    packed, x = packed_of("bireal_resnet18", seed=1)
    for name in cpu_backend.supported_backends():
        with kernels.use_backend(name):
            plan, lowered = plan_and_lowered(packed, x)
            assert torch.equal(lowered, plan)
            program = packed.program(name)
            assert program is not None and program.route == name
    with kernels.use_backend("reference"):
        assert packed.program("reference") is None  # no extension call to bind: the plan runs
        plan, lowered = plan_and_lowered(packed, x)
        assert torch.equal(lowered, plan)


@needs_kernels
def test_weights_changed_in_place_or_replaced_are_followed() -> None:
    packed, x = packed_of("bireal_resnet18", seed=2)
    route = kernels.backend()
    before = packed(x)
    program = packed.program(route)
    step = next(s for s in packed.plan().modules() if isinstance(s, PackedStep) and s.packed_input)  # type: ignore[union-attr]
    with torch.no_grad():
        step.conv.weight_packed.bitwise_not_()  # every sign of one conv flipped, in place
    plan, lowered = plan_and_lowered(packed, x)
    assert packed.program(route) is not program  # lowered again
    assert torch.equal(lowered, plan) and not torch.equal(lowered, before)
    donor = packed_of("bireal_resnet18", seed=4)[0]
    packed.load_state_dict({k: v.clone() for k, v in donor.state_dict().items()}, assign=True)
    assert torch.equal(packed(x), donor(x))


@needs_kernels
def test_inputs_of_another_size_and_batch() -> None:
    packed, _ = packed_of("bireal_resnet18", seed=5)
    for shape in ((1, 3, 32, 32), (3, 3, 40, 24), (2, 3, 32, 32)):
        x = torch.randn(shape)
        plan, lowered = plan_and_lowered(packed, x)
        assert torch.equal(lowered, plan)


class BroadcastAdd(nn.Module):
    """A binary conv with packed input whose residual is a (1, K, 1, 1) parameter: an add that
    broadcasts, which the kernel's epilogue does not do."""

    def __init__(self) -> None:
        super().__init__()
        config = BinarizeConfig(activation="ste", weight="xnor")
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = BinaryConv2d(32, 32, 3, padding=1, config=config)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = BinaryConv2d(32, 32, 3, padding=1, config=config)
        self.offset = nn.Parameter(torch.randn(1, 32, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(self.stem(x)))
        return (self.conv2(y) + self.offset).mean(dim=(2, 3))


@needs_kernels
def test_a_broadcast_residual_goes_through_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    packed = pack_model(randomize(BroadcastAdd()))
    x = torch.randn(2, 3, 8, 8)
    plan, lowered = plan_and_lowered(packed, x)
    assert torch.equal(lowered, plan)
    with torch.no_grad():
        torch.testing.assert_close(lowered, packed.net(x.contiguous(memory_format=torch.channels_last)))
    steps = [s for s in packed.plan().modules() if isinstance(s, PackedStep)]  # type: ignore[union-attr]
    assert [s.packed_input for s in steps] == [False, True] and steps[1].residual
    program = packed.program(kernels.backend())
    assert program is not None and program.bound_steps == 2 and not program.native
    calls = step_calls(monkeypatch)
    packed(x)
    assert calls == steps[1:]  # the first, bound, packs its own input; the second's add broadcasts


def module_calls(monkeypatch: pytest.MonkeyPatch, classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Every forward call of a module of these classes from now on."""
    calls: list[nn.Module] = []
    for cls in classes:
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=forward: calls.append(self) or _f(self, *a))
    return calls


@needs_kernels
def test_the_call_timer_sees_every_bound_call_once_per_call() -> None:
    packed, x = packed_of("bireal_resnet18", seed=6)
    packed(x)
    program = packed.program(kernels.backend())
    assert program is not None
    seen: list[tuple[nn.Module, float]] = []
    program.call_timer = lambda module, seconds: seen.append((module, seconds))
    packed(x)
    program.call_timer = None
    packed(x)
    plan = packed.plan()
    assert plan is not None
    called = [plan.get_submodule(str(n.target)) for n in plan.graph.nodes if n.op == "call_module"]
    bound = [m for m in called if isinstance(m, (PackedStep, *FLOAT_KERNEL_MODULES))]
    assert [module for module, _ in seen] == bound and all(seconds > 0 for _, seconds in seen)
    assert len(program.bound_kernels) == 6  # on every CPU code path (elsewhere as PyTorch's ops)


@needs_avx512
def test_the_float_kernel_modules_run_as_direct_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, kinds in (
        ("bireal_resnet18_imagenet", ["ImageConvMaxPool2d"] + ["ChannelsLastPointwiseConv2d"] * 3
         + ["GlobalAvgPool2d", "KernelLinear"]),
        ("bireal_resnet18", ["ImageConv2d"] + ["ChannelsLastPointwiseConv2d"] * 3
         + ["GlobalAvgPool2d", "KernelLinear"]),
    ):  # fmt: skip
        packed, x = packed_of(name, batch=1)
        with kernels.use_backend("cpu-avx512"):
            plan, lowered = plan_and_lowered(packed, x)
            assert torch.equal(lowered, plan)
            program = packed.program("cpu-avx512")
            assert program is not None and program.bound_kernels == kinds
            calls = module_calls(monkeypatch, FLOAT_KERNEL_MODULES)
            assert torch.equal(packed(x), plan)
            assert calls == []  # none of them ran as a module
            monkeypatch.undo()


@needs_avx512
def test_float_weights_changed_in_place_or_replaced_are_followed() -> None:
    packed, x = packed_of("bireal_resnet18_imagenet", seed=8, batch=1)
    plan_of = packed.plan()
    assert plan_of is not None
    modules = {type(m): m for m in plan_of.modules() if isinstance(m, FLOAT_KERNEL_MODULES)}
    stem, shortcut, head = modules[ImageConvMaxPool2d], modules[ChannelsLastPointwiseConv2d], modules[KernelLinear]
    changes = [
        lambda: shortcut.conv.weight.mul_(-1),  # in place: the layout bound is stale
        lambda: setattr(stem.conv, "bias", nn.Parameter(stem.conv.bias + 1)),  # replaced
        lambda: head.linear.weight.mul_(2),
        lambda: setattr(head.linear, "weight", nn.Parameter(head.linear.weight * -1)),
    ]
    with kernels.use_backend("cpu-avx512"), torch.no_grad():
        before = packed(x)
        for change in changes:
            program = packed.program("cpu-avx512")
            change()
            plan, lowered = plan_and_lowered(packed, x)
            assert packed.program("cpu-avx512") is not program  # lowered again
            assert torch.equal(lowered, plan) and not torch.equal(lowered, before)
            before = lowered


@needs_avx512
def test_an_input_a_bound_kernel_was_not_bound_for_goes_through_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    packed, x = packed_of("bireal_resnet18", seed=9)
    with kernels.use_backend("cpu-avx512"), torch.no_grad():
        packed(x)
        program = packed.program("cpu-avx512")
        assert program is not None
        pool = next(k for k in program._kernels if isinstance(k.module, GlobalAvgPool2d))
        calls = module_calls(monkeypatch, (GlobalAvgPool2d,))
        nchw = torch.randn(2, 512, 4, 4)  # not channels_last: the module's path
        env: list[object] = [None] * (pool.slot + 1)
        env[pool.slot] = nchw
        assert torch.equal(pool(env, 1), pool.module(nchw))
        assert calls == [pool.module, pool.module]
        env[pool.slot] = nchw.contiguous(memory_format=torch.channels_last)
        assert torch.equal(pool(env, 1), pool.module(nchw)) and len(calls) == 3  # bound: no module call


@needs_kernels
def test_a_packed_network_pickles_after_running_lowered() -> None:
    import pickle

    packed, x = packed_of("bireal_resnet18", seed=7)
    out = packed(x)
    assert packed.program(kernels.backend()) is not None
    # torch.save(packed) pickles it so; the bound calls are closures: left out, made again
    loaded = pickle.loads(pickle.dumps(packed))
    assert torch.equal(loaded(x), out)
    assert loaded.program(kernels.backend()) is not None


@needs_avx512
def test_weights_a_kernel_cannot_take_go_through_the_module_and_its_message() -> None:
    packed, x = packed_of("bireal_resnet18", seed=10)
    with kernels.use_backend("cpu-avx512"), torch.no_grad():
        packed(x)
        plan = packed.plan()
        assert plan is not None
        (head,) = [m for m in plan.modules() if isinstance(m, KernelLinear)]
        head.linear.bias = nn.Parameter(torch.zeros(head.linear.out_features + 1))  # one bias too many
        with pytest.raises(ValueError, match=r"linear expects \(N, C\) input, \(K, C\) weights and K biases"):
            packed(x)
        program = packed.program("cpu-avx512")
        assert program is not None and "KernelLinear" not in program.bound_kernels
