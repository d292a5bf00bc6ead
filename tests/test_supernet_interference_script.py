"""benchmarks/supernet_interference.py on a tiny space (synthetic 1x8x8 data): what each mode
samples, the JSON lines, and the stand-alone baseline against a hand-written training."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import TINY_CELL_SPACE

from bnas.search import Supernet
from bnas.search.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "supernet_interference.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("supernet_interference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT_MODULE = load_script()


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CELL_SPACE), encoding="utf-8")
    return path


def run(*args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_modes_keep_the_base_paths_other_choices(tiny_space: Path) -> None:
    supernet = Supernet(load_space(tiny_space))
    base = supernet.sample_choices(random.Random(0))
    rng = random.Random(1)
    seen: dict[str, set[str]] = {mode: set() for mode in SCRIPT_MODULE.MODES}
    for mode, drawn in SCRIPT_MODULE.MODES.items():
        for _ in range(60):
            path = SCRIPT_MODULE.mixed_path(supernet, base, drawn, rng)
            assert set(path) == set(base)
            seen[mode] |= {name for name in base if path[name] != base[name]}
    # One width list for every stage is the single choice ``channels``.
    macro = {name for name in base if name == "channels" or name.endswith((".channels", ".cells"))}
    assert "channels" in macro
    ops = {name for name in base if name.startswith(("normal.", "reduce.")) and name.endswith(".op")}
    inputs = {name for name in base if name.endswith(".input")}
    assert seen["fixed"] == set()
    assert seen["macro"] == macro
    assert seen["ops"] == ops
    # Inputs with a single option (the first node's) can never change.
    assert seen["cells"] - ops <= inputs and seen["cells"] >= ops and seen["cells"] - ops
    assert seen["all"] >= macro | ops


def test_lines_and_the_fixed_mode_trains_one_path(tiny_space: Path) -> None:
    records = run("--space", str(tiny_space), "--steps", "8", "--modes", "fixed", "all", "--head-scales", "4")
    scales, fixed, uniform, summary = records
    assert scales["measure"] == "classifier_input_abs_mean" and scales["paths"] == 4
    assert scales["min"] == min(scales["values"]) and scales["max"] == max(scales["values"])
    assert fixed["mode"] == "fixed" and fixed["distinct_paths"] == 1
    assert uniform["mode"] == "all" and uniform["distinct_paths"] > 1
    # One stand-alone training serves every mode.
    assert fixed["baseline_val_acc"] == uniform["baseline_val_acc"]
    for line in (fixed, uniform):
        assert 0.0 <= line["ours_val_acc"] <= 1.0
        assert line["ratio"] == pytest.approx(line["ours_val_acc"] / line["baseline_val_acc"], abs=1e-4)
        assert 0.0 <= line["sampled_paths_train_acc_last_quarter"] <= 1.0
    assert summary["summary"] is True and set(summary["ratios"]) == {"fixed", "all"}
    assert summary["base_path"] == fixed["base_path"] == uniform["base_path"]


def test_last_quarter_counts_at_least_one_step() -> None:
    assert SCRIPT_MODULE.last_quarter(200) == 150
    assert SCRIPT_MODULE.last_quarter(3) == 2
    assert SCRIPT_MODULE.last_quarter(1) == 0


def test_real_mode_draws_the_base_path_as_built(tiny_space: Path) -> None:
    # A budget only binary paths meet: with binarization off the float convs would break it.
    space = yaml.safe_load(tiny_space.read_text(encoding="utf-8"))
    space["constraints"] = {"max_ops": 60_000}
    tiny_space.write_text(yaml.safe_dump(space), encoding="utf-8")
    binary, real = (
        run("--space", str(tiny_space), "--steps", "4", "--modes", "fixed", *flag)[0] for flag in ((), ("--real",))
    )
    assert real["real"] is True and binary["real"] is False
    assert real["base_path"] == binary["base_path"]
