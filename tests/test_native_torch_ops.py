"""PyTorch's own ops on the C++ runner (``bnas.export.torch_ops``, ``csrc/program_torch_ops.h``):
cell networks and plain CNNs with BatchNorm, pools, activations, sums and concatenations run
natively, with the Python program's outputs bit for bit; the small float stem is PyTorch's
conv in both; what the runner cannot make keeps the program in Python."""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from test_native_program import RunCounter, changed_on_the_runner, python_and_native
from test_packed_program import FLOAT_KERNEL_MODULES, module_calls
from torch import nn

import bnas
from bnas import kernels
from bnas.export import PackedNetwork, pack_model
from bnas.export.plan import ImageConv2d, ImageConvMaxPool2d
from bnas.export.torch_ops import torch_op
from bnas.genotype import loads_genotype
from bnas.kernels import cpu_backend

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = [
    pytest.mark.usefixtures("kernel_threads"),
    pytest.mark.skipif(not cpu_backend.supported_backends(), reason="no CPU kernel extension"),
]

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"

# Every torch.<op> kind of the runner, and the networks that make them.
TORCH_KINDS = {
    "torch.batch_norm",
    "torch.add",
    "torch.cat",
    "torch.pad",
    "torch.slice",
    "torch.relu",
    "torch.prelu",
    "torch.rprelu",
    "torch.avg_pool2d",
    "torch.max_pool2d",
    "torch.flatten",
    "torch.channels_last",
    "torch.hardtanh",
    "torch.dropout",
}
NETWORKS = [
    "fashion_searched",  # cells: BN alignment, node sums, a factorized reduce (pad, slice, cat), pools
    "example_cells",  # concatenated cells, a ReLU, a slice of a padded map into a 1x1 conv
    "ebnas_cifar10",  # PReLU, average pools
    "darts_v2_binary",  # depthwise binary convs (sep_conv, dil_conv) on their float input
    # (ebnas_cifar10 above: grouped ones of 4 channels a group)
    "binary_vgg_small",  # BN after the binary convs, ceil-mode max-pools, flatten
    "binary_nin",
    "xnor_resnet18",
    "fashion_handcrafted",  # a stem small enough to be PyTorch's conv
    "digits_small",
    "binary_lenet5",  # a binary linear layer on packed signs
    "bnn_mlp_2048",  # no binary conv: binary linear layers on real and binary rows, hardtanh, dropout
    "binarynet_mlp",
]

NO_STEM = """
name: no_stem
input: [8, 12, 12]
num_classes: 5
stem: []
body:
  - {op: bireal_block, channels: 8, repeat: 2}
  - {op: max_pool_3x3, stride: 2}
head: [{op: global_avgpool}, {op: linear}]
"""

# ReActNet's RSign (a threshold per channel before each binary conv, depthwise ones too) and
# RPReLU: after the stem as one of the runner's torch ops, after a unit in its epilogue
REACTNET_UNITS = """
name: reactnet_units
input: [3, 12, 12]
num_classes: 5
stem: [{op: conv_bn, channels: 16, kernel: 3, activation: rprelu}]
body:
  - {op: bireal_block, channels: 16, binarize: reactnet, activation: rprelu}
  - {op: binary_sep_conv_3x3, channels: 16, binarize: reactnet}
  - {op: bireal_block, channels: 16, binarize: reactnet}
head: [{op: global_avgpool}, {op: linear}]
"""
INLINE = {"no_stem": NO_STEM, "reactnet_units": REACTNET_UNITS}


def packed_network(name: str, seed: int = 0) -> tuple[PackedNetwork, torch.Tensor]:
    genotype = loads_genotype(INLINE[name]) if name in INLINE else bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    torch.manual_seed(seed)
    packed = pack_model(randomize(bnas.build(genotype), seed=seed))
    packed.adaptive_threads = False
    return packed, torch.randn(2, *genotype.input)


def native_kinds(packed: PackedNetwork) -> list[str]:
    program = packed.program(kernels.backend())
    assert program is not None
    return [i.native_call()[0] for i in program._instructions if hasattr(i, "native_call")]


@pytest.mark.parametrize("name", [*NETWORKS, *INLINE])
def test_networks_with_float_glue_run_on_the_runner_bit_for_bit(name: str) -> None:
    packed, x = packed_network(name)
    python, native, runs = python_and_native(packed, x)
    assert runs == 1 and torch.equal(native, python)
    packed.lowered = False
    assert torch.equal(native, packed(x))  # and the plan's (whose grouped convs run packed)
    packed.fused = False
    assert torch.allclose(native, packed(x), rtol=1e-4, atol=1e-4)  # the module tree's, to float rounding


