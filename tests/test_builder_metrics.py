"""Genotype -> nn.Module, and the metric counts against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnas
from bnas.binarize import BinarizeConfig, BinaryConv2d, BinaryLinear, binary_layers, set_binarization
from bnas.builder import Cell
from bnas.cli import main
from bnas.genotype import loads_genotype
from bnas.metrics import summarize
from bnas.ops.basic import Zero

REPO = Path(__file__).resolve().parents[1]
GENOTYPES = sorted((REPO / "search_spaces" / "genotypes").glob("*.yaml"))
# Shipped real-valued on purpose: DARTS's own network, the baseline of its binary twin.
REAL_BASELINES = {"darts_v2"}


@pytest.mark.parametrize("path", GENOTYPES, ids=lambda p: p.stem)
def test_every_shipped_genotype_builds_and_runs(path: Path) -> None:
    genotype = bnas.load_genotype(path)
    model = bnas.build(genotype)
    model.eval()
    x = torch.randn(2, *genotype.input)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, genotype.num_classes)
    assert torch.isfinite(out).all()
    if path.stem not in REAL_BASELINES:
        assert any(True for _ in binary_layers(model)), "a binary network without binary layers"


@pytest.mark.parametrize("path", GENOTYPES, ids=lambda p: p.stem)
def test_bnas_info_works_on_every_genotype(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("params_real", "params_binary", "bops", "flops", "ops", "size_bytes"):
        assert key in info
    if path.stem in REAL_BASELINES:
        assert info["params_binary"] == 0 and info["bops"] == 0 and info["params_real"] > 0
    else:
        assert info["params_binary"] > 0 and info["bops"] > 0
    assert info["ops"] == pytest.approx(info["bops"] / 64 + info["flops"])


def test_cell_network_trains_one_step() -> None:
    model = bnas.build(REPO / "search_spaces" / "genotypes" / "example_cells.yaml")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # Every binary layer learns: its latent (real) weights get a nonzero gradient through the
    # straight-through estimator. One dead layer (a detached path, a zero STE window) fails.
    names = {id(m): n for n, m in model.named_modules()}
    layers = list(binary_layers(model))
    assert len(layers) >= 8, f"expected the cells' binary convs, found {len(layers)} binary layers"
    for layer in layers:
        g = layer.weight.grad
        assert g is not None, f"{names[id(layer)]}: no gradient reaches the latent weights"
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{names[id(layer)]}: zero gradient on the latent weights"
    before = [layer.weight.detach().clone() for layer in layers]
    opt.step()
    assert all(not torch.equal(b, layer.weight) for b, layer in zip(before, layers, strict=True))


def test_odd_sizes_through_reduce_cells() -> None:
    text = """
name: odd
input: [3, 5, 5]
num_classes: 2
stem:
  - {op: conv_bn, channels: 8}
cells:
  c:
    inputs: 2
    nodes:
      n0: [[binary_conv_3x3, in1], [factorized_reduce, in0]]
    output: {combine: sum, nodes: [n0]}
body:
  - {cell: c, channels: 8, stride: 2}
  - {cell: c, channels: 16}
  - {cell: c, channels: 16, stride: 2}
head:
  - {op: global_avgpool}
  - {op: linear}
"""
    model = bnas.build(loads_genotype(text))
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 2)
    # The second cell's in0 is still at 5x5 while in1 is 3x3: aligned by a factorized reduce.
    second = model.body[1]
    assert second.pre0 is not None and not isinstance(second.pre0, nn.Identity)


def test_full_precision_twin_has_no_binarization() -> None:
    genotype = bnas.load_genotype(REPO / "search_spaces" / "genotypes" / "binary_lenet5.yaml")
    real = bnas.build(genotype, binarize=False)
    for layer in binary_layers(real):
        assert not layer.input_quantizer.enabled and not layer.kernel_quantizer.enabled
    summary = summarize(real, genotype.input)
    assert summary.bops == 0 and summary.params_binary == 0 and summary.flops > 0


class _ConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = BinaryConv2d(c_in, c_out, 3, stride, 1, config=BinarizeConfig("ste", "xnor"))
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_user_primitive_in_genotype_and_hand_computed_metrics() -> None:
    @bnas.register_primitive("test_user_conv_bn", override=True)
    def user_conv_bn(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
        return _ConvBN(C_in, C_out, stride)

    with pytest.raises(ValueError, match="already registered"):
        bnas.register_primitive("test_user_conv_bn", user_conv_bn)

    text = """
