"""Search throughput with 1 and 2 worker processes on one study (short trials), same run.

Each configuration runs the same small digits space for a fixed number of trials with a
journal-file storage; prints one JSON line per configuration and the ratio.

    python benchmarks/workers.py [--trials 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def space_text() -> str:
    """The small space the search tests share (tests/data/tiny_space.yaml), with four ops,
    two epochs per trial and no pruning."""
    space = yaml.safe_load((REPO / "tests" / "data" / "tiny_space.yaml").read_text())
    space["name"] = "workers_bench"
    space["cells"]["ops"] = ["binary_conv_3x3", "skip_connect", "bireal_block", "binary_dil_conv_3x3"]
    space["budget"]["epochs"] = 2
    space["pruner"] = "none"
    return yaml.safe_dump(space, sort_keys=False)


def run(workers: int, trials: int, tmp: Path) -> float:
    space = tmp / "space.yaml"
    space.write_text(space_text())
    out = tmp / f"run-{workers}"
    cmd = [
        sys.executable,
        "-m",
        "bnas",
        "search",
        str(space),
        "--trials",
        str(trials),
        "--out",
        str(out),
        "--quiet",
        "--workers",
        str(workers),
        "--storage",
        f"journal:{out / 'study.journal'}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = {w: run(w, args.trials, Path(tmp)) for w in (1, 2)}
    rate = {w: args.trials / (t / 60) for w, t in times.items()}
    for w in (1, 2):
        emit(
            {
                "benchmark": "workers",
                "workers": w,
                "trials": args.trials,
                "wall_s": round(times[w], 1),
                "trials_per_min": round(rate[w], 2),
            }
        )
    emit(
        {
            "benchmark": "workers",
            "summary": True,
            "baseline": "1 worker",
            "ours": "2 workers",
            "baseline_trials_per_min": round(rate[1], 2),
            "ours_trials_per_min": round(rate[2], 2),
            "ratio": round(rate[2] / rate[1], 3),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