def test_every_torch_kind_is_made_by_a_network_above() -> None:
    made: set[str] = set()
    for name in [*NETWORKS, *INLINE]:
        packed, x = packed_network(name)
        packed(x)
        made.update(native_kinds(packed))
    assert TORCH_KINDS <= made
    assert {"linear_packed_float", "real_binary_linear"} <= made
    assert ("grouped_conv_fused" in made) == (kernels.backend() in cpu_backend.FLOAT_MAP_GROUP_CHANNELS)
    if "cpu-avx512" in cpu_backend.supported_backends() and kernels.backend() == "cpu-avx512":
        assert "image_conv_nhwc_or_conv2d" in made


# Code paths without the AVX-512 float kernels: there the stem, the shortcuts, the global pool
# and the classifier run PyTorch's ops, in the runner as well.
OTHER_ROUTES = [route for route in cpu_backend.supported_backends() if route != "cpu-avx512"]


@pytest.mark.parametrize("route", OTHER_ROUTES)
@pytest.mark.parametrize(
    "name, kinds",
    [
        ("bireal_resnet18_imagenet", {"conv2d_max_pool", "torch.pointwise_conv", "torch.mean_hw", "torch.linear"}),
        ("bireal_resnet18", {"torch.conv2d", "torch.pointwise_conv", "torch.mean_hw", "torch.linear"}),
    ],
)
def test_float_modules_without_avx512_are_pytorchs_ops_on_the_runner(
    route: str, name: str, kinds: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    packed, x = packed_network(name)
    with kernels.use_backend(route):
        python, native, runs = python_and_native(packed, x)
        assert runs == 1 and torch.equal(native, python)
        assert kinds <= set(native_kinds(packed))
        calls = module_calls(monkeypatch, FLOAT_KERNEL_MODULES)
        assert torch.equal(packed(x), native) and calls == []  # none of them ran as a module
        monkeypatch.undo()
        packed.lowered = False
        assert torch.equal(native, packed(x))  # the plan's
        plan = packed.plan()
        assert plan is not None
        stem = next(m for m in plan.modules() if isinstance(m, (ImageConv2d, ImageConvMaxPool2d)))
        with torch.no_grad():
            stem.conv.weight.mul_(-1.0)  # no layout bound: read at every call
        packed.lowered = True
        changed_on_the_runner(packed, x, native)


@pytest.mark.skipif("cpu-avx2" not in cpu_backend.supported_backends(), reason="no AVX2 code path here")
def test_depthwise_convs_run_on_the_float_map_on_avx2() -> None:
    packed, x = packed_network("darts_v2_binary")
    with kernels.use_backend("cpu-avx2"):
        python, native, runs = python_and_native(packed, x)
        assert runs == 1 and torch.equal(native, python)
        assert "grouped_conv_fused" in native_kinds(packed)
        packed.lowered = False
        assert torch.equal(native, packed(x))  # the plan's, whose grouped convs run packed


SMALL_STEM = """
name: small_stem
input: [3, 16, 16]
num_classes: 5
stem: [{op: conv_bn, channels: 16, kernel: 3}]
body: [{op: bireal_block, channels: 16}]
head: [{op: global_avgpool}, {op: linear}]
"""


@pytest.mark.skipif("cpu-avx512" not in cpu_backend.supported_backends(), reason="the stem kernel is AVX-512's")
def test_the_small_float_stem_is_pytorchs_conv_on_the_runner_too() -> None:
    # the stem: 16 x 3 x 3 x 3 = 432 multiply-adds per output pixel, 3x3/1 with padding 1; a
    # 34x34 image (1,156 pixels) is under FLOAT_STEM_KERNEL_MIN_MACS, 35x35 is not
    genotype = loads_genotype(SMALL_STEM)
    packed = pack_model(randomize(bnas.build(genotype), seed=1))
    packed.adaptive_threads = False
    clean = copy.deepcopy(packed)  # weights of its own, so kernel layouts of its own
    with kernels.use_backend("cpu-avx512"):
        packed(torch.randn(1, 3, 12, 12))
        program = packed.program("cpu-avx512")
        assert program is not None
        stem = next(k for k in program._kernels if isinstance(k.module, ImageConv2d))
        assert stem.call.kind == "image_conv_nhwc_or_conv2d"
        # the kernel's weight layout zeroed: the kernel's path now gives other values than
        # PyTorch's conv (which reads the conv's weight), so the outputs show the path taken
        stem.call.args[0].zero_()
        counter = RunCounter(program)
        for size, small in ((16, True), (34, True), (35, False), (40, False)):
            x = torch.randn(1, 3, size, size)
            assert stem.module.small_float_stem(x) is small
            counter.runs = 0
            python = packed(x)  # a new input layout: Python's instructions first
            native = packed(x)
            assert counter.runs == 1 and torch.equal(native, python), size
            assert stem.fallbacks == 0  # the small stem is the module's own path, not a fallback
            assert packed.program("cpu-avx512") is program
            assert torch.equal(native, clean(x)) is small, size


def test_batch_norm_statistics_changed_in_place_are_read_and_replaced_ones_relower() -> None:
    packed, x = packed_network("fashion_searched", seed=2)
    before = packed(x)
    program = packed.program(kernels.backend())
    assert program is not None and program.native
    bn = next(m for m in packed.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean.add_(0.5)  # read at every call, by Python and the runner alike
    counter = RunCounter(program)
    changed = packed(x)
    assert counter.runs == 1 and not torch.equal(changed, before)
    packed.lowered = False
    assert torch.equal(changed, packed(x))
    packed.lowered = True
    bn.weight = nn.Parameter(bn.weight.detach() * 2)  # another tensor: the runner's call is stale
    assert not program.current()
    relowered = packed(x)
    assert packed.program(kernels.backend()) is not program
    packed.lowered = False
    assert torch.equal(relowered, packed(x)) and not torch.equal(relowered, changed)


def test_a_batch_norm_put_in_training_mode_is_not_replayed() -> None:
    packed, x = packed_network("fashion_searched", seed=3)
    packed(x)
    program = packed.program(kernels.backend())
    assert program is not None and program.native
    bn = next(m for m in packed.modules() if isinstance(m, nn.BatchNorm2d))
    bn.train()  # PackedNetwork.train() never does this; a user reaching into the tree can
    assert not program.current()
    out = packed(x)
    relowered = packed.program(kernels.backend())
    assert relowered is not None and not relowered.native  # a training BN has no runner call
    packed.lowered = False
    assert torch.equal(out, packed(x))


class _Glue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        a = y + 1.0  # a constant operand
        b = torch.cat([y, x], 1)  # dim given positionally
        c = torch.cat([y, a], dim=-3)
        d = y[..., 1:]  # an Ellipsis
        e = y[:, :, 1::2]  # a step
        f = y[:, 0]  # an integer index
        g = F.pad(y, (1, 1, 1, 1), "reflect")
        h = F.pad(y, [0, 1], value=2)
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum() + g.sum() + h.sum()


def test_torch_op_describes_what_the_runner_makes_and_nothing_else() -> None:
    module = _Glue().eval()
    gm = torch.fx.symbolic_trace(module)
    nodes = {node.name: node for node in gm.graph.nodes}
    slot_of = {node: i for i, node in enumerate(gm.graph.nodes)}
    bn = torch_op(gm, nodes["bn"], slot_of)
    assert bn is not None and bn.kind == "torch.batch_norm" and bn.slots == [0]  # x
    assert bn.args[:4] == (module.bn.weight, module.bn.bias, module.bn.running_mean, module.bn.running_var)
    assert torch_op(gm, nodes["add"], slot_of) is None  # y + 1.0
    cat, cat_1 = torch_op(gm, nodes["cat"], slot_of), torch_op(gm, nodes["cat_1"], slot_of)
    assert cat is not None and cat.args == (1,) and cat_1 is not None and cat_1.args == (-3,)
    slices = [n for n in gm.graph.nodes if n.target is operator.getitem]
    described = [torch_op(gm, n, slot_of) for n in slices]
    assert [d is not None for d in described] == [False, True, False]  # Ellipsis, 1::2, an int
    assert described[1] is not None and described[1].args == (
        [(0, None, None, 1), (1, None, None, 1), (2, 1, None, 2)],
    )
    pads = [torch_op(gm, n, slot_of) for n in gm.graph.nodes if n.target is F.pad]
    assert [p.args if p else None for p in pads] == [([1, 1, 1, 1], "reflect", None), ([0, 1], "constant", 2.0)]
    module.bn.train()
    assert torch_op(gm, nodes["bn"], slot_of) is None  # it would normalize by the batch


def test_the_runners_torch_op_errors() -> None:
    runner = cpu_backend.extension().ProgramRunner(4)
    with pytest.raises(RuntimeError, match="no torch op of kind 'torch.conv3d'"):
        runner.kernel(1, "torch.conv3d", [0], (), -1, [])
    with pytest.raises(RuntimeError, match="torch.add takes 2 inputs"):
        runner.kernel(1, "torch.add", [0], (), -1, [])
    with pytest.raises(RuntimeError, match="torch.cat takes 1 arguments, got 0"):
        runner.kernel(1, "torch.cat", [0, 0], (), -1, [])
    with pytest.raises(RuntimeError, match="torch.relu returns one tensor"):
        runner.kernel(1, "torch.relu", [0], (False,), 0, [])
    runner.kernel(1, "torch.relu", [0], (False,), -1, [])
    runner.kernel(2, "torch.cat", [0, 1, 0], (1,), -1, [0, 1])
    runner.set_output(2)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(runner.run(x, 1), torch.cat([x, x.relu(), x], 1))
