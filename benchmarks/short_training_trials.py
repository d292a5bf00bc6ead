"""Score a finished search's trials by a short training from scratch.

``oneshot_ranking.py --short-training STEPS`` ranks a random sample of architectures by the
validation accuracy they reach after STEPS steps of their own training. This script asks the
same of the trials a search actually ran, to tell where a route lost its best network: run on
a per-trial search it shows whether the short score would have found that search's pick (its
trials carry their full-budget validation accuracy); run on a one-shot search it shows whether
any trial the supernet led to scores as high, and how the supernet's order agrees with it.

    python benchmarks/short_training_trials.py RUN [RUN ...] --steps 25 --threads 1

RUN is a search's output folder (``bnas search --out``; ``search_efficiency.py --keep K``
leaves them under ``K/seed<S>/per-trial`` and ``K/seed<S>/oneshot``). Each COMPLETE trial is
scored exactly as the ranking benchmark scores an architecture (``short_training_score``: mean
validation accuracy of two seeded runs, seeded with the study's seed, on the study's splits).
One JSON line per trial (its number, the study's first objective value, the short score, the
CPU seconds), then one summary line per run: Kendall tau and Spearman rho between the two,
the best trial by the study and its place in the short score's order, and the best by the
short score.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402
from oneshot_ranking import rank_correlations, short_training_score  # noqa: E402

from bnas.errors import BnasError  # noqa: E402
from bnas.genotype import load_genotype  # noqa: E402


def completed_trials(run: Path) -> tuple[dict[str, Any], list[Any]]:
    """The run's ``run.json`` and its study's COMPLETE trials, in trial order."""
    import optuna

    manifest_file = run / "run.json"
    if not manifest_file.is_file():
        raise BnasError(f"{manifest_file}: no such file; RUN must be a search's output folder (bnas search --out)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=manifest["study"], storage=manifest["storage"])
    return manifest, [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def score_run(run: Path, steps: int, device: str) -> dict[str, Any]:
    """Print one line per COMPLETE trial of the search in ``run``; returns the run's summary line."""
    from bnas.search.objective import search_data
    from bnas.search.space import load_space
    from bnas.search.supernet import supernet_recipe

    manifest, trials = completed_trials(run)
    if not trials:
        raise BnasError(f"{run}: the study has no COMPLETE trial to score")
    space = load_space(manifest["space"])
    seed = int(manifest["seed"])
    data, recipe = search_data(space, seed), supernet_recipe(space)
    lines = []
    for trial in trials:
        cpu0 = time.process_time()
        genotype = load_genotype(run / "genotypes" / f"trial-{trial.number}.yaml")
        short = short_training_score(genotype, data, recipe, steps, seed, device)
        line = {
            "benchmark": "short_training_trials",
            "run": str(run),
            "trial": trial.number,
            "search_value": float(trial.values[0]),
            "short_training_val_acc": round(short, 5),
            "cpu_s": round(time.process_time() - cpu0, 2),
        }
        emit(line)
        lines.append(line)
    return summarize_run(run, manifest, lines, steps)


def summarize_run(run: Path, manifest: dict[str, Any], lines: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Agreement between the study's values and the short scores, and where each one's best lands."""
    by_search = max(lines, key=lambda r: r["search_value"])
    by_short = sorted(lines, key=lambda r: -r["short_training_val_acc"])
    return {
        "benchmark": "short_training_trials",
        "summary": True,
        "run": str(run),
        "space": Path(manifest["space"]).stem,
        "seed": manifest["seed"],
        "supernet": manifest.get("supernet"),
        "steps": steps,
        "trials": len(lines),
        **rank_correlations([r["search_value"] for r in lines], [r["short_training_val_acc"] for r in lines]),
        "best_by_search": by_search["trial"],
        "best_by_search_short_rank": 1 + by_short.index(by_search),
        "best_by_search_short_val_acc": by_search["short_training_val_acc"],
        "best_by_short": by_short[0]["trial"],
        "best_short_val_acc": by_short[0]["short_training_val_acc"],
        "cpu_s": round(sum(r["cpu_s"] for r in lines), 1),
        "machine": machine(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a search's output folder")
    parser.add_argument("--steps", type=int, default=25, help="training steps from scratch (default 25)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for run in args.runs:
            emit(score_run(run, args.steps, args.device))
    except BnasError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
