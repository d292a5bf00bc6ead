"""The CPU kernels' threads (``bnas/kernels/csrc/work_pool.h``): on torch's OpenMP team (the
default) and on bnas's own pool (``BNAS_KERNEL_THREADS`` set), results bit-identical for any
thread count and exceptions that reach the caller; on the pool, a caller that never waits for
a helper thread that has not started work; and the thread-count setting.

Every comparison is against the same call on 1 thread (no team or pool is used then), so the
threading is checked, not the kernels (``test_kernels_cpu.py`` checks those against the float
reference).
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bnas.kernels import cpu_backend

THREADS = [2, 3, 8]  # 8: more threads than this machine's cores


@pytest.fixture(scope="module")
def ext():
    module = cpu_backend.extension()
    if module is None:
        pytest.skip(f"the CPU extension cannot be built here: {cpu_backend.build_error()}")
    return module


@pytest.fixture(params=["cpu-avx512", "cpu-avx2", "cpu-popcnt"])
def name(request, ext) -> str:
    if request.param not in cpu_backend.supported_backends():
        pytest.skip(f"{request.param} cannot run on this CPU")
    return request.param


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(cpu_backend.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    yield
    os.environ.pop(cpu_backend.THREADS_ENV, None)  # on_threads sets it without monkeypatch
    torch.set_num_threads(before)


@pytest.fixture(params=["openmp", "pool"])
def team(request) -> str:
    """Where the kernels' threads come from: torch's OpenMP team, or bnas's pool."""
    return request.param


def on_threads(fn: Callable[[], torch.Tensor], threads: int, team: str = "openmp") -> torch.Tensor:
    """fn() with the kernels on `threads` threads: torch's count, or (pool) the override."""
    if team == "pool":
        torch.set_num_threads(1)
        os.environ[cpu_backend.THREADS_ENV] = str(threads)
    else:
        os.environ.pop(cpu_backend.THREADS_ENV, None)
        torch.set_num_threads(threads)
    return fn()


def assert_same_for_all_threads(fn: Callable[[], torch.Tensor], team: str) -> None:
    """fn() on 2, 3 and 8 threads equals fn() on 1, bit for bit; the thread count changes
    between calls."""
    expected = on_threads(fn, 1, team)
    for threads in THREADS + [1] + THREADS[::-1]:
        got = on_threads(fn, threads, team)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), f"{threads} threads ({team}) differ from 1"


# (N, C, H, W, K, kernel, stride, padding, groups): work items = groups x channel blocks x N*OH
CONVS = {
    "many items": (2, 96, 30, 30, 160, 3, 1, 1, 1),  # 3 blocks x 60 rows (AVX-512)
    "word-crossing blocks": (1, 96, 17, 13, 72, 3, 2, 1, 3),  # 24 channels a group: atomic ORs
    "two items": (1, 64, 2, 40, 64, 3, 1, 1, 1),  # 1 block x 2 rows: fewer items than threads
    "one item": (1, 512, 1, 7, 64, 1, 1, 0, 1),  # 1 block x 1 row
}


