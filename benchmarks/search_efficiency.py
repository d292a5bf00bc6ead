"""Search efficiency on the quickstart space: TPE with median pruning vs random search
without pruning, same trial budget, several seeds. Prints one JSON line per (method, seed)
and a summary line with the means side by side.

    python benchmarks/search_efficiency.py [--trials 20] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from bnas.search import SearchConfig, run_search_study  # noqa: E402
from bnas.search.space import load_space  # noqa: E402
from bnas.search.stats import epochs_saved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {"tpe+median_pruning": ("tpe", "median"), "random_no_pruning": ("random", "none")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    space = load_space(args.space)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method, (sampler, pruner) in METHODS.items():
            with tempfile.TemporaryDirectory() as tmp:
                cfg = SearchConfig(space=space, out=Path(tmp), trials=args.trials, sampler=sampler, pruner=pruner,
                                   seed=seed, progress=False)
                t0 = time.perf_counter()
                study = run_search_study(cfg)
                wall = time.perf_counter() - t0
                trained, _ = epochs_saved(study)
                best = max((t.values[0] for t in study.trials if t.state.name == "COMPLETE"), default=0.0)
                row = {"best_val_acc": best, "training_epochs": trained, "wall_s": round(wall, 1)}
                results[method].append(row)
                emit({"benchmark": "search_efficiency", "space": space.name, "method": method, "seed": seed,
                      "trials": args.trials, **row})
    summary = {m: {k: round(statistics.mean(r[k] for r in rows), 4) for k in ("best_val_acc", "training_epochs", "wall_s")}
               for m, rows in results.items()}
    tpe, rnd = summary["tpe+median_pruning"], summary["random_no_pruning"]
    emit({"benchmark": "search_efficiency", "summary": True, "space": space.name, "trials": args.trials, "seeds": args.seeds,
          "baseline": "random_no_pruning", "baseline_mean": rnd, "ours": "tpe+median_pruning", "ours_mean": tpe,
          "epochs_ratio_ours_over_baseline": round(tpe["training_epochs"] / max(rnd["training_epochs"], 1), 3),
          **machine()})


if __name__ == "__main__":
    main()
