"""The lowered program replayed in C++ (``bnas.export.program.Program``'s runner, the
extension's ``ProgramRunner``): the same outputs bit for bit as the Python instructions, only
for inputs whose layout has run through Python without a fallback, and every bound call still
seen by a call timer."""

from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize, run_benchmark
from torch import nn

import bnas
from bnas import kernels
from bnas.export import PackedNetwork, load_packed, pack_model
from bnas.export.plan import ChannelsLastPointwiseConv2d, GlobalAvgPool2d, ImageConvMaxPool2d, KernelLinear, PackedStep
from bnas.export.program import Program
from bnas.kernels import cpu_backend

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"
needs_kernels = pytest.mark.skipif(not cpu_backend.supported_backends(), reason="no CPU kernel extension")
needs_avx512 = pytest.mark.skipif(
    "cpu-avx512" not in cpu_backend.supported_backends(), reason="the float kernels run on cpu-avx512 only"
)


def imagenet_packed(seed: int = 0, name: str = "bireal_resnet18_imagenet") -> tuple[PackedNetwork, torch.Tensor]:
    genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    torch.manual_seed(seed)
    packed = pack_model(randomize(bnas.build(genotype), seed=seed))
    packed.adaptive_threads = False
    return packed, torch.randn(1, *genotype.input)


def int8_grid_packed(seed: int) -> tuple[PackedNetwork, torch.Tensor]:
    """``imagenet_packed`` in the opt-in int8 configuration of ``packed_model.py``'s
    ``int8_all_grid`` (skips the test without AVX-512 VNNI)."""
    if not cpu_backend.int8_supported():
        pytest.skip("the int8 kernels need AVX-512 VNNI")
    packed, x = imagenet_packed(seed=seed)
    packed.stem_precision = packed.shortcut_precision = packed.head_precision = "int8"
    packed.input_grid = (8 / 255, 127.0)  # the stem's bias is then made from the conv's
    return packed, x