name: hand
input: [1, 4, 4]
num_classes: 3
body:
  - {op: test_user_conv_bn, channels: 2}
head:
  - {op: flatten}
  - {op: linear}
"""
    genotype = loads_genotype(text)
    model = bnas.build(genotype)
    s = summarize(model, genotype.input)
    # Binary conv 1->2, 3x3, padding 1 on 4x4: 18 binary weights, 2*4*4 outputs x 9 taps = 288 BOPs.
    assert s.params_binary == 18
    assert s.bops == 288
    # BN: 2 weights + 2 biases (real params), 2 running means + 2 variances (buffers).
    # Linear 32 -> 3: 96 weights + 3 biases, 96 MACs.
    assert s.params_real == 4 + 99
    assert s.buffers_real == 4
    assert s.flops == 96
    assert s.ops == pytest.approx(288 / 64 + 96)
    assert s.size_bytes == pytest.approx(18 / 8 + (103 + 4) * 4)
    assert s.float32_size_bytes == (18 + 103 + 4) * 4
    assert s.compression == pytest.approx(500 / 430.25)
    assert "OPs = BOPs/64 + FLOPs" in s.table()


def test_metrics_count_what_each_binary_layer_computes() -> None:
    # A binary-weight first layer on real pixels, then an XNOR layer: 1-bit weights in both,
    # but only the second one's MACs are BOPs. Hand counts on a 1x4x4 input, padding 1:
    # conv1 1->2 3x3: 18 weights, 2*16*9 = 288 MACs; conv2 2->2 3x3: 36 weights, 2*16*18 = 576.
    model = nn.Sequential(
        BinaryConv2d(1, 2, 3, padding=1, config=BinarizeConfig("none", "sign")),
        BinaryConv2d(2, 2, 3, padding=1, config=BinarizeConfig("ste", "xnor")),
        nn.Flatten(),
        BinaryLinear(32, 3, config=BinarizeConfig("ste", "none")),
    )
    s = summarize(model, [1, 4, 4])
    assert (s.params_binary, s.params_real, s.bops, s.flops) == (18 + 36, 96, 576, 288 + 96)
    # The two-step schedule's first step: weights real again, no layer is fully binary.
    set_binarization(model, activations=True, weights=False)
    s = summarize(model, [1, 4, 4])
    assert (s.params_binary, s.params_real, s.bops, s.flops) == (0, 18 + 36 + 96, 0, 288 + 576 + 96)


def test_info_graph_draws_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cells.png"
    assert main(["info", str(REPO / "search_spaces" / "genotypes" / "example_cells.yaml"), "--graph", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_primitives_command_lists_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["primitives"]) == 0
    text = capsys.readouterr().out
    for name in ("xnor_resnet_block", "bireal_block", "skip_connect", "zero", "factorized_reduce"):
        assert any(line.split()[0] == name for line in text.splitlines()[1:])


def _path_enters(path, box) -> bool:  # noqa: ANN001 (matplotlib Path and Bbox)
    """Whether any point of the drawn path (curves evaluated, not their control points) is in the box."""
    import numpy as np

    ts = np.linspace(0.0, 1.0, 40)
    for bezier, _ in path.iter_bezier():
        points = bezier(ts)
        if box.count_contains(points) > 0:
            return True
    return False


def test_cell_picture_labels_sit_on_their_own_edge_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each op label of `bnas info --graph` touches its own arc and no other (issue 11: the
    bireal_resnet_block label of n0->n1 sat on the n0->out edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    from bnas.visualize import _layout, draw_cells

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    genotype = bnas.load_genotype(REPO / "search_spaces" / "genotypes" / "example_cells.yaml")
    draw_cells(genotype, tmp_path / "cells.png")
    monkeypatch.setattr(plt, "close", real_close)
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.patches]
    checked = 0
    for ax, (name, g) in zip(axes, genotype.cell_graphs().items(), strict=True):
        pos = {n: ax.transData.transform(p) for n, p in _layout(g).items()}
        # Which edge is each drawn arc? The nearest nodes to its two ends.
        arcs: dict[tuple[str, str], list] = {}
        for patch in ax.patches:
            if not isinstance(patch, FancyArrowPatch):
                continue
            path = patch.get_transform().transform_path(patch.get_path())
            # The arc is the first curve of the path (after a move-to); the arrow head follows.
            arc = next(b for b, _ in path.iter_bezier() if len(b.control_points) > 1)
            start, end = arc.control_points[0], arc.control_points[-1]
            u = min(pos, key=lambda n: float(((pos[n] - start) ** 2).sum()))
            v = min((n for n in pos if n != u), key=lambda n: float(((pos[n] - end) ** 2).sum()))
            arcs.setdefault((u, v), []).append(path)
        assert len(sum(arcs.values(), [])) == g.number_of_edges()
        for text in ax.texts:
            label = text.get_text()
            if label in g.nodes:
                continue
            own = [(u, v) for u, v, data in g.edges(data=True) if data["op"] == label]
            box = text.get_window_extent(renderer)
            touching = {key for key, paths in arcs.items() for p in paths if _path_enters(p, box)}
            assert touching and touching <= set(own), (
                f"cell {name}: label {label!r} of {own} touches the arcs {sorted(touching)}"
            )
            checked += 1
    assert checked == sum(1 for g in genotype.cell_graphs().values() for _, v in g.edges() if v != "out")


def test_a_type_error_inside_a_user_primitive_keeps_its_traceback() -> None:
    @bnas.register_primitive("test_buggy_op", override=True)
    def buggy(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
        return nn.Conv2d(C_in, C_out, 3, stride, padding="same", bogus=1)  # a bug in the user's own code

    text = "name: b\ninput: [1, 4, 4]\nnum_classes: 3\nbody: [{op: test_buggy_op, channels: 2}]\nhead: [{op: flatten}, {op: linear}]\n"
    with pytest.raises(bnas.GenotypeError) as info:
        bnas.build(loads_genotype(text))
    err = info.value
    assert err.path == "body[0]" and "cannot build test_buggy_op" in err.message
    assert isinstance(err.__cause__, TypeError) and "bogus" in str(err.__cause__)
    # The chained traceback reaches into the user's function.
    frames = []
    tb = err.__cause__.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "buggy" in frames


def _reference_cell_forward(cell: Cell, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """The cell as the YAML reads: nodes in file order, edges summed in list order."""
    states = {"in1": cell.pre1(s1)}
    if cell.pre0 is not None:
        states["in0"] = cell.pre0(s0)
    for node, edges in cell.spec.nodes.items():
        total = cell.edges[f"{node}_0"](states[edges[0].source])
        for i in range(1, len(edges)):
            total = total + cell.edges[f"{node}_{i}"](states[edges[i].source])
        states[node] = total
    outs = [states[n] for n in cell.spec.output]
    return torch.cat(outs, dim=1) if cell.spec.combine == "concat" else torch.stack(outs).sum(0)


def test_cell_sums_skip_zero_edges_and_keep_the_values() -> None:
    # A zero edge adds nothing: the plan leaves it out (and so do traces and exports of the
    # network), a node of zero edges alone keeps one, and the cell's output is the reference
    # sum's, which adds the zeros.
    text = """
