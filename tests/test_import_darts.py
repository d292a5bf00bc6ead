"""``bnas import darts`` / ``bnas.import_darts``: DARTS genotype text -> bnas genotype.

The parameter counts are DARTS's own: ``NetworkCIFAR(C, 10, L, False, genotype)`` of
quark0/darts ``cnn/model.py`` (PyTorch, its ``genotypes.py``), counted as
``sum(p.numel() for name, p in model.named_parameters() if 'auxiliary' not in name)`` (as
its ``utils.count_parameters_in_MB``), once, by hand, when the importer was written. DARTS's
``train.py`` logs 3.349342 MB for DARTS_V2 at C=36, L=20.
"""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import pytest
import torch

import bnas
from bnas.binarize import binary_layers
from bnas.cli import main
from bnas.errors import BnasError
from bnas.genotype import load_genotype
from bnas.importers import DartsFormatError, DartsGenotype, import_darts, parse_darts
from bnas.importers.darts import BINARY_TWINS, darts_to_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "search_spaces" / "genotypes"

# The genotypes of quark0/darts cnn/genotypes.py, as DARTS prints them (data).
DARTS_V2 = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)
DARTS_V1 = (
    "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
    "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])"
)
NASNET = """Genotype(
  normal = [
    ('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 0), ('avg_pool_3x3', 1),
    ('skip_connect', 0), ('avg_pool_3x3', 0), ('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 1),
  ],
  normal_concat = [2, 3, 4, 5, 6],
  reduce = [
    ('sep_conv_5x5', 1), ('sep_conv_7x7', 0), ('max_pool_3x3', 1), ('sep_conv_7x7', 0), ('avg_pool_3x3', 1),
    ('sep_conv_5x5', 0), ('skip_connect', 3), ('avg_pool_3x3', 2), ('sep_conv_3x3', 2), ('max_pool_3x3', 1),
  ],
  reduce_concat = [4, 5, 6],
)"""
AMOEBANET = """Genotype(
  normal = [
    ('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0),
    ('avg_pool_3x3', 3), ('sep_conv_3x3', 1), ('skip_connect', 1), ('skip_connect', 0), ('avg_pool_3x3', 1),
    ],
  normal_concat = [4, 5, 6],
  reduce = [
    ('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('max_pool_3x3', 0), ('sep_conv_7x7', 2), ('sep_conv_7x7', 0),
    ('avg_pool_3x3', 1), ('max_pool_3x3', 0), ('max_pool_3x3', 1), ('conv_7x1_1x7', 0), ('sep_conv_3x3', 5),
  ],
  reduce_concat = [3, 4, 6]
)"""
GENOTYPES = {"DARTS_V2": DARTS_V2, "DARTS_V1": DARTS_V1, "NASNet": NASNET, "AmoebaNet": AMOEBANET}

# A genotypes.py laid out as DARTS's: the namedtuple, other top-level names, an alias.
GENOTYPES_PY = (
    "from collections import namedtuple\n\n"
    "Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')\n"
    "PRIMITIVES = ['none', 'max_pool_3x3', 'sep_conv_3x3']\n\n"
    + "".join(f"{name} = {text}\n\n" for name, text in GENOTYPES.items())
    + "DARTS = DARTS_V2\n"
)

