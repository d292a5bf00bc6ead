"""Search throughput with 1 and 2 worker processes on one study (short trials), same run.

Each configuration runs the same small digits space for a fixed number of trials with a
journal-file storage, in interleaved rounds (1, 2, then 2, 1, ...) so that load from other
processes on a shared machine falls on both alike. Prints one JSON line per search, then the
median and p90 wall time of each configuration and the throughput ratio of the medians.

    python benchmarks/workers.py [--trials 8] [--rounds 3]
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
from common import emit, load_average, machine, median_p90  # noqa: E402

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
    tmp.mkdir(parents=True, exist_ok=True)
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


def trials_per_min(trials: int, wall_s: float) -> float:
    return round(trials / (wall_s / 60), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="searches per configuration, interleaved")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.rounds < 1:
        parser.error("--trials and --rounds must be at least 1")
    walls: dict[int, list[float]] = {1: [], 2: []}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            # Alternate which configuration goes first, so neither always follows the other.
            order = (1, 2) if round_index % 2 == 0 else (2, 1)
            for workers in order:
                wall_s = run(workers, args.trials, Path(tmp) / f"round-{round_index}")
                walls[workers].append(wall_s)
                emit(
                    {
                        "benchmark": "workers",
                        "round": round_index,
                        "workers": workers,
                        "trials": args.trials,
                        "wall_s": round(wall_s, 1),
                        "trials_per_min": trials_per_min(args.trials, wall_s),
                        "load_average": load_average(),
                    }
                )
    # p90 is the slow tail of the wall times; the rates come from the median walls.
    (base_median, base_p90), (ours_median, ours_p90) = median_p90(walls[1]), median_p90(walls[2])
    emit(
        {
            "benchmark": "workers",
            "summary": True,
            "baseline": "1 worker",
            "ours": "2 workers",
            "rounds": args.rounds,
            "baseline_wall_s_median": round(base_median, 1),
            "baseline_wall_s_p90": round(base_p90, 1),
            "ours_wall_s_median": round(ours_median, 1),
            "ours_wall_s_p90": round(ours_p90, 1),
            "baseline_trials_per_min": trials_per_min(args.trials, base_median),
            "ours_trials_per_min": trials_per_min(args.trials, ours_median),
            "ratio": round(base_median / ours_median, 3),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            **machine(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