name: zeros
input: [3, 8, 8]
num_classes: 4
stem: [{op: conv_bn, channels: 8}]
cells:
  c:
    nodes:
      n0: [[zero, in1], [binary_conv_3x3, in1], [zero, in0]]
      n1: [[zero, n0], [zero, in1]]
      n2: [[max_pool_3x3, n0], [skip_connect, n1], [zero, in0]]
    output: {combine: concat, nodes: [n0, n1, n2]}
body: [{cell: c, channels: 8}, {cell: c, channels: 8, stride: 2}]
head: [{op: global_avgpool}, {op: linear}]
"""
    model = bnas.build(loads_genotype(text)).eval()
    cells = [unit for unit in model.body if isinstance(unit, Cell)]
    assert cells[0].plan == [
        ("n0", [("n0_1", "in1")]),
        ("n1", [("n1_0", "n0")]),
        ("n2", [("n2_0", "n0"), ("n2_1", "n1")]),
    ]
    zeros_run: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, Zero):
            module.register_forward_hook(lambda m, args, out, name=name: zeros_run.append(name))
    with torch.no_grad():
        s0 = s1 = model.stem(torch.randn(2, 3, 8, 8))
        for unit in cells:
            out = unit(s0, s1)
            assert torch.equal(out, _reference_cell_forward(unit, s0, s1))
            channels = out.shape[1] // 3
            assert not out[:, channels : 2 * channels].any()  # n1: zeros of the cell's shape
            s0, s1 = s1, out
    # the reference ran every zero edge; the cells' own forwards only n1's first
    assert zeros_run.count("body.0.edges.n1_0") == 2 and "body.0.edges.n0_0" in zeros_run
    zeros_run.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    assert zeros_run == ["body.0.edges.n1_0", "body.1.edges.n1_0"]


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_cell_runs_the_plan_compiled_from_its_graph(combine: str) -> None:
    # Nodes with several edges, some from the same source, and an output list in another
    # order than the nodes: the compiled plan must follow the graph and the edge slots.
    text = f"""
