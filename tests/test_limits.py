"""Caps on what bnas reads and builds (issue 11, defects 2, 3 and 7): alias bombs, huge files,
widths, depths and node counts that no real network reaches, and networks past the machine's
memory each end in one short line that names the cap and how to raise it, fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import bnas
from bnas.builder import estimate_memory, memory_limit
from bnas.cli import main
from bnas.errors import GenotypeError, LimitError
from bnas.genotype import genotype_from_dict, load_genotype, loads_genotype
from bnas.registry import CatalogError, load_catalog
from bnas.search.space import load_space, parse_space

REPO = Path(__file__).resolve().parents[1]

NET = """\
name: net
input: [3, 8, 8]
num_classes: 10
body:
  - {op: xnor_resnet_block, channels: 16}
head: [{op: global_avgpool}, {op: linear}]
"""


def _alias_bomb(levels: int = 6) -> list[str]:
    """YAML lines of a 'billion laughs' list: 9**levels strings from a few hundred bytes."""
    lines = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return lines


def _one_short_line(message: str) -> None:
    assert "\n" not in message and len(message) < 400, message[:1000]


@pytest.mark.parametrize("key", ["name", "input"])
def test_alias_bomb_is_refused_in_one_short_line(tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    rest = {"name": "name: bomb", "input": "input: [3, 8, 8]"}
    text = (
        "\n".join(
            [line for k, line in rest.items() if k != key]
            + ["num_classes: 10", "body: [{op: skip_connect}]", f"{key}:", *_alias_bomb()]
        )
        + "\n"
    )
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 1000
    start = time.perf_counter()
    with pytest.raises(LimitError) as info:
        load_genotype(path)
    assert time.perf_counter() - start < 2
    message = str(info.value)
    _one_short_line(message)
    assert message.startswith(str(path)) and "BNAS_MAX_YAML_NODES" in message
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "BNAS_MAX_YAML_NODES" in err[0]


def test_recursive_alias_is_an_error() -> None:
    with pytest.raises(GenotypeError, match="rec.yaml: line 1: an alias refers to the value that contains it"):
        loads_genotype("name: &a [x, *a]\ninput: [3, 8, 8]\nnum_classes: 10\nbody: [{op: skip_connect}]\n", "rec.yaml")


def test_error_messages_never_print_a_huge_value() -> None:
    # The same value given from Python, where no YAML cap applies: the message quotes a prefix.
    huge = [["lol"] * 1000] * 1000
    for data in (
        {"name": huge, "input": [3, 8, 8], "num_classes": 10, "body": []},
        {"name": "x", "input": huge, "num_classes": 10, "body": []},
        {"name": "x", "input": [3, 8, 8], "num_classes": 10, "body": [{"op": "conv_bn", "channels": huge}]},
    ):
        with pytest.raises(GenotypeError) as info:
            genotype_from_dict(data)
        _one_short_line(str(info.value))
        assert "..." in str(info.value)


def test_a_file_past_the_size_cap_is_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: big\ninput: [" + ", ".join(["1"] * 1_000_000) + "]\n")  # 3 MB, 1M elements
    start = time.perf_counter()
    with pytest.raises(LimitError) as info:
        load_genotype(path)
    assert time.perf_counter() - start < 1
    _one_short_line(str(info.value))
    assert "larger than the cap of 1,048,576 bytes" in str(info.value) and "BNAS_MAX_YAML_BYTES" in str(info.value)
    with pytest.raises(LimitError, match="search space file is larger"):
        load_space(path)
    # The caps are environment variables: a lower size cap refuses a smaller file, and
    # raising it lets the file through to the next cap (how many values it holds).
    path.write_text("name: big\ninput: [" + ", ".join(["1"] * 5_000) + "]\n")
    monkeypatch.setenv("BNAS_MAX_YAML_BYTES", "10000")
    with pytest.raises(LimitError, match="larger than the cap of 10,000 bytes"):
        load_genotype(path)
    monkeypatch.setenv("BNAS_MAX_YAML_BYTES", "20000")
    monkeypatch.setenv("BNAS_MAX_YAML_NODES", "1000")
    with pytest.raises(LimitError, match="more than 1,000 values.*BNAS_MAX_YAML_NODES"):
        load_genotype(path)


def test_a_bad_cap_variable_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BNAS_MAX_CHANNELS", "lots")
    assert main(["info", str(REPO / "search_spaces" / "genotypes" / "digits_small.yaml")]) == 2
    assert "BNAS_MAX_CHANNELS='lots': expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "old,new,path,variable",
    [
        ("channels: 16}", "channels: 10000000}", "body[0].channels", "BNAS_MAX_CHANNELS"),
        ("channels: 16}", "channels: 16, repeat: 100000000}", "body[0].repeat", "BNAS_MAX_REPEAT"),
        ("input: [3, 8, 8]", "input: [3, 100000, 8]", "input[1]", "BNAS_MAX_INPUT_SIZE"),
        ("input: [3, 8, 8]", "input: [1000000, 8, 8]", "input[0]", "BNAS_MAX_CHANNELS"),
        ("num_classes: 10", "num_classes: 10000000", "num_classes", "BNAS_MAX_CLASSES"),
        (
            "channels: 16}",
            "channels: 16, repeat: 1000}\n  - {op: xnor_resnet_block, repeat: 1000}\n"
            "  - {op: xnor_resnet_block, repeat: 1000}\n  - {op: xnor_resnet_block, repeat: 1000}\n"
            "  - {op: xnor_resnet_block, repeat: 1000}",
            "body",
            "BNAS_MAX_LAYERS",
        ),
        ("xnor_resnet_block, channels: 16}", "pool, kernel: 100001}", "body[0].kernel", "BNAS_MAX_KERNEL"),
    ],
)
def test_genotype_caps(old: str, new: str, path: str, variable: str) -> None:
    start = time.perf_counter()
    with pytest.raises(LimitError) as info:
        loads_genotype(NET.replace(old, new), "huge.yaml")
    assert time.perf_counter() - start < 1
    assert info.value.path == path
    message = str(info.value)
    _one_short_line(message)
    assert message.startswith(f"huge.yaml: {path}: ") and "past the cap" in message and f"{variable}=N" in message


def test_cell_node_and_edge_caps() -> None:
    nodes = "\n".join(f"      n{i}: [[skip_connect, in1]]" for i in range(65))
    text = NET.replace("body:", f"cells:\n  c:\n    nodes:\n{nodes}\n    output: {{nodes: [n0]}}\nbody:")
    with pytest.raises(
        LimitError, match=r"cells\.c\.nodes: the number of nodes in the cell is 65, past the cap of 64.*BNAS_MAX_NODES"
    ):
        loads_genotype(text, "cell.yaml")


def test_a_cap_is_raised_by_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    text = NET.replace("channels: 16}", "channels: 20000}")
    with pytest.raises(LimitError):
        loads_genotype(text)
    monkeypatch.setenv("BNAS_MAX_CHANNELS", "32768")
    assert loads_genotype(text).body[0].channels == 20000  # loaded, not built


def test_memory_is_estimated_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    genotype = load_genotype(REPO / "search_spaces" / "genotypes" / "example_cells.yaml")
    model = bnas.build(genotype)
    actual = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert estimate_memory(genotype) == actual
    # Past the limit, build refuses before allocating anything, naming the layer.
    wide = tmp_path / "wide.yaml"
    wide.write_text(NET.replace("channels: 16}", "channels: 512}"))
    monkeypatch.setenv("BNAS_MAX_PARAM_BYTES", str(1 << 20))
    with pytest.raises(LimitError) as info:
        bnas.build(wide)
    message = str(info.value)
    _one_short_line(message)
    assert message.startswith(f"{wide}: body[0]: the network's parameters need more than")
    assert "past the limit BNAS_MAX_PARAM_BYTES (1.0 MiB)" in message


def test_memory_limit_defaults_to_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("BNAS_MAX_PARAM_BYTES", raising=False)
    assert memory_limit() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # A network far past any machine (16384 wide, 1024 deep: ~10 TB) is refused within a few
    # seconds, on the meta device, instead of allocating until the OOM killer comes.
    huge = loads_genotype(NET.replace("channels: 16}", "channels: 16384, repeat: 1024}"), "huge.yaml")
    start = time.perf_counter()
    with pytest.raises(LimitError, match="past this machine's memory"):
        bnas.build(huge)
    assert time.perf_counter() - start < 10


def _space(**macro: object) -> dict[str, object]:
    return {
        "name": "s",
        "input": [1, 8, 8],
        "num_classes": 10,
        "stem": [{"op": "conv_bn", "channels": 8}],
        "cells": {"ops": ["skip_connect", "binary_conv_3x3"], **macro.pop("cells", {})},  # type: ignore[dict-item]
        "macro": {"stages": 2, "channels": [8], "cells_per_stage": [1], **macro},
        "budget": {"epochs": 1},
    }


@pytest.mark.parametrize(
    "changes,path,variable",
    [
        ({"channels": [10000000]}, "macro.channels", "BNAS_MAX_CHANNELS"),
        ({"channels": [4096], "stages": 4}, "macro.channels", "BNAS_MAX_CHANNELS"),  # 4096 * 2**3
        ({"channels": [[8], [100000]]}, "macro.channels[1]", "BNAS_MAX_CHANNELS"),
        ({"cells_per_stage": [1, 100000000]}, "macro.cells_per_stage[0]", "BNAS_MAX_REPEAT"),
        ({"stages": 1000}, "macro.stages", "BNAS_MAX_STAGES"),
        ({"stages": 8, "channels": [8], "cells_per_stage": [1000]}, "macro.cells_per_stage", "BNAS_MAX_LAYERS"),
        ({"cells": {"nodes": 100000}}, "cells.nodes", "BNAS_MAX_NODES"),
        ({"cells": {"edges_per_node": 100000}}, "cells.edges_per_node", "BNAS_MAX_NODES"),
    ],
)
def test_search_space_caps(changes: dict[str, object], path: str, variable: str) -> None:
    assert parse_space(_space(channels=[8, 16], cells_per_stage=[1, 2])).macro.channels == ((8, 16),)
    start = time.perf_counter()
    with pytest.raises(LimitError) as info:
        parse_space(_space(**changes))
    assert time.perf_counter() - start < 1
    assert info.value.path == path
    _one_short_line(str(info.value))
    assert f"{variable}=N" in str(info.value)


def test_duplicate_keys_are_errors_everywhere(tmp_path: Path) -> None:
    text = NET.replace("channels: 16}", "channels: 32, channels: 16}")
    with pytest.raises(GenotypeError) as info:
        loads_genotype(text, "dup.yaml")
    assert str(info.value) == (
        "dup.yaml: line 5: duplicate key 'channels' (first at line 5); each key may appear once per mapping"
    )
    space = tmp_path / "space.yaml"
    space.write_text("name: s\nname: t\ninput: [1, 8, 8]\n")
    with pytest.raises(GenotypeError, match=r"space\.yaml: line 2: duplicate key 'name' \(first at line 1\)"):
        load_space(space)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("ops:\n  a: {family: conv_unit}\n  a: {family: resnet_block}\n")
    with pytest.raises(CatalogError, match=r"catalog\.yaml: line 3: duplicate key 'a'"):
        load_catalog(catalog)
    # A merge key (``<<: *base``) is not a duplicate: the mapping may override what it merges.
    text = NET.replace(
        "  - {op: xnor_resnet_block, channels: 16}",
        "  - &base {op: xnor_resnet_block, channels: 16}\n  - {<<: *base, channels: 32}",
    )
    genotype = loads_genotype(text)
    assert [layer.channels for layer in genotype.body] == [16, 32]


def test_a_size_is_found_once_per_architecture_and_again_when_its_ops_change(
    isolated_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch import nn

    from bnas import binarize, builder, register_primitive

    def actual_bytes(genotype: object) -> int:
        model = bnas.build(genotype)
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    sized: list[str] = []
    meta_size = builder._meta_size
    monkeypatch.setattr(builder, "_meta_size", lambda g, cap: sized.append(g.name) or meta_size(g, cap))
    genotype = loads_genotype(NET.replace("name: net", "name: cached"))
    first = estimate_memory(genotype)
    assert first == actual_bytes(genotype)
    assert sized == ["cached"]  # bnas.build found it in the cache
    # the same architecture under another name and recipe is the same size
    other = loads_genotype(NET.replace("name: net", "name: other") + "training: {epochs: 3}")
    assert estimate_memory(other) == first and sized == ["cached"]

    # the op replaced by one with more weights
    register_primitive(
        "xnor_resnet_block",
        lambda c_in, c_out, stride, **options: nn.Conv2d(c_in, c_out, 5, stride, 2),
        override=True,
    )
    replaced = estimate_memory(genotype)
    assert sized == ["cached", "cached"] and replaced == actual_bytes(genotype) != first

    # a binarization named in the genotype replaced: RSign's learnable thresholds join
    inline = loads_genotype(
        NET.replace("{op: xnor_resnet_block, channels: 16}", "{op: binary_conv_3x3, channels: 16, binarize: xnor}")
    )
    plain = estimate_memory(inline)
    binarize.BINARIZE_PRESETS["xnor"] = binarize.BINARIZE_PRESETS["reactnet"]
    thresholds = estimate_memory(inline)
    assert len(sized) == 4 and thresholds == actual_bytes(inline) > plain

    # under a cap below a size it knows, it sizes again, to name the layer that passes the cap
    with pytest.raises(LimitError, match=r"^head\[1\]: the network's parameters need more than"):
        estimate_memory(genotype, cap=replaced - 1)
    assert len(sized) == 5