# DARTS's NetworkCIFAR counts (see the module docstring): (genotype, C, L) -> parameters.
DARTS_COUNTS_FULL = {"DARTS_V1": 3_169_414, "NASNet": 3_830_950, "AmoebaNet": 3_145_078}
DARTS_COUNTS_SMALL = {
    ("DARTS_V1", 16, 8): 232_890,
    ("NASNet", 16, 8): 333_946,
    ("AmoebaNet", 16, 8): 326_330,
    ("DARTS_V2", 8, 5): 37_018,
    ("DARTS_V2", 8, 3): 8_234,  # reductions at cells 1 and 2
    ("DARTS_V2", 6, 4): 18_022,  # reductions at cells 1 and 2: two in a row
    ("NASNet", 8, 4): 58_162,
    ("DARTS_V2", 4, 2): 1_990,  # both cells are reductions
    ("DARTS_V2", 4, 1): 902,  # one cell, a reduction (layers // 3 == 2 * layers // 3)
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def edge_ops(genotype: bnas.Genotype) -> list[str]:
    return [edge.op for cell in genotype.cells.values() for edges in cell.nodes.values() for edge in edges]


@pytest.fixture
def genotypes_py(tmp_path: Path) -> Path:
    path = tmp_path / "genotypes.py"
    path.write_text(GENOTYPES_PY)
    return path


# --------------------------------------------------------------------------------------
# Parameter counts against DARTS's own network
# --------------------------------------------------------------------------------------
def test_darts_v2_has_darts_parameter_count() -> None:
    model = bnas.build(import_darts(DARTS_V2, channels=36, layers=20))
    assert n_params(model) == 3_349_342


@pytest.mark.parametrize("name", sorted(DARTS_COUNTS_FULL))
def test_published_cells_at_full_size_count_as_darts(name: str) -> None:
    # On the meta device: the shapes and parameters without the memory or the time.
    with torch.device("meta"):
        model = bnas.build(import_darts(GENOTYPES[name], channels=36, layers=20))
    assert n_params(model) == DARTS_COUNTS_FULL[name]


@pytest.mark.parametrize(("name", "channels", "layers"), sorted(DARTS_COUNTS_SMALL))
def test_small_networks_count_as_darts(name: str, channels: int, layers: int) -> None:
    model = bnas.build(import_darts(GENOTYPES[name], channels=channels, layers=layers))
    assert n_params(model) == DARTS_COUNTS_SMALL[(name, channels, layers)]


# --------------------------------------------------------------------------------------
# The generated genotype
# --------------------------------------------------------------------------------------
def test_darts_v2_as_a_bnas_genotype() -> None:
    data = darts_to_dict(parse_darts(DARTS_V2), channels=36, layers=20)
    assert data["preprocess"] == "darts"
    assert data["stem"] == [{"op": "conv_bn", "channels": 108, "kernel": 3}]
    assert data["head"] == [{"op": "global_avgpool"}, {"op": "linear"}]
    assert data["input"] == [3, 32, 32] and data["num_classes"] == 10
    # Reduction cells 6 and 13 (20 // 3, 40 // 3) double the width; runs of 6 normal cells.
    assert data["body"] == [
        {"cell": "normal", "channels": 36, "repeat": 6},
        {"cell": "reduce", "channels": 72, "stride": 2},
        {"cell": "normal", "channels": 72, "repeat": 6},
        {"cell": "reduce", "channels": 144, "stride": 2},
        {"cell": "normal", "channels": 144, "repeat": 6},
    ]
    normal = data["cells"]["normal"]
    assert normal["inputs"] == 2
    assert normal["nodes"] == {
        "n0": [["sep_conv_3x3", "in0"], ["sep_conv_3x3", "in1"]],
        "n1": [["sep_conv_3x3", "in0"], ["sep_conv_3x3", "in1"]],
        "n2": [["sep_conv_3x3", "in1"], ["skip_connect", "in0"]],
        "n3": [["skip_connect", "in0"], ["dil_conv_3x3", "n0"]],
    }
    assert normal["output"] == {"combine": "concat", "nodes": ["n0", "n1", "n2", "n3"]}
    assert data["cells"]["reduce"]["nodes"]["n1"] == [["skip_connect", "n0"], ["max_pool_3x3", "in1"]]


def test_partial_concat_and_five_nodes() -> None:
    g = import_darts(NASNET, channels=8, layers=4)
    reduce = g.cells["reduce"]
    assert list(reduce.nodes) == ["n0", "n1", "n2", "n3", "n4"]
    assert reduce.output == ("n2", "n3", "n4")
    assert [(e.op, e.source) for e in reduce.nodes["n3"]] == [("skip_connect", "n1"), ("avg_pool_3x3", "n0")]
    assert g.cells["normal"].output == ("n0", "n1", "n2", "n3", "n4")
    # AmoebaNet's concat is not in order of the nodes; the output keeps its order.
    assert import_darts(AMOEBANET, channels=8, layers=4).cells["reduce"].output == ("n1", "n2", "n4")


def test_small_layer_counts_drop_unused_runs() -> None:
    one = darts_to_dict(parse_darts(DARTS_V2), channels=4, layers=1)
    assert one["body"] == [{"cell": "reduce", "channels": 8, "stride": 2}]
    assert list(one["cells"]) == ["reduce"]  # no normal cell to define
    four = darts_to_dict(parse_darts(DARTS_V2), channels=6, layers=4)
    assert four["body"] == [
        {"cell": "normal", "channels": 6},
        {"cell": "reduce", "channels": 12, "stride": 2},
        {"cell": "reduce", "channels": 24, "stride": 2},
        {"cell": "normal", "channels": 24},
    ]


def test_name_input_and_classes() -> None:
    g = import_darts(DARTS_V2, 8, 5, name="mine", num_classes=100, input_shape=(1, 28, 28))
    assert (g.name, g.num_classes, g.input) == ("mine", 100, (1, 28, 28))
    assert import_darts(DARTS_V2, 8, 5).name == "darts"
    assert import_darts(DARTS_V2, 8, 5, binary=True).name == "darts_binary"


@pytest.mark.parametrize("channels, layers", [(0, 20), (36, 0), (-1, 3), (True, 3), (36, 2.5)])
def test_bad_width_or_depth(channels: int, layers: int) -> None:
    with pytest.raises(BnasError, match="must be a positive integer"):
        import_darts(DARTS_V2, channels, layers)


# --------------------------------------------------------------------------------------
# Text forms
# --------------------------------------------------------------------------------------
V2_NORMAL = (
    "[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), "
    "('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)]"
)
V2_REDUCE = (
    "[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)]"
)


def genotype_text(**fields: str) -> str:
    """DARTS_V2's text with some fields replaced (by their Python source)."""
    values = {
        "normal": V2_NORMAL,
        "normal_concat": "[2, 3, 4, 5]",
        "reduce": V2_REDUCE,
        "reduce_concat": "[2, 3, 4, 5]",
    }
    values.update(fields)
    return "Genotype(" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")"


@pytest.mark.parametrize(
    "text",
    [
        genotype_text(normal_concat="range(2, 6)", reduce_concat="(2, 3, 4, 5)"),
        genotype_text(normal=V2_NORMAL.replace("(", "[").replace(")", "]")),  # pairs as lists
        genotype_text(normal="(" + V2_NORMAL[1:-1] + ",)"),  # a tuple of pairs, trailing comma
        f"Genotype({V2_NORMAL}, range(2, 6), {V2_REDUCE}, [2, 3, 4, 5])",  # positional, namedtuple order
        f"Genotype({V2_NORMAL}, range(2, 6), reduce_concat=[2, 3, 4, 5], reduce={V2_REDUCE})",
        "genotypes.Genotype(" + genotype_text()[len("Genotype(") :],
        "\n  " + DARTS_V2 + "  \n",
        "DARTS_V2 = " + DARTS_V2,  # one assignment: the text of a file
    ],
)
def test_text_forms_parse_alike(text: str) -> None:
    parsed = parse_darts(text)
    reference = parse_darts(DARTS_V2)
    assert (parsed.normal, parsed.normal_concat, parsed.reduce, parsed.reduce_concat) == (
        reference.normal,
        reference.normal_concat,
        reference.reduce,
        reference.reduce_concat,
    )
    assert reference.normal[7] == ("dil_conv_3x3", 2) and reference.normal_concat == (2, 3, 4, 5)


def test_genotypes_file_by_name_and_alias(genotypes_py: Path) -> None:
    nasnet = parse_darts(f"@{genotypes_py}:NASNet")
    assert nasnet.reduce_concat == (4, 5, 6) and nasnet.name == "NASNet" and nasnet.file == str(genotypes_py)
    alias = parse_darts(f"@{genotypes_py}:DARTS")
    assert (alias.name, alias.alias_of) == ("DARTS", "DARTS_V2")
    assert alias.normal == parse_darts(DARTS_V2).normal
    assert alias.describe() == f"DARTS (= DARTS_V2) in {genotypes_py}"
    assert import_darts(f"@{genotypes_py}:DARTS_V1", 8, 5).name == "darts_v1"
    # The whole file's text (no @) with one genotype needs no name.
    single = genotypes_py.with_name("one.py")
    single.write_text("from collections import namedtuple\nGenotype = namedtuple('G', 'a b c d')\nV1 = " + DARTS_V1)
    assert parse_darts(f"@{single}").name == "V1"
    assert parse_darts(single.read_text()).normal == parse_darts(DARTS_V1).normal


def test_genotypes_file_errors(genotypes_py: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DartsFormatError, match=r"4 genotypes \(DARTS_V2, DARTS_V1, NASNet, AmoebaNet\); pick one with @FILE:NAME"
    ):
        parse_darts(f"@{genotypes_py}")
    with pytest.raises(DartsFormatError) as info:
        parse_darts(f"@{genotypes_py}:PDARTS")
    assert str(info.value) == (
        f"{genotypes_py}: no assignment PDARTS = Genotype(...); the genotypes here: DARTS_V2, DARTS_V1, NASNet, AmoebaNet"
    )
    loop = tmp_path / "loop.py"
    loop.write_text(f"A = B\nB = A\nC = {DARTS_V1}\n")
    with pytest.raises(DartsFormatError, match="go round in a circle: A = B = A"):
        parse_darts(f"@{loop}:A")
    with pytest.raises(DartsFormatError, match="cannot read it"):
        parse_darts(f"@{tmp_path / 'missing.py'}")
    with pytest.raises(DartsFormatError, match="is a folder"):
        parse_darts(f"@{tmp_path}")
    bad = tmp_path / "bad.py"
    bad.write_text(f"X = {DARTS_V2}\nY = {DARTS_V2.replace('dil_conv_3x3', '')}\n")
    with pytest.raises(DartsFormatError) as info:
        parse_darts(f"@{bad}:Y")
    assert str(info.value) == f"{bad}: Y.normal[7][0]: expected an op name (a non-empty string), got ''"


MALFORMED = [
    ("Genotype(normal=[('sep_conv_3x3', 0)]", "not Python syntax"),
    ("Genotyp(normal=[])", "expected Genotype(normal=[(op, index), ...], normal_concat=[...], reduce=[...], reduce_concat=[...]), got Genotyp(normal=[])"),
    ("[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]", "expected Genotype("),
    (genotype_text(extra="1"), "Genotype(...): unknown field 'extra'; expected normal, normal_concat, reduce, reduce_concat"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2])", "Genotype(...): missing field(s) reduce, reduce_concat"),
    (f"Genotype({V2_NORMAL}, normal={V2_NORMAL}, normal_concat=[2, 3, 4, 5], reduce={V2_REDUCE}, reduce_concat=[2])", "Genotype(...): field normal is given twice"),
    (f"Genotype({V2_NORMAL}, [2], {V2_REDUCE}, [2], [3])", "Genotype(...): 5 positional arguments"),
    ("Genotype(**fields)", "Genotype(...): **fields is not accepted"),
    (genotype_text(normal="[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0)]", normal_concat="[2]"), "normal: 3 edges, an odd number; a DARTS cell has two per node"),
    (genotype_text(normal="[]"), "normal: no edges"),
    (genotype_text(normal="[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)]", normal_concat="[2]"), "normal[1][1]: input 2 is not an earlier state: edge 1 belongs to node 0 (state 2), which may read states 0 to 1"),
    (genotype_text(normal="[('sep_conv_3x3', 0, 1), ('sep_conv_3x3', 1)]", normal_concat="[2]"), "normal[0]: expected a pair (op name, input index), got ('sep_conv_3x3', 0, 1)"),
    (genotype_text(normal="[(3, 0), ('sep_conv_3x3', 1)]", normal_concat="[2]"), "normal[0][0]: expected an op name (a non-empty string), got 3"),
    (genotype_text(reduce="[('max_pool_3x3', -1), ('max_pool_3x3', 1)]", reduce_concat="[2]"), "reduce[0][1]: expected an input index (a non-negative int), got -1"),
    (genotype_text(reduce="[('max_pool_3x3', True), ('max_pool_3x3', 1)]", reduce_concat="[2]"), "reduce[0][1]: expected an input index (a non-negative int), got True"),
    (genotype_text(normal="'sep_conv_3x3'"), "normal: expected a list of (op name, input index) pairs, got 'sep_conv_3x3'"),
    (genotype_text(normal_concat="[2, 3, 4, 5, 6]"), "normal_concat[4]: state 6 is not a node of the cell; its 4 node(s) are states 2 to 5"),
    (genotype_text(normal_concat="[1, 2, 3, 4, 5]"), "normal_concat[0]: state 1 is not a node of the cell"),
    (genotype_text(normal_concat="range(6)"), "normal_concat: range(6) includes state 0, which is not a node of the cell"),
    (genotype_text(reduce_concat="range(2, 7)"), "reduce_concat: range(2, 7) includes state 6, which is not a node"),
    (genotype_text(normal_concat="[2, 3, 3, 4, 5]"), "normal_concat[2]: state 3 is listed twice"),
    (genotype_text(normal_concat="[]"), "normal_concat: empty"),
    (genotype_text(normal_concat="'2345'"), "normal_concat: expected range(a, b) or a list of state indices, got '2345'"),
    (genotype_text(normal_concat="range(2, n)"), "normal_concat: expected range(a, b) with literal ints, got range(2, n)"),
    (genotype_text(normal_concat="[2, 3, 4]"), "normal: state 5 (node 3, edges 6 and 7) is neither in normal_concat nor an input of a later node that is: DARTS would compute it and discard it"),
    (genotype_text(reduce_concat="[2, 3, 4]"), "reduce: state 5 (node 3, edges 6 and 7) is neither in reduce_concat"),
    # state 2 feeds only state 3, which feeds nothing: both are dead, the first is named
    (genotype_text(normal="[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 2), ('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]", normal_concat="[4]"), "normal: state 2 (node 0, edges 0 and 1) is neither in normal_concat nor an input of a later node that is"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[m[:40] for _, m in MALFORMED])
def test_malformed_text_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(DartsFormatError) as info:
        import_darts(text, 8, 5)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BnasError)


