"""scripts/oneshot_cifar10.sh: both recipes hand the bnas CLI commands it accepts.

The GPU recipe cannot run on this project's CPU-only CI, so its commands are checked here
instead: a stand-in ``bnas`` on PATH records each call, and the real CLI parser must accept
every recorded command line, with the values the recipe promises."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bnas.cli import build_parser
from bnas.search.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "oneshot_cifar10.sh"


def recorded_calls(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bin_dir, record = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "bnas"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(record)!r}, 'a') as fh:\n    fh.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


@pytest.mark.parametrize(
    ("mode", "space", "device", "supernet_epochs", "trials", "top", "retrain_epochs", "timeout"),
    [
        ("gpu", "search_spaces/darts_binary.yaml", "cuda", 100, 2000, 3, 100, None),
        ("gpu-steps", "search_spaces/darts_binary.yaml", "cuda", 1, 40, 1, 1, 30.0),
        ("cpu", "search_spaces/darts_binary_proxy.yaml", "cpu", 12, 30, 1, 10, None),
    ],
)
def test_recipe_commands_parse_with_the_cli(
    tmp_path: Path,
    mode: str,
    space: str,
    device: str,
    supernet_epochs: int,
    trials: int,
    top: int,
    retrain_epochs: int,
    timeout: float | None,
) -> None:
    run = tmp_path / "run"
    done, calls = recorded_calls(tmp_path, mode, str(run))
    assert done.returncode == 0, done.stderr
    assert [c[0] for c in calls] == ["supernet", "search"]
    parser = build_parser()
    supernet, search = (parser.parse_args(c) for c in calls)
    load_space(ROOT / supernet.space)  # the recipe's space file exists and is valid
    assert supernet.space == search.space == space
    assert (supernet.out, supernet.epochs, supernet.device, supernet.resume) == (
        str(run / "supernet"),
        supernet_epochs,
        device,
        False,
    )
    assert search.supernet == str(run / "supernet" / "supernet.pt")
    assert (search.out, search.trials, search.device) == (str(run / "search"), trials, device)
    assert (search.retrain_top, search.retrain_epochs, search.timeout) == (top, retrain_epochs, timeout)
    # The CPU recipe pins one thread per process (OMP_NUM_THREADS, default 1); the GPU ones leave torch's.
    assert supernet.threads == search.threads == (1 if mode == "cpu" else None)
    assert f"summary: {run}/search/summary.md" in done.stdout


def test_rerun_resumes_the_supernet(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "supernet").mkdir(parents=True)
    (run / "supernet" / "supernet.pt").write_bytes(b"")  # a checkpoint left by an earlier sitting
    done, calls = recorded_calls(tmp_path, "gpu", str(run))
    assert done.returncode == 0, done.stderr
    assert build_parser().parse_args(calls[0]).resume is True


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    done, calls = recorded_calls(tmp_path, "tpu")
    assert done.returncode == 2 and calls == []
    assert "usage: scripts/oneshot_cifar10.sh cpu|gpu|gpu-steps [RUN]" in done.stderr
