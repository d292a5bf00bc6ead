"""Fixtures shared by several test files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bnas import binarize, registry
from bnas.binarize import BinaryConv2d, BinaryLinear
from bnas.binarize import config as binarize_config
from bnas.export import format as packed_format
from bnas.kernels.thread_budget import ThreadBudget, torch_threads

# The test files that take longest, longest first (seconds of test time in the suite on the
# AMD EPYC Zen 3, 2026-12-07: 140 for test_distributed.py down to 17 for test_structure.py).
# The README's command hands out whole files (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`); with these first, the many short files fill in at the end and
# both workers finish together. xdist's default order, most tests first, left these few-test
# files to the end, and one worker ran them while the other waited.
LONGEST_FILES_FIRST = (
    "test_distributed.py",
    "test_export_lce.py",
    "test_readme.py",
    "test_search_efficiency_script.py",
    "test_oneshot_search.py",
    "test_search.py",
    "test_export_onnx.py",
    "test_native_torch_ops.py",
    "test_cuda_compile.py",
    "test_supernet_run.py",
    "test_oneshot_ranking_script.py",
    "test_path_sampling.py",
    "test_packed_program.py",
    "test_packed_plan.py",
    "test_supernet.py",
    "test_cuda_sass.py",
    "test_fair_sampling.py",
    "test_short_training_trials_script.py",
    "test_supernet_interference_script.py",
    "test_structure.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first, each file's tests in their own order; the rest after them."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """torch runs on one thread in the tests. The README's command runs two pytest-xdist
    workers on a 2-core machine, and torch's default of a thread per core put four threads on
    two cores: a parallel op then waits at its barrier for a thread the OS has descheduled.
    (The supernet training test took 81 s in the suite and 5 s alone; the suite took 503 s,
    and 368 s with these settings, on 2026-12-05.) The kernel and packed-network tests run on two
    (``kernel_threads``), so their threaded paths stay covered on any machine."""
    torch.set_num_threads(1)


@pytest.fixture
def kernel_threads() -> Iterator[None]:
    """Two torch threads for a test of the CPU kernels, which split their work among them;
    the session's one thread is restored afterwards."""
    with torch_threads(2):
        yield


@pytest.fixture(autouse=True)
def packed_networks_keep_torchs_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed networks run on torch's thread count in tests. Their default caps it at the cores
    free at the moment (bnas.kernels.thread_budget); with pytest's other worker busy that is
    sometimes 1 thread, whose float ops round differently in the last bit, and tests compare
    outputs bit for bit. test_thread_budget.py sets its own budgets."""
    monkeypatch.setattr(packed_format, "PROCESS_BUDGET", ThreadBudget(sample=lambda: None))


@pytest.fixture(params=["vnni", "amx"])
def int8_unit(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test of the int8 kernels once on the AVX-512 VNNI kernels and once on AMX tiles
    (skipped where the CPU or its kernel has no AMX-INT8), the process's setting restored after."""
    from bnas.kernels import cpu_backend

    if "cpu-avx512" not in cpu_backend.supported_backends() or not cpu_backend.int8_supported():
        pytest.skip("the int8 kernels run on AVX-512 VNNI CPUs only")
    if request.param == "amx" and not cpu_backend.amx_int8_supported():
        pytest.skip("this CPU or its kernel has no AMX-INT8")
    with cpu_backend.amx_int8(request.param == "amx"):
        yield request.param


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in which no file can be created: chmod 555 for an ordinary user, or, as root
    (who ignores file modes), a sysfs folder, which is read-only for everyone."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except OSError:
        yield ro
        ro.chmod(0o755)
        return
    (ro / "probe").unlink()
    ro.chmod(0o755)
    for candidate in (Path("/sys/kernel"), Path("/proc/self")):
        try:
            (candidate / "bnas-probe").touch()
        except OSError:
            yield candidate
            return
    pytest.skip("no read-only folder on this machine")


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it, so tests can be re-run in one process
    (the registry is process-global: a catalog loaded by one test would leak into the next)."""
    registry.list_primitives()  # load the shipped catalog first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    # The table is looked up in bnas.binarize.config (by named_binarization and the registry);
    # the package's re-export is swapped too, so both names keep reading the same table.
    presets = dict(binarize_config.BINARIZE_PRESETS)
    monkeypatch.setattr(binarize_config, "BINARIZE_PRESETS", presets)
    monkeypatch.setattr(binarize, "BINARIZE_PRESETS", presets)


# --------------------------------------------------------------------------------------
# Search spaces: one small space, tests/data/tiny_space.yaml, in the variants tests need
# --------------------------------------------------------------------------------------
DATA = Path(__file__).resolve().parent / "data"
TINY_SPACE = DATA / "tiny_space.yaml"
TINY_GENOTYPE = DATA / "tiny_genotype.yaml"
# Two genotypes in all (one edge, two ops): a search of several trials must meet duplicates.
TWO_GENOTYPES = """
name: two
dataset: digits
input: [1, 8, 8]
num_classes: 10
stem: [{op: conv_bn, channels: 8}]
cells: {ops: [skip_connect, binary_conv_3x3], nodes: 1, inputs: 1, edges_per_node: 1, combine: sum}
macro: {stages: 1, channels: [8], cells_per_stage: [1]}
head: [{op: global_avgpool}, {op: linear}]
budget: {epochs: 1, batch_size: 256, optimizer: {name: adam, lr: 0.01}}
"""


# A two-stage cell space on synthetic 1x8x8 images, for tests that train or score supernet paths
# in seconds (copy it before changing it).
TINY_CELL_SPACE: dict[str, Any] = {
    "name": "tiny_cells",
    "dataset": "synthetic",
    "input": [1, 8, 8],
    "num_classes": 4,
    "stem": [{"op": "conv_bn", "channels": 4, "kernel": 3}],
    "cells": {
        "ops": ["binary_conv_3x3", "skip_connect", "max_pool_3x3"],
        "nodes": 2,
        "inputs": 2,
        "edges_per_node": 2,
        "combine": "sum",
    },
    "macro": {"stages": 2, "channels": [4, 6], "cells_per_stage": [1, 2]},
    "head": [{"op": "global_avgpool"}, {"op": "linear"}],
    "budget": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01}},
}


def _flow(value: object) -> str:
    """A value as the fixture writes it: lists in flow style, ``[a, b]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