def test_hostile_text_is_never_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the importer ran code")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    run = "__import__('os').system('touch X')"
    for text, message in [
        (f"Genotype(normal={run}, normal_concat=[2], reduce=[], reduce_concat=[2])", f"normal: expected a list of (op name, input index) pairs, got {run}"),
        (genotype_text(normal=f"[({run}, 0), ('skip_connect', 1)]"), "normal[0][0]: expected an op name"),
        (genotype_text(normal_concat=f"range({run})"), "normal_concat: expected range(a, b) with literal ints"),
        (f"{run}", "expected Genotype("),
        (f"Genotype(*{run})", "Genotype(...): *__import__"),
    ]:  # fmt: skip
        with pytest.raises(DartsFormatError) as info:
            import_darts(text, 8, 5)
        assert message in str(info.value)
    # A genotypes file whose other statements would run something: only the assignment is read.
    source = tmp_path / "genotypes.py"
    source.write_text(f"import os\nos.system('touch X')\n{run}\nG = {DARTS_V2}\n")
    assert parse_darts(f"@{source}:G").normal == parse_darts(DARTS_V2).normal
    assert not (tmp_path / "X").exists()


# --------------------------------------------------------------------------------------
# Binary twin and op names
# --------------------------------------------------------------------------------------
def test_binary_import_builds_and_runs() -> None:
    g = import_darts(DARTS_V2, channels=8, layers=5, binary=True)
    ops = edge_ops(g)
    assert not {op for op in ops if op in BINARY_TWINS}, "a real sep/dil conv left in the binary twin"
    assert ops.count("binary_sep_conv_3x3") == 5 and ops.count("binary_dil_sep_conv_3x3") == 1
    assert {"skip_connect", "max_pool_3x3"} <= set(ops)
    assert g.to_dict()["preprocess"] == "binary"
    assert [layer.op for layer in g.stem] == ["conv_bn"] and [layer.op for layer in g.head] == [
        "global_avgpool",
        "linear",
    ]
    model = bnas.build(g)
    binary = {id(m) for m in binary_layers(model)}
    assert binary, "no binary layers in the binary twin"
    assert not [name for name, m in model.named_modules() if id(m) in binary and name.startswith(("stem", "head"))]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_binary_import_warns_once_about_ops_without_a_twin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bnas"):
        g = import_darts(AMOEBANET, channels=8, layers=4, binary=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "conv_7x1_1x7" in warnings[0] and "stays real" in warnings[0]
    assert "conv_7x1_1x7" in edge_ops(g) and "binary_sep_conv_7x7" in edge_ops(g)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bnas"):
        import_darts(DARTS_V2, channels=8, layers=4, binary=True)
    assert not caplog.records


def test_op_map() -> None:
    kim = genotype_text(normal="[('bin_conv_3x3', 0), ('bin_dil_conv_3x3', 1)]", normal_concat="[2]")
    with pytest.raises(DartsFormatError) as info:
        import_darts(kim, 8, 5)
    assert str(info.value).startswith("normal[0][0]: unknown op 'bin_conv_3x3': bnas has no op of that name")
    assert "--map bin_conv_3x3=NEW" in str(info.value)
    g = import_darts(kim, 8, 5, op_map={"bin_conv_3x3": "binary_conv_3x3", "bin_dil_conv_3x3": "binary_dil_conv_3x3"})
    assert [e.op for e in g.cells["normal"].nodes["n0"]] == ["binary_conv_3x3", "binary_dil_conv_3x3"]
    # Applied last: over the binary twin, keyed by the DARTS name or the twin's.
    g = import_darts(DARTS_V2, 8, 5, binary=True, op_map={"sep_conv_3x3": "xnor_conv_3x3_noskip"})
    assert "xnor_conv_3x3_noskip" in edge_ops(g) and "binary_sep_conv_3x3" not in edge_ops(g)
    g = import_darts(DARTS_V2, 8, 5, binary=True, op_map={"binary_dil_sep_conv_3x3": "binary_dil_conv_3x3"})
    assert "binary_dil_conv_3x3" in edge_ops(g)
    with pytest.raises(DartsFormatError, match=r"'sep_conv_3x3' maps to 'sep_conv_3x4', which is not a bnas op"):
        import_darts(DARTS_V2, 8, 5, op_map={"sep_conv_3x3": "sep_conv_3x4"})


# --------------------------------------------------------------------------------------
# Files: round trip, the shipped genotypes, the command
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True])
def test_round_trip(binary: bool, tmp_path: Path) -> None:
    g = import_darts(NASNET, 8, 5, binary=binary)
    path = tmp_path / "nasnet.yaml"
    g.to_yaml(path, header="test")
    again = load_genotype(path)
    assert again == g and again.to_dict() == g.to_dict()
    assert again.canonical_hash() == g.canonical_hash()


