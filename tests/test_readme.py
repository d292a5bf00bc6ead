"""Every code block in README.md runs as written.

Python blocks run in a fresh interpreter in a scratch folder that sees the repository's
``search_spaces/`` and ``primitives/``; a YAML block whose first line is ``# NAME.yaml`` is
written there first (the README shows such files before the code that reads them). Genotype
YAML blocks build, the ``bnas info`` output block matches the real output, and every ``bnas``
command in a shell block parses; the quickstart commands run. Every relative link in the README
and in ``docs/`` reaches a file, and a heading there where it names one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bnas.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text(encoding="utf-8")) if lang == language]


def _named_files(block: str) -> str | None:
    first = block.splitlines()[0].strip()
    match = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)", first)
    return match.group(1) if match else None


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    for folder in ("search_spaces", "primitives"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    for block in _blocks("yaml"):
        name = _named_files(block)
        if name:
            (tmp_path / name).write_text(block, encoding="utf-8")
    return tmp_path


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_has_the_blocks_this_file_checks() -> None:
    assert len(_blocks("python")) >= 2
    assert any(_named_files(b) == "my_presets.yaml" for b in _blocks("yaml"))
    assert len(_blocks("text")) >= 1
    assert len(_blocks("bash")) >= 3


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs_as_written(index: int, scratch: Path) -> None:
    block = _blocks("python")[index]
    result = _run_python(block, scratch)
    assert result.returncode == 0, (
        f"README python block {index} failed:\n{block}\n--- stderr ---\n{result.stderr[-3000:]}"
    )


def test_genotype_yaml_blocks_build() -> None:
    import bnas
    from bnas.genotype import loads_genotype

    texts = [b for b in _blocks("yaml") if _named_files(b) is None]
    assert texts, "the README shows the genotype schema"
    for text in texts:
        model = bnas.build(loads_genotype(text, "README.md"))
        assert sum(p.numel() for p in model.parameters()) > 0


def test_catalog_block_loads(scratch: Path) -> None:
    code = (
        "import bnas\n"
        "added = bnas.load_catalog('my_presets.yaml')\n"
        "assert 'my_rsign_conv_3x3' in added, added\n"
        "assert 'my_rsign_conv_3x3' in [s.name for s in bnas.list_primitives()]\n"
    )
    result = _run_python(code, scratch)
    assert result.returncode == 0, result.stderr[-3000:]


def test_info_output_block_matches_the_real_output(capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = [b for b in _blocks("text") if b.startswith("layer ")]
    assert main(["info", str(ROOT / "search_spaces/genotypes/bireal_resnet18.yaml")]) == 0
    actual = capsys.readouterr().out.splitlines()
    shown = [line for line in block.splitlines() if line.strip() and line.strip() != "..."]
    missing = [line for line in shown if line not in actual]
    assert not missing, f"README lines not in today's `bnas info` output: {missing}"


def _commands() -> list[list[str]]:
    lines = [line.strip() for block in _blocks("bash") for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_every_bnas_command_in_the_readme_parses() -> None:
    parser = build_parser()
    bnas_commands = [c for c in _commands() if c[0] == "bnas"]
    assert len(bnas_commands) >= 2
    for command in bnas_commands:
        parser.parse_args(command[1:])  # argparse exits (SystemExit) on an unknown flag


def test_the_readme_test_command_is_what_ci_runs() -> None:
    pytest_commands = [c for c in _commands() if c[:3] == ["python", "-m", "pytest"]]
    assert pytest_commands, "the README gives the test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert " ".join(pytest_commands[0]) in ci


def test_the_long_test_files_are_handed_out_first() -> None:
    # The README's command hands out files in collection order (--no-loadscope-reorder), which
    # tests/conftest.py sorts: the named long files first, in their order, then the rest.
    from conftest import LONGEST_FILES_FIRST, pytest_collection_modifyitems

    assert "--no-loadscope-reorder" in [c for c in _commands() if c[:3] == ["python", "-m", "pytest"]][0]
    assert len(set(LONGEST_FILES_FIRST)) == len(LONGEST_FILES_FIRST)
    missing = [name for name in LONGEST_FILES_FIRST if not (ROOT / "tests" / name).is_file()]
    assert not missing, f"tests/conftest.py names test files that are gone: {missing}"

    class Item:
        def __init__(self, name: str, index: int) -> None:
            self.path, self.index = ROOT / "tests" / name, index

    first, last = LONGEST_FILES_FIRST[0], LONGEST_FILES_FIRST[-1]
    items = [Item("test_ops.py", 0), Item(last, 1), Item("test_genotype.py", 2)]
    items += [Item(first, 3), Item(last, 4), Item("test_ops.py", 5)]
    pytest_collection_modifyitems(items)
    assert [(item.path.name, item.index) for item in items] == [
        (first, 3),
        (last, 1),
        (last, 4),
        ("test_ops.py", 0),
        ("test_genotype.py", 2),
        ("test_ops.py", 5),
    ]


@pytest.mark.slow
def test_quickstart_commands_run_as_written(scratch: Path) -> None:
    quickstart = [c for c in _commands() if c[0] == "bnas" and "--out" in c and "runs/quickstart" in " ".join(c)]
    assert len(quickstart) == 2, quickstart
    for command in quickstart:
        result = subprocess.run(
            [sys.executable, "-m", "bnas", *command[1:]],
            cwd=scratch,
            # One torch thread, as the suite's own (tests/conftest.py): `bnas eval` defaults to
            # two, which wait on each other beside the other pytest worker (this test took 81 s
            # on two threads, 61 s on one, beside a one-thread process; Zen 3, 2026-12-07).
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-3000:]}"
    assert (scratch / "runs/quickstart/report.json").is_file()
    assert (scratch / "runs/quickstart-search/best.yaml").is_file()


def _heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation but hyphens dropped,
    spaces as hyphens."""
    headings = [line.lstrip("#").strip() for line in FENCE.sub("", markdown).splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _relative_links(page: Path) -> list[tuple[str, Path, str]]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    links = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        links.append((target, (page.parent / path).resolve() if path else page, anchor))
    return links


def test_relative_links_reach_their_files_and_headings() -> None:
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target, path, anchor in _relative_links(page):
            assert path.exists(), f"{page.name}: the link {target} reaches no file"
            if anchor:
                assert anchor in _heading_anchors(path.read_text(encoding="utf-8")), (
                    f"{page.name}: the link {target} names no heading of {path.name}"
                )
            checked += 1
    assert checked >= 10  # the README links its results to its sections and docs/


def test_heading_anchors_follow_github() -> None:
    anchors = _heading_anchors("# bnas\n## Parts in 8-bit integers (opt-in)\n```\n# a comment\n```\n")
    assert anchors == {"bnas", "parts-in-8-bit-integers-opt-in"}