@pytest.mark.parametrize("case", list(CONVS), ids=list(CONVS))
@pytest.mark.parametrize("pack_output", [False, True], ids=["float", "packed"])
def test_conv_identical_for_any_thread_count(name, team, case, pack_output):
    n, c, h, w, k, ks, stride, pad, groups = CONVS[case]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(k, c // groups, ks, ks, generator=gen)
    scale, bias = torch.rand(k, generator=gen) + 0.5, torch.rand(k, generator=gen) - 0.5
    xp = cpu_backend.pack_signs(x, groups, name)
    wp = cpu_backend.pack_weights(wt, name)
    assert_same_for_all_threads(
        lambda: cpu_backend.xnor_conv2d_packed(
            xp, wp, c, (ks, ks), (stride, stride), (pad, pad), (1, 1), groups, scale, bias, pack_output, name
        ),
        team,
    )


@pytest.mark.parametrize("pack_output", [False, True], ids=["float", "packed"])
def test_linear_identical_for_any_thread_count(name, team, pack_output):
    gen = torch.Generator().manual_seed(2)
    x, wt = torch.randn(64, 1000, generator=gen), torch.randn(100, 1000, generator=gen)
    scale, bias = torch.rand(100, generator=gen) + 0.5, torch.rand(100, generator=gen) - 0.5
    xp, wp = cpu_backend.pack_signs(x, 1, name), cpu_backend.pack_weights(wt, name)
    assert_same_for_all_threads(
        lambda: cpu_backend.xnor_linear_packed(xp, wp, 1000, scale, bias, pack_output, name), team
    )


@pytest.mark.parametrize(
    "shape",
    [(2, 200, 48, 48), (3, 64, 5, 5), (1, 3, 1, 1), (600, 4096), (2, 70)],
    ids=["many tasks", "few tasks", "one task", "rows", "two rows"],
)
def test_pack_signs_identical_for_any_thread_count(name, team, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    assert_same_for_all_threads(lambda: cpu_backend.pack_signs(x, 1, name), team)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("items,chunk", [(1, 1), (2, 1), (7, 3), (1000, 1), (1000, 64), (5, 100)])
def test_every_item_runs_exactly_once(ext, team, items, chunk, threads):
    on_threads(lambda: torch.empty(0), 1, team)  # sets the team; the hook takes `threads` itself
    assert ext._work_pool_run(items, chunk, threads, -1) == [3 * i + 1 for i in range(items)]


@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("throw_at", [0, 500, 999])
def test_an_exception_in_any_thread_reaches_the_caller(ext, team, threads, throw_at):
    on_threads(lambda: torch.empty(0), 1, team)
    with pytest.raises(RuntimeError, match=f"work pool test: item {throw_at}$"):
        ext._work_pool_run(1000, 1, threads, throw_at)
    # and the pool still works afterwards
    assert ext._work_pool_run(1000, 1, threads, -1) == [3 * i + 1 for i in range(1000)]


def test_a_call_returns_without_waiting_for_a_helper_that_has_not_started(ext, name):
    """Helpers are held back for 1 s after they wake (a test hook standing in for threads the
    OS does not schedule): 2-thread calls still return at 1-thread speed, with the same
    result, and the late helpers, finding their work done, run nothing."""
    gen = torch.Generator().manual_seed(4)
    x, wt = torch.randn(1, 128, 24, 24, generator=gen), torch.randn(128, 128, 3, 3, generator=gen)
    xp, wp = cpu_backend.pack_signs(x, 1, name), cpu_backend.pack_weights(wt, name)

    def conv() -> torch.Tensor:
        return cpu_backend.xnor_conv2d_packed(xp, wp, 128, (3, 3), (1, 1), (1, 1), (1, 1), 1, None, None, False, name)

    expected = on_threads(conv, 1, "pool")
    time.sleep(0.2)  # helpers that spin after earlier tests' jobs are asleep by now
    ext._work_pool_set_helper_start_delay_us(1_000_000)
    try:
        os.environ[cpu_backend.THREADS_ENV] = "2"
        chunks_before = ext._work_pool_helper_chunks()
        start = time.perf_counter()
        results = [conv() for _ in range(5)]
        elapsed = time.perf_counter() - start
        time.sleep(1.3)  # the held-back helpers wake up and find every job finished
        assert ext._work_pool_helper_chunks() == chunks_before
    finally:
        ext._work_pool_set_helper_start_delay_us(0)
    assert elapsed < 0.5, f"5 calls took {elapsed:.3f} s: the caller waited for a held-back helper"
    assert all(torch.equal(r, expected) for r in results)
    assert ext._work_pool_helpers() >= 1
    assert torch.equal(on_threads(conv, 2, "pool"), expected)


def _conv_in_child(queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    x, wt = torch.randn(1, 64, 16, 16), torch.randn(64, 64, 3, 3)
    xp, wp = cpu_backend.pack_signs(x, 1, "cpu-popcnt"), cpu_backend.pack_weights(wt, "cpu-popcnt")
    out = cpu_backend.xnor_conv2d_packed(xp, wp, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, None, None, False, "cpu-popcnt")
    queue.put(out.shape == (1, 64, 16, 16))


def test_a_forked_child_runs_kernels_on_threads(ext, team):
    """The parent's helper threads do not exist in a forked child: it gets a pool (or an
    OpenMP team) of its own instead of waiting on theirs."""
    on_threads(lambda: torch.empty(0), 2, team)  # the child inherits the team's setting
    ext._work_pool_run(100, 1, 2, -1)  # the parent's pool (or team) has helpers
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_conv_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a kernel call")
    assert child.exitcode == 0 and queue.get(timeout=5) is True


def test_kernel_threads_follows_torch_then_the_environment(monkeypatch):
    torch.set_num_threads(3)
    assert cpu_backend.kernel_threads() == 3
    monkeypatch.setenv(cpu_backend.THREADS_ENV, " 5 ")
    assert cpu_backend.kernel_threads() == 5
    assert torch.get_num_threads() == 3  # torch's own ops keep theirs


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_kernel_threads_says_what_to_set(monkeypatch, value):
    monkeypatch.setenv(cpu_backend.THREADS_ENV, value)
    with pytest.raises(cpu_backend.KernelThreadsError, match=rf"BNAS_KERNEL_THREADS='{value}' is not a number"):
        cpu_backend.kernel_threads()


def test_kernel_threads_override_is_used_and_identical(ext, monkeypatch):
    x = torch.randn(2, 64, 20, 20, generator=torch.Generator().manual_seed(5))
    torch.set_num_threads(1)
    expected = cpu_backend.pack_signs(x, 1, "cpu-popcnt")
    monkeypatch.setenv(cpu_backend.THREADS_ENV, "4")
    assert torch.equal(cpu_backend.pack_signs(x, 1, "cpu-popcnt"), expected)
    monkeypatch.setenv(cpu_backend.THREADS_ENV, "x")
    with pytest.raises(cpu_backend.KernelThreadsError):
        cpu_backend.pack_signs(x, 1, "cpu-popcnt")


def test_a_header_edit_changes_the_build_flags(tmp_path, monkeypatch):
    """``load`` keys its build on the .cpp and the flags: the headers' digest is a flag, so an
    edit to work_pool.h alone rebuilds the extension."""
    header = tmp_path / "work_pool.h"
    header.write_text("// one\n")
    monkeypatch.setattr(cpu_backend, "HEADERS", [header])
    seen: list[list[str]] = []

    def load(**kwargs: object) -> None:
        seen.append(list(kwargs["extra_cflags"]))  # type: ignore[call-overload]
        raise RuntimeError("stop here")

    monkeypatch.delenv(cpu_backend.REQUIRE_ENV, raising=False)
    monkeypatch.setattr(cpu_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_backend, "_import_cpp_extension_load", lambda: load)
    for text in ("// one\n", "// two\n"):
        header.write_text(text)
        monkeypatch.setattr(cpu_backend, "_extension", None)
        monkeypatch.setattr(cpu_backend, "_build_error", None)
        with pytest.warns(RuntimeWarning, match="stop here"):
            assert cpu_backend.extension() is None
    keys = [[flag for flag in flags if flag.startswith("-DBNAS_HEADERS_KEY=")] for flags in seen]
    assert len(keys[0]) == 1 and len(keys[1]) == 1 and keys[0] != keys[1]
    assert "-fopenmp" in seen[0]  # the kernels run on torch's OpenMP team


_ONE_RUNTIME = """
import torch
from pathlib import Path
from bnas.kernels import cpu_backend
ext = cpu_backend.extension()
torch.set_num_threads(2)
torch.nn.functional.conv2d(torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3))  # torch's team
ext._work_pool_run(100, 1, 2, -1)  # the kernels' parallel region
print(sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc")
def test_the_kernels_share_torchs_openmp_runtime(ext):
    """One libgomp in the process: a second runtime would start a second team of threads
    competing with torch's for the same cores. Checked in a fresh process that loads only torch
    and the kernels (other libraries bring their own, e.g. scikit-learn's vendored libgomp)."""
    proc = subprocess.run([sys.executable, "-c", _ONE_RUNTIME], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    mapped = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(mapped) == 1, mapped


def test_the_shipped_headers_exist_and_every_included_one_keys_the_build():
    assert cpu_backend.HEADERS and all(Path(h).is_file() for h in cpu_backend.HEADERS)
    csrc = cpu_backend.SOURCE.parent
    included = {
        line.split('"')[1]
        for source in [cpu_backend.SOURCE, *csrc.glob("*.h")]
        for line in source.read_text().splitlines()
        if line.startswith('#include "')
    }
    assert "program_runner.h" in included and "program_torch_ops.h" in included
    assert included <= {Path(h).name for h in cpu_backend.HEADERS}


@pytest.mark.parametrize(
    "competitor,int8_grid", [(False, False), (True, False), (False, True)], ids=["idle", "competitor", "int8_grid"]
)
def test_packed_threads_benchmark_prints_its_json_line(ext, competitor, int8_grid, capsys):
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("packed_threads", root / "benchmarks" / "packed_threads.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    genotype = root / "search_spaces" / "genotypes" / "bireal_resnet18.yaml"
    if int8_grid and not cpu_backend.int8_supported():
        pytest.skip("the int8 kernels run on AVX-512 VNNI CPUs only")
    flags = (["--competitor"] if competitor else []) + (["--int8-grid"] if int8_grid else [])
    bench.main(["--genotype", str(genotype), "--repeats", "3", *flags])
    (line,) = capsys.readouterr().out.strip().splitlines()
    record = json.loads(line)
    assert record["genotype"] == "bireal_resnet18" and record["input"] == [3, 32, 32]
    assert record["precision"] == ("int8 stem on a pixel grid, shortcuts and head" if int8_grid else "float32")
    assert record["outputs_identical_1_vs_2_threads"] is True
    # the ratios come from unrounded times, the ms fields are rounded to 3 decimals
    assert record["ratio"] == pytest.approx(record["baseline_ms"] / record["ours_ms"], rel=0.01, abs=0.01)
    assert record["float_conv"]["weight"] == [64, 64, 3, 3]
    for key in ("fixed_2_threads", "pool_2_threads", "kernels_only_2_threads"):
        variant = record[key]
        assert variant["ratio"] == pytest.approx(record["baseline_ms"] / variant["ms"], rel=0.01, abs=0.01)
        assert variant["spread"]["median_ms"] == variant["ms"]
    assert len(record["free_cores"]) == 2
    if competitor:  # the spread target applies with a competitor, the 1.7 ratio only at 224x224
        assert record["target"] == {"p90_over_median_max": 2.0}
        assert record["meets_target"] == (record["ours_spread"]["p90_over_median"] <= 2.0)
    else:
        assert record["target"] is None and record["meets_target"] is None


@pytest.mark.parametrize("items,chunk", [(2, 1), (57, 3), (1000, 16)])
def test_two_openmp_threads_take_the_two_ends_of_the_range(ext, items, chunk):
    """On torch's team, thread 0 claims chunks from the top and thread 1 from the bottom, so
    each runs one contiguous part (whichever ran how much): the same part of every call."""
    os.environ.pop(cpu_backend.THREADS_ENV, None)
    torch.set_num_threads(2)
    both_worked = False
    for _ in range(5):  # a busy machine may not schedule thread 1 in time: then try again
        owners = ext._work_pool_owners(items, chunk, 2, 500)  # 0.5 ms a chunk
        # thread 0's items (none, if the OS left it paused while thread 1 did all), then thread 1's
        first_of_1 = owners.index(1) if 1 in owners else items
        assert owners == [0] * first_of_1 + [1] * (items - first_of_1)
        both_worked = both_worked or 0 < first_of_1 < items
    if items >= 4 * chunk and (os.cpu_count() or 1) >= 2:
        assert both_worked  # each took chunks, thread 0 from the top and thread 1 from the bottom


@pytest.mark.parametrize("items,chunk", [(100, 10), (57, 3), (5, 8)])
def test_guided_claims_shrink_near_the_middle_and_cover_every_item_once(ext, items, chunk):
    whole = ext._two_ended_claims(items, chunk, False)
    guided = ext._two_ended_claims(items, chunk, True)
    for claims in (whole, guided):
        covered = sorted(i for begin, end in claims for i in range(begin, end))
        assert covered == list(range(items))
        assert all(0 < end - begin <= chunk for begin, end in claims)
    # turns alternate: from the top, then from the bottom
    assert guided[0][0] == 0 and (len(guided) == 1 or guided[1][1] == items)
    left = items
    for begin, end in guided:  # at most half of what is left
        assert end - begin == min(chunk, max(1, left // 2))
        left -= end - begin
    if items == 100:
        assert [end - begin for begin, end in whole] == [10] * 10
        assert [end - begin for begin, end in guided][-5:] == [5, 2, 1, 1, 1]