@pytest.mark.parametrize(("file", "binary"), [("darts_v2.yaml", False), ("darts_v2_binary.yaml", True)])
def test_shipped_darts_v2_is_a_fresh_import(file: str, binary: bool) -> None:
    shipped = load_genotype(SHIPPED / file)
    fresh = import_darts(DARTS_V2, 36, 20, binary=binary, name=Path(file).stem)
    assert shipped == fresh and shipped.canonical_hash() == fresh.canonical_hash()
    header = (SHIPPED / file).read_text().split("\nname:")[0]
    assert "quark0/darts" in header and "DARTS: Differentiable Architecture Search" in header
    assert f'bnas import darts "{DARTS_V2}" --channels 36 --layers 20' in header
    assert f"--out search_spaces/genotypes/{file}" in header


def test_cli_imports_from_a_genotypes_file(
    genotypes_py: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "darts.yaml"
    argv = ["import", "darts", f"@{genotypes_py}:DARTS", "--channels", "8", "--layers", "5", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "37,018 parameters" in err  # DARTS's count at C=8, L=5
    g = load_genotype(out)
    assert g == import_darts(DARTS_V2, 8, 5, name="darts")
    text = out.read_text()
    assert f"# Imported from the DARTS genotype DARTS (= DARTS_V2) in {genotypes_py}." in text
    assert f"#   bnas import darts @{genotypes_py}:DARTS --channels 8 --layers 5 --out {out}\n" in text
    # --binary and --map reach the importer.
    argv = ["import", "darts", f"@{genotypes_py}:AmoebaNet", "--channels", "8", "--layers", "4", "--binary"]
    argv += ["--map", "conv_7x1_1x7=binary_conv_3x3", "--name", "amoeba", "--out", str(out)]
    assert main(argv) == 0
    g = load_genotype(out)
    assert g.name == "amoeba" and "binary_conv_3x3" in edge_ops(g) and "conv_7x1_1x7" not in edge_ops(g)
    assert "no binary twin" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Genotype(normal=1)"], "error: Genotype(...): missing field(s) normal_concat, reduce, reduce_concat"),
        ([DARTS_V2.replace("dil_conv_3x3", "bin_conv_3x3")], "--map bin_conv_3x3=NEW"),
        (["@nowhere.py:DARTS"], "cannot read it"),
        ([DARTS_V2, "--map", "skip_connect=nothing"], "'skip_connect' maps to 'nothing', which is not a bnas op"),
    ],
)
def test_cli_errors_are_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g.yaml"
    assert main(["import", "darts", *args, "--channels", "8", "--layers", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_a_folder_as_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "darts", DARTS_V2, "--channels", "8", "--layers", "5", "--out", str(tmp_path)]) == 2
    assert "is an existing folder" in capsys.readouterr().err


def test_darts_genotype_is_plain_data() -> None:
    parsed = parse_darts(DARTS_V2)
    assert isinstance(parsed, DartsGenotype) and parsed.name is None and parsed.file is None
    assert parsed.describe() == "Genotype(...)"
