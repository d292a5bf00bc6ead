"""scripts/gpu_check.sh (the one-command check for a lent GPU machine) and the summary logic of
benchmarks/cuda_xnor_conv.py, on a machine without a GPU: the script runs for real and must
stop at once, saying there is no CUDA device, in its summary.json and its exit code."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
MAX_OUT_FILES = 8  # the device tool brings back at most 8 files from $OUT


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_documents_the_device_call():
    text = SCRIPT.read_text()
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".whl"]' in text
    # the wheels folder it installs from is ignored by git, so it travels only when carried
    proc = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert proc.returncode == 0, ".whl/ must be ignored (carried, not committed)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the whole check")
def test_without_a_gpu_the_script_fails_fast_and_says_why(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s to notice there is no GPU"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False
    assert "no CUDA device" in summary["reason"]
    # only the device step ran, and its failure is recorded with its exit code
    assert [s["name"] for s in summary["steps"]] == ["device"]
    assert summary["steps"][0]["rc"] == 3 and summary["steps"][0]["status"] == "failed"
    assert any("no CUDA device" in line for line in summary["device"])
    assert "no CUDA device" in (out / "log.txt").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_OUT_FILES


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the whole check")
def test_a_python_without_torch_is_reported(tmp_path):
    # a Python that cannot import torch is a different failure from "no GPU", said so
    out = tmp_path / "out"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')  # no site-packages: no torch
    fake_python.chmod(0o755)
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake_python)}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "no usable torch" in summary["reason"]
    assert summary["steps"][0]["rc"] == 4


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("cuda_xnor_conv", ROOT / "benchmarks" / "cuda_xnor_conv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(bench, ratios: list[float], fraction: float) -> list[dict]:
    records = []
    for shape, ratio in zip(bench.CUDA_SHAPES, ratios, strict=True):
        name = bench.shape_name(shape)
        records.append(
            {
                "shape": name,
                "n": shape[0],
                "exact": True,
                "ratio": ratio,
                "fraction_of_peak": fraction if shape == bench.PEAK_SHAPE else 0.01,
            }
        )
    return records


PEAK = {"ops_per_s": 2.0e15, "blocks": 264, "threads": 256, "iters": 4096}


def test_benchmark_summary_computes_the_targets_from_the_measurements():
    bench = _benchmark_module()
    # the batch-1 shapes (ratios 100) are not part of the median
    summary = bench.summarize(_records(bench, [1, 2, 3, 5, 6, 7, 100, 100], 0.36), PEAK)
    assert summary["ratio_shapes"] == [bench.shape_name(s) for s in bench.CUDA_SHAPES[:6]]
    assert summary["median_ratio_batch_256_64"] == 4.0
    assert summary["meets_4x_cudnn"] is True
    assert summary["fraction_of_peak_256x256x8x8"] == 0.36
    assert summary["meets_35pct_peak"] is True
    assert summary["mma_peak_tops"] == 2000.0
    summary = bench.summarize(_records(bench, [1, 2, 3, 4.9, 6, 7, 100, 100], 0.34), PEAK)
    assert summary["median_ratio_batch_256_64"] == pytest.approx(3.95)
    assert summary["meets_4x_cudnn"] is False and summary["meets_35pct_peak"] is False


def test_benchmark_summary_says_when_a_target_was_not_measured():
    bench = _benchmark_module()
    records = _records(bench, [5, 5, 5, 5, 5, 5, 5, 5], 0.5)
    records[1]["ratio"] = None  # e.g. its graph capture failed
    summary = bench.summarize(records, PEAK)
    assert summary["median_ratio_batch_256_64"] is None and summary["meets_4x_cudnn"] is None
    # a run on other shapes only (--shapes) has neither target's shapes
    summary = bench.summarize(records[6:], PEAK)
    assert summary["ratio_shapes"] == []
    assert summary["meets_4x_cudnn"] is None and summary["meets_35pct_peak"] is None
    # one of the six shapes alone (the GPU test runs the peak shape and a tiny one): no median claimed
    summary = bench.summarize(records[2:3], PEAK)
    assert summary["ratio_shapes"] == [bench.shape_name(bench.PEAK_SHAPE)]
    assert summary["median_ratio_batch_256_64"] is None and summary["meets_4x_cudnn"] is None
    assert summary["meets_35pct_peak"] is True
    records[0]["exact"] = False
    assert bench.summarize(records, PEAK)["all_exact"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_benchmark_refuses_to_run_without_a_gpu(tmp_path, capsys):
    bench = _benchmark_module()
    assert bench.main(["--json-out", str(tmp_path / "b.jsonl")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_benchmark_on_the_gpu_times_graph_replays(tmp_path):
    from bnas.kernels import cuda_backend as cb

    if not cb.is_supported("cuda"):
        pytest.skip("the tensor-core kernel cannot run here (below sm_80 or no nvcc)")
    bench = _benchmark_module()
    out = tmp_path / "bench.jsonl"
    tiny = (2, 64, 8, 8, 64)
    records = bench.run_cuda([tiny, bench.PEAK_SHAPE], repeats=3, batches=3, json_out=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("shape") for line in lines[:2]] == [bench.shape_name(tiny), bench.shape_name(bench.PEAK_SHAPE)]
    summary = lines[-1]
    assert summary["summary"] is True and len(lines) == 3
    for r in records:
        assert r["exact"] and r["packed_out_matches_float_out"] and "graph_errors" not in r
        assert 0 < r["ours_us"] <= r["ours_us_p90"] and 0 < r["baseline_us"] <= r["baseline_us_p90"]
        assert r["ratio"] == pytest.approx(r["baseline_us"] / r["ours_us"], rel=1e-2)
        assert 0 < r["fraction_of_peak"] < 1
    # graph replays time the kernel alone: below the eager time, which pays the Python checks per call
    assert records[0]["ours_us"] < records[0]["ours_eager_us"]
    assert summary["meets_35pct_peak"] in (True, False) and summary["meets_4x_cudnn"] is None
