"""Threads an inference call may use (``bnas.kernels.thread_budget``): the count of other
processes' runnable threads read from ``/proc``, the budget it gives, torch's thread count
lowered for one call and restored, and ``PackedNetwork`` running on it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bnas
from bnas.export import format as packed_format
from bnas.export import pack_model
from bnas.kernels import cpu_backend
from bnas.kernels.thread_budget import ThreadBudget, running_elsewhere, torch_threads

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

GENOTYPES = Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes"


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_proc(root: Path, procs_running: int, own_states: list[str]) -> Path:
    (root / "self" / "task").mkdir(parents=True)
    (root / "stat").write_text(f"cpu  1 2 3 4\nprocesses 99\nprocs_running {procs_running}\nprocs_blocked 0\n")
    for tid, state in enumerate(own_states, start=100):
        (root / "self" / "task" / str(tid)).mkdir()
        # A command name with a space and a parenthesis: the state is read after the last ')'.
        (root / "self" / "task" / str(tid) / "stat").write_text(f"{tid} (py) S (x) {state} 1 {tid} 0\n")
    return root


def test_own_running_threads_are_not_counted(tmp_path):
    proc = fake_proc(tmp_path, procs_running=5, own_states=["R", "S", "R", "D"])
    assert running_elsewhere(str(proc)) == 3  # 5 runnable, 2 of them ours


def test_never_below_zero_and_unknown_without_proc(tmp_path):
    assert running_elsewhere(str(fake_proc(tmp_path / "a", 1, ["R", "R"]))) == 0  # sampled apart
    assert running_elsewhere(str(tmp_path / "missing")) is None
    no_line = fake_proc(tmp_path / "b", 1, ["R"])
    (no_line / "stat").write_text("cpu  1 2 3 4\n")
    assert running_elsewhere(str(no_line)) is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc")
def test_a_busy_neighbour_is_seen():
    """A process spinning beside us is runnable whenever it is sampled."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        samples = [running_elsewhere() for _ in range(5)]
    finally:
        neighbour.kill()
        neighbour.wait()
    assert all(s is not None and s >= 1 for s in samples), samples


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_caps_at_free_cores_and_samples_at_most_every_interval():
    busy = [1]
    calls = []

    def sample() -> int:
        calls.append(1)
        return busy[0]

    clock = Clock()
    budget = ThreadBudget(interval_s=0.05, sample=sample, cores=lambda: 4, clock=clock)
    assert budget.threads(4) == 3 and budget.threads(2) == 2 and budget.threads(1) == 1
    assert len(calls) == 1  # one sample serves the calls within the interval
    busy[0] = 6  # more busy threads than cores: 1 thread once two samples agree
    clock.now = 0.049
    assert budget.threads(4) == 3 and len(calls) == 1
    clock.now = 0.05
    assert budget.threads(4) == 3 and len(calls) == 2  # min(1, 6): one sample is not enough
    clock.now = 0.1
    assert budget.threads(4) == 1 and len(calls) == 3
    busy[0] = 0  # a neighbour that leaves frees its core at the next sample
    clock.now = 0.2
    assert budget.threads(8) == 4 and budget.free_cores() == 4


def test_a_busy_moment_in_one_sample_keeps_the_threads():
    samples = iter([0, 1, 0, 1, 1])
    clock = Clock()
    budget = ThreadBudget(interval_s=1.0, sample=lambda: next(samples), cores=lambda: 2, clock=clock)
    seen = []
    for t in range(5):
        clock.now = float(t)
        seen.append(budget.threads(2))
    assert seen == [2, 2, 2, 2, 1]


def test_budget_without_proc_keeps_the_count_asked_for():
    budget = ThreadBudget(sample=lambda: None, cores=lambda: 2)
    assert budget.threads(3) == 3 and budget.free_cores() is None


def test_torch_threads_sets_and_restores_even_on_error():
    torch.set_num_threads(2)
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="inside"), torch_threads(1):
        raise ValueError("inside")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("fused", [True, False], ids=["plan", "module tree"])
def test_packed_network_runs_on_the_budget(monkeypatch, fused):
    """torch's thread count inside the forward, as each kernel call sees it."""
    if cpu_backend.extension() is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_backend.build_error()}")
    torch.manual_seed(0)
    model = bnas.build(bnas.load_genotype(GENOTYPES / "bireal_resnet18.yaml")).eval()
    packed = pack_model(model)
    packed.fused = fused
    x = torch.randn(1, 3, 32, 32)
    torch.set_num_threads(1)
    expected = packed(x)
    seen: list[int] = []
    threads_of = cpu_backend.kernel_threads

    def recording() -> int:
        seen.append(torch.get_num_threads())
        return threads_of()

    monkeypatch.setattr(cpu_backend, "kernel_threads", recording)

    def threads_in_forward(busy: int, adaptive: bool = True) -> set[int]:
        monkeypatch.setattr(packed_format, "PROCESS_BUDGET", ThreadBudget(sample=lambda: busy, cores=lambda: 2))
        packed.adaptive_threads = adaptive
        seen.clear()
        out = packed(x)
        assert torch.equal(out, expected) and torch.get_num_threads() == 2  # restored after
        return set(seen)

    torch.set_num_threads(2)
    assert threads_in_forward(busy=1) == {1}  # one of 2 cores busy elsewhere: 1 thread
    assert threads_in_forward(busy=1, adaptive=False) == {2}
    assert threads_in_forward(busy=0) == {2}