def tiny_space(name: str = "tiny", **changes: object) -> str:
    """The text of tests/data/tiny_space.yaml with ``name`` and the keys in ``changes`` set.

    A key already in the file (``epochs``, ``ops``, ``cells_per_stage``, ...) is set on its
    line; any other key (``train_subset``, ``pruner``, ...) is added at the top level. The
    layout stays one key per line, so tests can go on editing the text by replacement.
    """
    lines = [line for line in TINY_SPACE.read_text().splitlines() if not line.startswith("#")]
    changes = {"name": name, **changes}
    for key, value in changes.items():
        hits = [i for i, line in enumerate(lines) if line.lstrip().startswith(f"{key}:")]
        if len(hits) > 1:
            raise ValueError(f"{key!r} is on several lines of {TINY_SPACE}")
        if hits:
            indent = lines[hits[0]][: len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
            lines[hits[0]] = f"{indent}{key}: {_flow(value)}"
        else:
            lines.append(f"{key}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def write_space(folder: Path, text: str | None = None, name: str = "space.yaml") -> Path:
    """Write a search-space file (default: the tiny space) into ``folder``; returns its path."""
    path = folder / name
    path.write_text(tiny_space() if text is None else text)
    return path


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters (negative scales included), rsign thresholds."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_((torch.rand(c, generator=gen) * 2 - 1) * 1.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
        if isinstance(m, (BinaryConv2d, BinaryLinear)) and m.input_quantizer.name == "rsign":
            m.input_quantizer.threshold.data.copy_(
                torch.rand(m.input_quantizer.threshold.shape, generator=gen) * 0.2 - 0.1
            )
    return model.eval()


def sigkill_when(
    proc: subprocess.Popen[bytes], db: Path, ready: Callable[[list[tuple[int, str]]], bool], timeout: float
) -> bool:
    """SIGKILL the search ``proc`` as soon as ``ready(rows)`` holds for the (number, state)
    rows of its ``study.db``; True when it was killed (False: it ended or ``timeout`` passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows: list[tuple[int, str]] = []
        if db.is_file():
            try:
                with sqlite3.connect(db) as con:
                    rows = con.execute("select number, state from trials").fetchall()
            except sqlite3.Error:
                rows = []  # the database is being created or written: look again
        if ready(rows):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait()
    return False


def load_benchmark(name: str) -> Any:
    """``benchmarks/NAME.py`` imported as a module (its ``main`` not run)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def run_benchmark(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, list[dict]]:
    """Run ``benchmarks/NAME.py``'s ``main(argv)`` in this process, torch's thread count put back
    afterwards: (the script's module, the JSON lines it printed)."""
    import json

    script = load_benchmark(name)
    threads = torch.get_num_threads()
    try:
        assert script.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return script, [json.loads(line) for line in capsys.readouterr().out.splitlines()]