class RunCounter:
    """The program's runner, counting the forwards it ran."""

    def __init__(self, program: Program):
        self.runner, self.runs = program._runner, 0
        program._runner = self

    def run_known(self, x: torch.Tensor, threads: int) -> Any:
        out = self.runner.run_known(x, threads)
        self.runs += out is not None
        return out

    def run_timed(self, x: torch.Tensor, threads: int) -> Any:
        self.runs += 1
        return self.runner.run_timed(x, threads)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def python_and_native(packed: PackedNetwork, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the output of the Python instructions, that of the runner, the runner's runs)."""
    packed(x)
    program = packed.program(kernels.backend())
    assert program is not None and program.native
    counter = RunCounter(program)
    program.native_enabled = False
    python = packed(x)
    program.native_enabled = True
    native = packed(x)
    return python, native, counter.runs


def changed_on_the_runner(packed: PackedNetwork, x: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The output after a change in place: computed by the runner, not ``before``, and the
    plan's (``packed.lowered`` is False afterwards)."""
    program = packed.program(kernels.backend())
    assert program is not None
    counter = RunCounter(program)
    after = packed(x)
    assert counter.runs == 1 and not torch.equal(after, before)
    packed.lowered = False
    assert torch.equal(after, packed(x))
    return after


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["bireal_resnet18_imagenet", "bireal_resnet18"])  # 32x32: a float-input step
def test_the_runner_computes_the_python_programs_outputs_bit_for_bit(threads: int, name: str) -> None:
    packed, x = imagenet_packed(name=name)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        python, native, runs = python_and_native(packed, x)
    finally:
        torch.set_num_threads(before)
    assert runs == 1 and torch.equal(native, python)
    packed.lowered = False
    assert torch.equal(native, packed(x))  # and the plan's


# ReActNet's parts: RSign (a learned threshold per channel before each binary conv and the
# binary linear layer) and RPReLU; the stride-2 unit's shortcut is an avg-pool and a 1x1 conv
REACTNET = {
    "name": "reactnet_parts",
    "input": [3, 16, 16],
    "num_classes": 10,
    "stem": [{"op": "conv_bn", "channels": 32}],
    "body": [
        {"op": "bireal_block", "channels": 32, "binarize": "reactnet", "activation": "rprelu", "repeat": 2},
        {"op": "bireal_block", "channels": 64, "stride": 2, "binarize": "reactnet"},
        {"op": "bireal_block", "channels": 64, "binarize": "reactnet"},
    ],
    "head": [
        {"op": "global_avgpool"},
        {"op": "binary_linear", "channels": 48, "binarize": "reactnet"},
        {"op": "linear"},
    ],
}


def reactnet_packed(seed: int) -> tuple[nn.Module, PackedNetwork, torch.Tensor]:
    torch.manual_seed(seed)
    model = randomize(bnas.build(bnas.genotype.genotype_from_dict(REACTNET)), seed=seed).eval()
    packed = pack_model(model)
    packed.adaptive_threads = False
    return model, packed, torch.randn(2, 3, 16, 16)


@needs_kernels
def test_reactnet_layers_run_on_the_runner_with_signs_packed_against_their_thresholds() -> None:
    model, packed, x = reactnet_packed(seed=6)
    python, native, runs = python_and_native(packed, x)
    assert runs == 1 and torch.equal(native, python)
    program = packed.program(kernels.backend())
    assert program is not None and program.bound_steps == 4  # the four units' convs
    assert "PackedLinear" in program.bound_kernels
    plan = packed.plan()
    assert plan is not None
    steps = [m for m in plan.modules() if isinstance(m, PackedStep)]
    thresholds = [s.conv.threshold for s in steps]
    assert all(t is not None and bool((t != 0).all()) for t in thresholds)  # randomized: the bits move
    # the first two units' RPReLU runs in their epilogue; each unit's output is packed against
    # the next conv's threshold there too
    assert [s.rprelu is not None for s in steps] == [True, True, False, False]
    assert [s.pack_threshold is t for s, t in zip(steps, thresholds[1:], strict=False)] == [True] * 3
    assert steps[-1].pack_threshold is None
    assert [s.packed_input for s in steps] == [False, True, True, True]
    assert "torch.rprelu" not in [i.native_call()[0] for i in program._instructions if hasattr(i, "native_call")]
    packed.lowered = False
    assert torch.equal(native, packed(x))  # the plan's
    with torch.no_grad():
        torch.testing.assert_close(native, model(x), rtol=0, atol=1e-4)  # the float model's
        for threshold in thresholds:  # read at every call, by Python and the runner alike
            threshold.add_(0.3)
        rprelu = steps[0].rprelu
        assert rprelu is not None
        rprelu.slope.mul_(-2.0)
    packed.lowered = True
    after = changed_on_the_runner(packed, x, native)
    packed.fused = False  # the module tree: each conv subtracts its threshold, then packs
    torch.testing.assert_close(after, packed(x), rtol=0, atol=1e-4)


@needs_kernels
def test_a_reactnet_network_copies_pickles_and_saves_with_its_plan(tmp_path: Path) -> None:
    """The plan's steps hold their reader's conv and their RPReLU outside the module tree: a
    copy's steps hold the copy's, and a saved network loads to the same outputs."""
    _, packed, x = reactnet_packed(seed=3)
    out = packed(x)
    for twin in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert torch.equal(twin(x), out)
        plan = twin.plan()
        assert plan is not None
        steps = [s for s in plan.modules() if isinstance(s, PackedStep)]
        held = [m for s in steps for m in (s.rprelu, s.__dict__["_threshold_reader"]) if m is not None]
        in_net = {id(m) for m in twin.net.modules()}
        assert len(held) == 5 and all(id(m) in in_net for m in held)  # two RPReLUs, three readers
    loaded = load_packed(packed.save(tmp_path / "reactnet.bnas"))
    loaded.adaptive_threads = False
    assert torch.equal(loaded(x), out)


@needs_kernels
def test_a_replaced_threshold_or_rprelu_parameter_lowers_the_program_again() -> None:
    _, packed, x = reactnet_packed(seed=7)
    packed(x)
    program = packed.program(kernels.backend())
    plan = packed.plan()
    assert program is not None and plan is not None
    steps = [m for m in plan.modules() if isinstance(m, PackedStep)]
    reader = steps[1].conv
    reader.threshold = reader.threshold + 0.25  # a new tensor: the producer's bound call packed against the old one
    assert not program.current()
    relowered = packed.program(kernels.backend())
    assert relowered is not program and relowered is not None and relowered.current()
    rprelu = steps[0].rprelu
    assert rprelu is not None
    rprelu.shift_out = nn.Parameter(rprelu.shift_out + 0.5)  # likewise the epilogue's RPReLU
    assert not relowered.current()
    out = packed(x)
    packed.lowered = False
    assert torch.equal(out, packed(x))
    packed.fused = False
    torch.testing.assert_close(out, packed(x), rtol=0, atol=1e-4)


@needs_kernels
def test_the_reactnet_benchmark_prints_its_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    _, records = run_benchmark("reactnet_packed", ["--sizes", "32", "--repeats", "2", "--threads", "1"], capsys)
    assert [r["variant"] for r in records] == ["rsign", "rsign_rprelu"]
    for record in records:
        assert record["genotype"] == "bireal_resnet18_reactnet" and record["threads"] == 1
        assert record["native_programs"] == {"bireal": True, "reactnet": True}
        assert record["same_class_as_float_model"] is True and record["max_abs_logit_difference"] < 1e-3
        assert record["ratio"] == pytest.approx(record["baseline_ms"] / record["ours_ms"], abs=0.01)


@needs_avx512
def test_the_int8_configuration_on_the_runner() -> None:
    packed, x = int8_grid_packed(seed=1)
    python, native, runs = python_and_native(packed, x)
    assert runs == 1 and torch.equal(native, python)
    float32 = imagenet_packed(seed=1)[0](x)
    assert not torch.equal(native, float32)  # the int8 calls did run


@needs_kernels
def test_a_new_input_layout_runs_in_python_first() -> None:
    packed, x = imagenet_packed(seed=2)
    packed(x)
    program = packed.program(kernels.backend())
    assert program is not None
    counter = RunCounter(program)
    packed(x)
    assert counter.runs == 1
    for other in (x.contiguous(memory_format=torch.channels_last), torch.randn(1, 3, 160, 192)):
        with torch.no_grad():
            expected = packed.plan()(other)  # type: ignore[misc]
        first, second = packed(other), packed(other)
        assert counter.runs == 2 and torch.equal(first, expected) and torch.equal(second, expected)
        counter.runs = 1


@needs_avx512
def test_an_input_that_falls_back_never_runs_on_the_runner() -> None:
    # the float classifier's row kernel takes 1 to 3 rows; 4 go through the module
    packed, _ = imagenet_packed(seed=3)
    x = torch.randn(cpu_backend.LINEAR_ROWS_MAX_BATCH + 1, 3, 64, 64)
    with kernels.use_backend("cpu-avx512"):
        packed(x)
        program = packed.program("cpu-avx512")
        assert program is not None
        counter = RunCounter(program)
        head = next(k for k in program._kernels if isinstance(k.module, KernelLinear))
        outputs = [packed(x) for _ in range(3)]
        assert counter.runs == 0 and head.fallbacks == 4
        packed.lowered = False
        assert all(torch.equal(out, packed(x)) for out in outputs)


@needs_kernels
def test_weights_changed_in_place_are_read_by_the_runner() -> None:
    packed, x = imagenet_packed(seed=4)
    before = packed(x)
    packed(x)
    step = next(s for s in packed.plan().modules() if isinstance(s, PackedStep) and s.packed_input)  # type: ignore[union-attr]
    with torch.no_grad():
        step.conv.bias.add_(1.0)  # read at every call, by Python and the runner alike
    changed_on_the_runner(packed, x, before)


@needs_avx512
def test_the_call_timer_sees_every_bound_call_on_the_runner() -> None:
    packed, x = imagenet_packed(seed=5)
    with kernels.use_backend("cpu-avx512"):
        packed(x)
        program = packed.program("cpu-avx512")
        assert program is not None
        counter = RunCounter(program)
        seen: list[tuple[nn.Module, float]] = []
        program.call_timer = lambda module, seconds: seen.append((module, seconds))
        timed = packed(x)
        program.call_timer = None
    assert counter.runs == 1
    plan = packed.plan()
    assert plan is not None
    called = [plan.get_submodule(str(n.target)) for n in plan.graph.nodes if n.op == "call_module"]
    assert [module for module, _ in seen] == called and all(seconds > 0 for _, seconds in seen)
    kinds = [type(module) for module, _ in seen]
    assert kinds.count(PackedStep) == 16 and kinds.count(ChannelsLastPointwiseConv2d) == 3
    assert {ImageConvMaxPool2d, GlobalAvgPool2d, KernelLinear} <= set(kinds)
    assert torch.equal(timed, packed(x))


@needs_kernels
def test_networks_with_a_call_the_runner_cannot_make_have_none() -> None:
    # the zoo's float convs on binary activations (SignConv2d) are module calls, not calls the
    # runner knows
    from deploy_nets import quantizer_zoo

    packed = pack_model(quantizer_zoo())
    x = torch.randn(2, 3, 9, 9)
    out = packed(x)
    program = packed.program(kernels.backend())
    assert program is not None and program.bound_steps > 0 and not program.native
    assert torch.equal(packed(x), out)


@needs_kernels
def test_the_runner_runs_from_several_python_threads_and_copies() -> None:
    packed, x = imagenet_packed(seed=6)
    expected = packed(x)
    packed(x)
    results: list[torch.Tensor] = []

    def work() -> None:
        results.extend(packed(x) for _ in range(3))

    workers = [threading.Thread(target=work) for _ in range(2)]  # the runner releases the GIL
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 6 and all(torch.equal(r, expected) for r in results)
    assert torch.equal(copy.deepcopy(packed)(x), expected)


@needs_kernels
def test_the_runners_own_errors() -> None:
    runner = cpu_backend.extension().ProgramRunner(4)
    with pytest.raises(RuntimeError, match="no kernel call of kind 'conv3d'"):
        runner.kernel(1, "conv3d", [0], (), -1, [])
    with pytest.raises(RuntimeError, match="global_avg_pool_nhwc takes 0 arguments, got 1"):
        runner.kernel(1, "global_avg_pool_nhwc", [0], (1,), -1, [])
    runner.kernel(2, "global_avg_pool_nhwc", [0], (), -1, [0])
    with pytest.raises(RuntimeError, match="instruction 1 out of order"):
        runner.getitem(1, 0, 0, [])
    with pytest.raises(RuntimeError, match="no output set"):
        runner.run(torch.randn(1, 8, 2, 2), 1)
    runner.set_output(2)
    x = torch.randn(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(runner.run(x, 1), x.mean(dim=(2, 3)))
    # a kernel's own check, raised while the runner does not hold the GIL, reaches Python
    with pytest.raises(RuntimeError, match="global_avg_pool_nhwc: input must be a channels_last float32 CPU tensor"):
        runner.run(torch.randn(1, 8, 2, 3), 1)
    assert runner.run_known(x, 1) is None  # no layout remembered yet
    runner.remember(x, 1)
    assert runner.known_inputs() == 1 and torch.equal(runner.run_known(x, 1), runner.run(x, 1))
    runner.remember(torch.randn(2, 8, 2, 2), 1)  # at most 1: not kept
    assert runner.known_inputs() == 1 and runner.run_known(torch.randn(2, 8, 2, 2), 1) is None


@needs_kernels
def test_still_held_compares_identity() -> None:
    still_held = cpu_backend.extension().ProgramRunner.still_held
    weight, store = torch.zeros(2), {}
    store["weight"] = weight
    assert still_held([(store, "weight", weight), (store, "bias", None)])
    store["weight"] = weight.clone()  # equal values, another tensor: the call is stale
    assert not still_held([(store, "weight", weight)])
    with pytest.raises(TypeError, match=r"still_held takes \(dict, name, object\) tuples"):
        still_held([(store, "weight")])


@needs_kernels
def test_the_runner_benchmark_prints_its_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("program_runner", root / "benchmarks" / "program_runner.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_num_threads()
    try:
        bench.main(["--sizes", "32", "--threads", "1", "--repeats", "3"])
        bench.main(["--genotypes", "fashion_searched", "--threads", "1", "--repeats", "3"])
        other = [route for route in cpu_backend.supported_backends() if route != "cpu-avx512"]
        if other:  # the float modules as PyTorch's ops in the runner
            bench.main(["--sizes", "32", "--backend", other[0], "--threads", "1", "--repeats", "3"])
    finally:
        torch.set_num_threads(before)
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    if other:
        assert records[-1]["route"] == other[0] and records[-1]["genotype"] == "bireal_resnet18"
        assert records[-1]["precision"] == "float32" and records[-1]["outputs_identical"] is True
        records = records[:-1]
    assert len(records) == (3 if cpu_backend.int8_supported() else 2)
    assert [r["genotype"] for r in records] == ["bireal_resnet18"] * (len(records) - 1) + ["fashion_searched"]
    assert records[-1]["precision"] == "float32" and records[-1]["input"] == [1, 28, 28]
    for record in records:
        assert record["threads"] == 1 and record["outputs_identical"] is True
        assert record["ratio"] == pytest.approx(record["baseline_ms"] / record["ours_ms"], abs=0.01)


@needs_avx512
def test_bound_layouts_never_require_grad_even_for_parameters_that_do() -> None:
    # the forward no longer runs under no_grad as a whole: the plan and the program are made
    # under it, and no layout they bind may keep an autograd graph alive
    packed, x = int8_grid_packed(seed=7)
    parameters = set()
    for parameter in packed.parameters():
        parameter.requires_grad_(True)
        parameters.add(parameter)
    assert torch.is_grad_enabled() and parameters
    with kernels.use_backend("cpu-avx512"):
        out = packed(x)
        program = packed.program("cpu-avx512")
    assert not out.requires_grad and program is not None
    made = [
        arg
        for kernel in program._kernels
        for arg in kernel.call.args
        if isinstance(arg, torch.Tensor) and arg not in parameters
    ]
    assert len(made) >= 8  # layouts, scales, sums and the grid's bias
    assert not any(arg.requires_grad for arg in made)