name: plan
input: [3, 8, 8]
num_classes: 4
stem: [{{op: conv_bn, channels: 8}}]
cells:
  c:
    nodes:
      n0: [[binary_conv_3x3, in1], [skip_connect, in0]]
      n1: [[max_pool_3x3, n0], [binary_conv_3x3, in1], [skip_connect, n0]]
      n2: [[skip_connect, n1], [avg_pool_3x3, n0]]
    output: {{combine: {combine}, nodes: [n2, n0, n1]}}
body: [{{cell: c, channels: 8}}, {{cell: c, channels: 8, stride: 2}}]
head: [{{op: global_avgpool}}, {{op: linear}}]
"""
    genotype = loads_genotype(text)
    model = bnas.build(genotype).eval()
    cells = [unit for unit in model.body if isinstance(unit, Cell)]
    assert len(cells) == 2
    cell = cells[0]
    assert cell.order == ["n0", "n1", "n2"] and cell.outputs == ["n2", "n0", "n1"]
    assert cell.plan[1] == ("n1", [("n1_0", "n0"), ("n1_1", "in1"), ("n1_2", "n0")])
    # The modules keep their names, as before the plan was compiled, so checkpoints still load.
    assert list(cell.edges) == ["n0_0", "n0_1", "n1_0", "n1_1", "n1_2", "n2_0", "n2_1"]
    assert {k.split(".")[1] for k in cell.state_dict() if k.startswith("edges.")} == {"n0_0", "n1_1"}
    with torch.no_grad():
        s0 = s1 = model.stem(torch.randn(2, 3, 8, 8))
        for unit in cells:
            out = unit(s0, s1)
            assert torch.equal(out, _reference_cell_forward(unit, s0, s1))
            s0, s1 = s1, out
