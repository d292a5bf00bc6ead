"""Genotype YAML: round trips, validation errors that name file and path, the CLI's exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_GENOTYPE

import bnas
from bnas.builder import check_ops
from bnas.cli import main
from bnas.errors import GenotypeError
from bnas.genotype import cell_graph, load_genotype, loads_genotype

REPO = Path(__file__).resolve().parents[1]
GENOTYPES = sorted((REPO / "search_spaces" / "genotypes").glob("*.yaml"))

VALID = TINY_GENOTYPE.read_text()


def test_shipped_genotypes_exist() -> None:
    names = {p.stem for p in GENOTYPES}
    assert {
        "binarynet_mlp",
        "bnn_mlp_2048",
        "binary_lenet5",
        "xnor_resnet18",
        "bireal_resnet18",
        "binary_vgg_small",
        "binary_nin",
        "example_cells",
    } <= names


@pytest.mark.parametrize("path", GENOTYPES, ids=lambda p: p.stem)
def test_load_save_load_is_identity(path: Path, tmp_path: Path) -> None:
    first = load_genotype(path)
    out = tmp_path / "g.yaml"
    first.to_yaml(out)
    second = load_genotype(out)
    assert second == first
    assert second.to_dict() == first.to_dict()
    assert second.canonical_hash() == first.canonical_hash()


def test_a_genotype_keeps_its_values_as_written() -> None:
    """The schema validates the file, but the genotype is built from the values as written:
    the schema's model would turn ``lr: 1`` into 1.0, and a hash must not move."""
    text = VALID + "training: {epochs: 2, optimizer: {name: sgd, lr: 1}}\n"
    g = loads_genotype(text)
    assert g.training == {"epochs": 2, "optimizer": {"name": "sgd", "lr": 1}}
    assert type(g.training["optimizer"]["lr"]) is int
    assert g.stem[0].options == {"kernel": 3} and g.cells["normal"].inputs == 2
    assert g.canonical_hash() == loads_genotype(g.to_yaml()).canonical_hash()
    assert loads_genotype(text.replace("nodes: [n0, n1]", "nodes: [n1, n0]")).canonical_hash() != g.canonical_hash()


def test_parsed_data_that_is_not_a_mapping_is_one_line() -> None:
    from bnas.genotype import genotype_from_dict

    with pytest.raises(GenotypeError) as info:
        genotype_from_dict([1, 2], "g.yaml")  # type: ignore[arg-type]
    assert str(info.value) == "g.yaml: (top level): expected a YAML mapping at the top level, got a list"


def test_cell_graph_structure() -> None:
    g = loads_genotype(VALID)
    graph = cell_graph(g.cells["normal"])
    assert set(graph.nodes) == {"in0", "in1", "n0", "n1", "out"}
    ops = sorted(d["op"] for _, _, d in graph.edges(data=True))
    assert ops == ["binary_conv_3x3", "concat", "concat", "skip_connect", "skip_connect"]


def _error(text: str) -> GenotypeError:
    """The first error of loading ``text`` and resolving its ops (the builder's part)."""
    with pytest.raises(GenotypeError) as info:
        check_ops(loads_genotype(text, file="bad.yaml"), file="bad.yaml")
    return info.value


def test_parsing_checks_structure_only_and_the_builder_resolves_op_names(tmp_path: Path) -> None:
    # A genotype is plain data: an unknown op loads, and building it names file and path.
    text = VALID.replace("binary_conv_3x3, in1", "binary_conv_3x4, in1")
    genotype = loads_genotype(text, file="bad.yaml")
    assert genotype.cells["normal"].nodes["n0"][0].op == "binary_conv_3x4"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GenotypeError) as info:
        bnas.build(path)
    assert info.value.file == str(path) and info.value.path == "cells.normal.nodes.n0[0][0]"
    assert "unknown op 'binary_conv_3x4'; did you mean binary_conv_3x3" in info.value.message
    # Layer ops too, at the op key.
    with pytest.raises(GenotypeError) as info:
        bnas.build(loads_genotype(VALID.replace("{op: linear}", "{op: linaer}")))
    assert info.value.path == "head[1].op" and "did you mean linear" in info.value.message


@pytest.mark.parametrize(
    "old,new,path,fragment",
    [
        ("binary_conv_3x3, in1", "binary_conv_3x4, in1", "cells.normal.nodes.n0[0][0]", "did you mean binary_conv_3x3"),
        ("[skip_connect, n0]", "[skip_connect, n9]", "cells.normal.nodes.n1[0][1]", "unknown input or node 'n9'"),
        ("{cell: normal, channels: 8}", "{cell: normal2, channels: 8}", "body[0].cell", "unknown cell 'normal2'"),
        ("{cell: normal, channels: 8}", "{cell: normal, channels: -8}", "body[0].channels", "positive integer"),
        (
            "{cell: normal, channels: 8}",
            "{cell: normal, channels: eight}",
            "body[0].channels",
            "positive integer, got 'eight'",
        ),
        ("{cell: normal, channels: 8}", "{cell: normal, channels: 8, repeat: 0}", "body[0].repeat", "positive integer"),
        ("num_classes: 4", "num_classes: 0", "num_classes", "positive integer"),
        ("combine: concat", "combine: product", "cells.normal.output.combine", "invalid combine 'product'"),
        ("input: [3, 8, 8]", "input: [3, 8]", "input", "expected [C, H, W]"),
        ("[skip_connect, in0]]", "[skip_connect, n1]]", "cells.normal.nodes", "cycle"),
        ("inputs: 2", "inputs: 3", "cells.normal.inputs", "expected inputs: 1 or 2"),
        ("name: tiny", "nmae: tiny", "nmae", "did you mean 'name'"),
        ("{cell: normal, channels: 8}", "{cell: normal, channels: 8, stride: 3}", "body[0].stride", "stride 1 or 2"),
    ],
)
def test_bad_genotypes_name_file_path_and_culprit(old: str, new: str, path: str, fragment: str) -> None:
    assert old in VALID
    err = _error(VALID.replace(old, new, 1))
    assert err.file == "bad.yaml"
    assert err.path == path
    assert fragment in err.message
    assert str(err).startswith(f"bad.yaml: {path}: ")
    assert "\n" not in str(err)


def test_forward_reference_to_later_node() -> None:
    text = VALID.replace("n0: [[binary_conv_3x3, in1], [skip_connect, in0]]", "n0: [[binary_conv_3x3, n1]]")
    text = text.replace("n1: [[skip_connect, n0]]", "n1: [[skip_connect, in1]]")
    err = _error(text)
    assert err.path == "cells.normal.nodes.n0[0][1]"
    assert "not an earlier node" in err.message


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "the file is empty"),
        ("- 1\n- 2\n", "expected a YAML mapping at the top level, got a list"),
        ("name: [unclosed\n", "invalid YAML"),
        (
            "name: !!python/object/apply:os.system ['echo hacked']\n",
            "invalid YAML: tags that construct Python objects are not allowed",
        ),
    ],
)
def test_unreadable_yaml(text: str, fragment: str) -> None:
    err = _error(text)
    assert fragment in str(err)
    assert str(err).startswith("bad.yaml")


def test_missing_file_is_a_genotype_error(tmp_path: Path) -> None:
    with pytest.raises(GenotypeError, match="no such genotype file"):
        load_genotype(tmp_path / "missing.yaml")


def test_cli_reports_bad_genotype_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("binary_conv_3x3, in1", "binary_conv_3x4, in1"))
    proc = subprocess.run([sys.executable, "-m", "bnas", "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(bad) in lines[0] and "cells.normal.nodes.n0[0][0]" in lines[0] and "binary_conv_3x4" in lines[0]


def test_cli_rejects_python_tags_without_running_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "tag.yaml"
    bad.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["info", str(bad)]) == 2
    assert not marker.exists()
    assert "not allowed" in capsys.readouterr().err


def test_shape_mismatch_names_the_layer() -> None:
    text = """
name: bad_shapes
input: [1, 8, 8]
num_classes: 3
body:
  - {op: binary_linear, channels: 16}
head:
  - {op: linear}
"""
    with pytest.raises(GenotypeError) as info:
        bnas.build(loads_genotype(text, file="shapes.yaml"))
    assert info.value.path == "body[0]"


def test_head_must_produce_class_scores() -> None:
    text = """
name: no_head
input: [3, 8, 8]
num_classes: 3
body:
  - {op: conv_bn, channels: 4}
"""
    with pytest.raises(GenotypeError, match="expected \\[3\\]"):
        bnas.build(loads_genotype(text))


def test_op_option_typo_suggests_the_closest_option() -> None:
    text = "name: t\ninput: [3, 8, 8]\nnum_classes: 10\nbody:\n  - {op: bireal_block, chanels: 16}\n"
    err = _error(text)
    assert err.path == "body[0].chanels"
    assert err.message == (
        "unknown option 'chanels' for bireal_block; did you mean 'channels'? "
        "valid: channels, stride, repeat, activation, binarize"
    )
    # An edge option typo in a cell lists the op's own options.
    cell = """
name: t
input: [3, 8, 8]
num_classes: 10
cells:
  c:
    nodes:
      n0: [[pool, in1, {kernal: 5}]]
    output: {nodes: [n0]}
body: [{cell: c, channels: 8}]
"""
    err = _error(cell)
    assert err.path == "cells.c.nodes.n0[0][2].kernal"
    assert "did you mean 'kernel'? valid: mode, kernel" in err.message


def test_stride_on_a_cell_edge_says_the_builder_owns_it() -> None:
    cell = """
name: t
input: [3, 8, 8]
num_classes: 10
cells:
  c:
    nodes:
      n0: [[binary_conv_3x3, in1, {stride: 2}]]
    output: {nodes: [n0]}
body: [{cell: c, channels: 8}]
"""
    err = _error(cell)
    assert err.path == "cells.c.nodes.n0[0][2].stride"
    assert "a cell edge cannot set 'stride': the builder owns it" in err.message
    assert "body entry has stride: 2" in err.message
