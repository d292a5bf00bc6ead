"""Search efficiency, two comparisons. Prints JSON lines.

Pruning (default): on the quickstart space, TPE with median pruning vs random search without
pruning, same trial budget, several seeds; one line per (method, seed) and a summary line.

    python benchmarks/search_efficiency.py [--trials 20] [--seeds 0 1 2]

One-shot (``--oneshot``): on fashion_mnist_cells, the per-trial route (``--trials`` trials,
each trained with the space's budget, then the best retrained from scratch and tested) vs
the one-shot route (a supernet trained ``--supernet-epochs`` epochs, ``--oneshot-trials``
trials scored with its weights, the best ``--retrain-top`` retrained from scratch and
tested). Each route's CPU seconds (this process, one thread) count everything: supernet,
search and retraining. The summary line gives both test accuracies and the CPU ratio.

    python benchmarks/search_efficiency.py --oneshot [--trials 40] [--supernet-epochs 8]
        [--oneshot-trials 100] [--retrain-top 3] [--seeds 0]

The two routes can run as two processes, one core each (``--route per_trial > A`` and
``--route oneshot > B``, then ``--summarize A B``): each route's CPU seconds are its own
process's.

One retraining is a noisy judge (on fashion_mnist_cells the same network's 2-epoch test
accuracy spanned 2 to 5 points over five seeds). ``--eval-seeds 1 2 3 4`` retrains each
route's chosen network again with those seeds (the space's budget, the same splits) after
the route has finished; the route line gains every seed's test accuracy and their mean
(the route's own retraining, seed = the search's, included), and the summary compares the
means. These measuring retrainings are not counted in the route's ``cpu_s``: a route needs
one trained network, not five.

``--retrain-epochs E`` retrains the route's best (and the ``--eval-seeds`` retrainings) for E
epochs instead of the budget's, counted in its ``cpu_s``: the one-shot route can spend the CPU
time it saves on a longer final training. The route line and the summary give each route's
retraining length (``retrain_epochs``, ``same_retrain_epochs``), since a longer retraining
lifts any network's accuracy, not only a better architecture's.

``--rerank-top K`` (one-shot route) puts a short training between the search and the
retraining: the K best trials by supernet score each train ``--rerank-steps`` steps from
scratch (``oneshot_ranking.py --short-training``: the mean validation accuracy of two seeded
runs), and only the best of them by that is retrained, in place of ``--retrain-top``. Its CPU
seconds count in the route's (``rerank_cpu_s`` gives them apart).

``--retrain-from supernet`` (with ``--rerank-top``) starts the one-shot route's retraining, and
its ``--eval-seeds`` retrainings, from the weights the chosen network inherits from the
supernet (``bnas eval --init-from``: BatchNorm re-estimated, then the same recipe and epochs)
instead of a random initialisation. It costs what a retraining from scratch costs; the route
line says ``retrain_from``.

``--oneshot-min-ops N`` gives the one-shot route's space a floor on its networks' OPs
(``constraints: {min_ops: N}``) beside the space's own ``max_ops``: its supernet's feasible
paths (``--paths feasible``), its search and so its rerank all stay within that band of sizes.
The per-trial route keeps the space as it is. The route line says ``min_ops``.

``--route proxy`` runs a third route for the comparison: the per-trial route on a proxy task.
The same search (``--trials`` trials, the space's sampler, seed and constraints), but every
trial trains ``--proxy-epochs`` epochs on a seeded ``--proxy-subset`` of the training images
(the space's ``train_subset``, replacing any the space has; validation on the full split). The
best ``--retrain-top`` trials (default 1) by that score are then retrained from scratch with the
space's own budget on its full training set, and the best of them by validation is tested. With
the defaults (3,200 images, 1 epoch, batch 128) a trial trains 25 steps at the budget's
initial learning rate, the short training ``oneshot_ranking.py --short-training 25`` ranks by.
``--summarize`` compares it with the per-trial route as it does the one-shot route.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from bnas.evaluate import Initialiser, evaluate  # noqa: E402
from bnas.genotype import Genotype, load_genotype  # noqa: E402
from bnas.search import SearchConfig, run_search_study  # noqa: E402
from bnas.search.config import SUPERNET_SCORES  # noqa: E402
from bnas.search.objective import search_data  # noqa: E402
from bnas.search.path_sampling import PATHS  # noqa: E402
from bnas.search.retrain import retrain_candidates, retrain_overrides, retrain_top  # noqa: E402
from bnas.search.space import SAMPLERS, SearchSpace, load_space  # noqa: E402
from bnas.search.stats import epochs_saved  # noqa: E402
from bnas.search.supernet import KERNELS, WIDTHS  # noqa: E402
from bnas.search.supernet_run import SUPERNET_FILE, supernet_initialiser, train_supernet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The routes --summarize compares with the per-trial route.
OTHER_ROUTES = ("oneshot", "proxy")
METHODS = {"tpe+median_pruning": ("tpe", "median"), "random_no_pruning": ("random", "none")}


def _best_retrained(study: Any, cfg: SearchConfig, data: Any) -> dict[str, Any]:
    """Retrain the route's best ``cfg.retrain_top`` trials; the one with the best retrained
    validation accuracy is the route's result (its test accuracy is never used to pick)."""
    results = retrain_top(study, cfg, data)
    number, best = max(results.items(), key=lambda item: (item[1]["val_acc"], -item[0]))
    return {
        "trial": number,
        "retrained_val_acc": best["val_acc"],
        "retrained_test_acc": best["test_acc"],
        "retrained": len(results),
    }


def _initialiser(cfg: SearchConfig, genotype: Genotype, retrain_from: str) -> Initialiser | None:
    """Where a retraining starts: a random initialisation, or (``supernet``) the weights
    ``genotype`` inherits from the route's supernet."""
    if retrain_from == "scratch":
        return None
    assert cfg.supernet is not None, "--retrain-from supernet needs the one-shot route"
    return supernet_initialiser(cfg.supernet, genotype)


def _seeded_retrainings(cfg: SearchConfig, row: dict[str, Any], data: Any, seeds: list[int]) -> dict[str, Any]:
    """The chosen trial's network retrained again with each of ``seeds`` (the route's
    retraining recipe and starting weights, the same splits): every test accuracy with its
    seed, the route's own first, and the mean. Measurement only: its CPU seconds are reported
    apart from the route's."""
    cpu0 = time.process_time()
    genotype = load_genotype(cfg.out / "genotypes" / f"trial-{row['trial']}.yaml")
    accs = {cfg.seed: row["retrained_test_acc"]}
    for seed in seeds:
        if seed in accs:
            continue
        # the route's own retraining recipe (``--retrain-epochs``), with this seed
        overrides = {**retrain_overrides(cfg), "seed": seed}
        report = evaluate(
            genotype,
            cfg.space.dataset,
            overrides=overrides,
            out=cfg.out / "eval" / f"seed{seed}",
            progress=False,
            data=data,
            test=True,
            initialise=_initialiser(cfg, genotype, row.get("retrain_from", "scratch")),
        )
        accs[seed] = float(report["test_acc"])
    return {
        "eval_test_accs": {str(s): a for s, a in accs.items()},
        "eval_test_acc_mean": round(statistics.mean(accs.values()), 5),
        "eval_cpu_s": round(time.process_time() - cpu0, 1),
    }


def _closed_row(
    row: dict[str, Any], cpu0: float, cfg: SearchConfig, data: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """A route's line, completed: its CPU seconds since ``cpu0``, then (not counted in them)
    the ``--eval-seeds`` retrainings of its pick."""
    row["cpu_s"] = round(time.process_time() - cpu0, 1)
    if args.eval_seeds:
        row.update(_seeded_retrainings(cfg, row, data, args.eval_seeds))
    return row


def _reranked_retrained(
    study: Any, cfg: SearchConfig, data: Any, top: int, steps: int, retrain_from: str
) -> dict[str, Any]:
    """``--rerank-top``: the study's ``top`` best trials by supernet score each train ``steps``
    steps from scratch (``oneshot_ranking.short_training_score``: mean validation accuracy of
    two seeded runs); only the best of them by that is retrained (the route's recipe, from
    ``retrain_from``) and tested. Ties go to the better supernet score."""
    from oneshot_ranking import short_training_score

    from bnas.search.supernet import supernet_recipe

    cpu0 = time.process_time()
    candidates = retrain_candidates(study, top)
    recipe = supernet_recipe(cfg.space)
    genotypes = {t.number: load_genotype(cfg.out / "genotypes" / f"trial-{t.number}.yaml") for t in candidates}
    short = {n: short_training_score(genotype, data, recipe, steps, cfg.seed) for n, genotype in genotypes.items()}
    number = max(short, key=lambda n: short[n])  # max keeps the first (best supernet score) of equals
    rerank_cpu = time.process_time() - cpu0
    report = evaluate(
        genotypes[number],
        cfg.space.dataset,
        overrides=retrain_overrides(cfg),
        out=cfg.out / "retrain" / f"trial-{number}",
        progress=False,
        data=data,
        test=True,
        initialise=_initialiser(cfg, genotypes[number], retrain_from),
    )
    return {
        "trial": number,
        "retrained_val_acc": float(report["best_val_acc"]),
        "retrained_test_acc": float(report["test_acc"]),
        "retrained": 1,
        "rerank_steps": steps,
        "rerank_cpu_s": round(rerank_cpu, 1),
        "rerank_short_val_acc": {str(n): round(a, 5) for n, a in short.items()},
        "rerank_supernet_acc": {str(t.number): t.values[0] for t in candidates},
    }


def _retrain_epochs(cfg: SearchConfig) -> int:
    """How long the route's retrainings train: ``--retrain-epochs``, else the space's budget."""
    return int(retrain_overrides(cfg).get("epochs", cfg.space.budget["epochs"]))


def per_trial_route(space: Any, seed: int, data: Any, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every trial trains; the best is retrained from scratch and tested."""
    cpu0 = time.process_time()
    cfg = SearchConfig(
        space=space,
        out=folder / "per-trial",
        trials=args.trials,
        seed=seed,
        progress=False,
        retrain_top=1,
        retrain_epochs=args.retrain_epochs,
    )
    study = run_search_study(cfg)
    search_cpu = time.process_time() - cpu0
    row = {
        "route": "per_trial",
        "trials": args.trials,
        "search_cpu_s": round(search_cpu, 1),
        "retrain_epochs": _retrain_epochs(cfg),
        **_best_retrained(study, cfg, data),
    }
    return _closed_row(row, cpu0, cfg, data, args)


def floored_space(space: SearchSpace, min_ops: float | None) -> SearchSpace:
    """``space`` with ``constraints.min_ops`` set to ``min_ops`` (``--oneshot-min-ops``), if given."""
    if not min_ops:
        return space
    max_ops = space.constraints.get("max_ops")
    if max_ops is not None and min_ops > max_ops:
        raise SystemExit(
            f"--oneshot-min-ops {min_ops:g} is above the space's max_ops {max_ops:g}; no network meets both"
        )
    return dataclasses.replace(space, constraints={**space.constraints, "min_ops": float(min_ops)})


def oneshot_route(space: Any, seed: int, data: Any, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One supernet, trials scored with its weights, the best K retrained from scratch."""
    cpu0 = time.process_time()
    train_supernet(
        space,
        folder / "supernet",
        epochs=args.supernet_epochs,
        seed=seed,
        data=data,
        widths=args.widths,
        kernels=args.kernels,
        paths=args.paths,
    )
    supernet_cpu = time.process_time() - cpu0
    cfg = SearchConfig(
        space=space,
        out=folder / "oneshot",
        trials=args.oneshot_trials,
        seed=seed,
        progress=False,
        supernet=folder / "supernet" / SUPERNET_FILE,
        retrain_top=0 if args.rerank_top else (3 if args.retrain_top is None else args.retrain_top),
        finetune_steps=args.finetune_steps,
        supernet_score=args.supernet_score,
        sampler=args.oneshot_sampler,
        retrain_epochs=args.retrain_epochs,
    )
    study = run_search_study(cfg)
    search_cpu = time.process_time() - cpu0 - supernet_cpu
    if args.rerank_top:
        picked = _reranked_retrained(study, cfg, data, args.rerank_top, args.rerank_steps, args.retrain_from)
    else:
        picked = _best_retrained(study, cfg, data)
    row = {
        "route": "oneshot",
        "trials": args.oneshot_trials,
        "supernet_epochs": args.supernet_epochs,
        "widths": args.widths,
        "kernels": args.kernels,
        "paths": args.paths,
        "min_ops": args.oneshot_min_ops,
        "finetune_steps": args.finetune_steps,
        "supernet_score": args.supernet_score,
        "sampler": args.oneshot_sampler or space.sampler,
        "supernet_cpu_s": round(supernet_cpu, 1),
        "search_cpu_s": round(search_cpu, 1),
        "retrain_epochs": _retrain_epochs(cfg),
        "retrain_from": args.retrain_from,
        **picked,
    }
    return _closed_row(row, cpu0, cfg, data, args)


def proxy_space(space: SearchSpace, subset: int, epochs: int) -> SearchSpace:
    """``space`` whose trials train ``epochs`` epochs on a seeded ``subset`` of the training images."""
    return dataclasses.replace(space, train_subset=subset, budget={**space.budget, "epochs": epochs})


def proxy_route(space: Any, seed: int, data: Any, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The per-trial search on a proxy task (``proxy_space``); its best ``--retrain-top`` trials
    (default 1) by proxy score are retrained with the space's own budget on the full training
    set, and the best of them by retrained validation accuracy is tested."""
    cpu0 = time.process_time()
    cfg = SearchConfig(
        space=proxy_space(space, args.proxy_subset, args.proxy_epochs),
        out=folder / "proxy",
        trials=args.trials,
        seed=seed,
        progress=False,
        # The proxy budget is the space's but for its epochs: retrained with the space's
        # epochs (or --retrain-epochs), a trial's genotype trains with the space's recipe.
        retrain_top=1 if args.retrain_top is None else args.retrain_top,
        retrain_epochs=args.retrain_epochs or space.epochs,
    )
    study = run_search_study(cfg)
    search_cpu = time.process_time() - cpu0
    candidates = retrain_candidates(study, cfg.retrain_top)
    if not candidates:
        raise SystemExit(f"--route proxy, seed {seed}: no trial of the proxy search completed")
    picked = _best_retrained(study, cfg, data)
    row = {
        "route": "proxy",
        "trials": args.trials,
        "proxy_subset": args.proxy_subset,
        "proxy_epochs": args.proxy_epochs,
        "search_cpu_s": round(search_cpu, 1),
        "retrain_epochs": _retrain_epochs(cfg),
        **picked,
        "proxy_val_acc": {str(t.number): t.values[0] for t in candidates},
    }
    return _closed_row(row, cpu0, cfg, data, args)


def summarize(files: list[str]) -> None:
    """The summary lines of route lines printed earlier (``--route per_trial`` and
    ``--route oneshot`` run as two processes), paired by space and seed."""
    routes: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for name in files:
        for line in Path(name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("benchmark") == "search_efficiency_oneshot" and "route" in row:
                routes.setdefault((row["space"], row["seed"]), {})[row["route"]] = row
    pairs = [
        (space, seed, got["per_trial"], got[route])
        for (space, seed), got in sorted(routes.items())
        for route in OTHER_ROUTES
        if "per_trial" in got and route in got
    ]
    if not pairs:
        raise SystemExit(
            f"--summarize {' '.join(files)}: no space and seed with both a per_trial and a oneshot or proxy line"
        )
    for space, seed, base, ours in pairs:
        emit(_summary(space, seed, base, ours))


def _summary(space: str, seed: int, base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    reached = ours["retrained_test_acc"] >= base["retrained_test_acc"]
    return {
        "benchmark": "search_efficiency_oneshot",
        "summary": True,
        "space": space,
        "seed": seed,
        "baseline": "per_trial",
        "baseline_trials": base["trials"],
        "baseline_test_acc": base["retrained_test_acc"],
        "baseline_cpu_s": base["cpu_s"],
        "ours": ours.get("route", "oneshot"),
        "ours_trials": ours["trials"],
        **_route_settings(ours),
        "ours_test_acc": ours["retrained_test_acc"],
        "ours_cpu_s": ours["cpu_s"],
        "baseline_retrain_epochs": base.get("retrain_epochs"),
        "ours_retrain_epochs": ours.get("retrain_epochs"),
        "same_retrain_epochs": base.get("retrain_epochs") == ours.get("retrain_epochs"),
        "cpu_ratio_ours_over_baseline": round(ours["cpu_s"] / base["cpu_s"], 3),
        "reached_baseline_acc": reached,
        "meets_one_fifth": reached and ours["cpu_s"] <= base["cpu_s"] / 5,
        **_mean_comparison(base, ours),
        "loadavg": os.getloadavg(),
        **machine(),
    }


def _route_settings(ours: dict[str, Any]) -> dict[str, Any]:
    """What the compared route was run with: the supernet's settings, or the proxy task's."""
    if ours.get("route") == "proxy":
        return {"ours_proxy_subset": ours["proxy_subset"], "ours_proxy_epochs": ours["proxy_epochs"]}
    return {
        "ours_supernet_epochs": ours["supernet_epochs"],
        "ours_widths": ours.get("widths"),
        "ours_kernels": ours.get("kernels", "separate"),
        "ours_min_ops": ours.get("min_ops"),
        "ours_paths": ours.get("paths", "all"),
        "ours_finetune_steps": ours.get("finetune_steps", 0),
        "ours_supernet_score": ours.get("supernet_score", "accuracy"),
        "ours_retrain_from": ours.get("retrain_from", "scratch"),
    }


def _mean_comparison(base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """The two chosen networks compared by their mean test accuracy over the same retraining
    seeds (``--eval-seeds``), when both routes have them."""
    base_accs, ours_accs = base.get("eval_test_accs"), ours.get("eval_test_accs")
    if not base_accs or not ours_accs:
        return {}
    if set(base_accs) != set(ours_accs):
        raise SystemExit(f"--eval-seeds differ between the routes: {sorted(base_accs)} and {sorted(ours_accs)}")
    base_mean, ours_mean = statistics.mean(base_accs.values()), statistics.mean(ours_accs.values())
    reached = ours_mean >= base_mean
    return {
        "eval_seeds": sorted(int(s) for s in base_accs),
        "baseline_test_acc_mean": round(base_mean, 5),
        "ours_test_acc_mean": round(ours_mean, 5),
        "reached_baseline_mean_acc": reached,
        "meets_one_fifth_by_mean": reached and ours["cpu_s"] <= base["cpu_s"] / 5,
    }


def oneshot_vs_per_trial(args: argparse.Namespace) -> None:
    space = load_space(args.space or str(REPO / "search_spaces" / "fashion_mnist_cells.yaml"))
    oneshot_space = floored_space(space, args.oneshot_min_ops)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        data = search_data(space, seed)
        head = {"benchmark": "search_efficiency_oneshot", "space": space.name, "seed": seed}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.keep) / f"seed{seed}" if args.keep else Path(tmp)
            if args.keep and folder.exists():
                raise SystemExit(f"--keep {args.keep}: {folder} exists; choose an empty folder")
            per_trial = oneshot = None
            if args.route in ("both", "per_trial"):
                per_trial = {**head, **per_trial_route(space, seed, data, folder, args)}
                emit(per_trial)
            if args.route in ("both", "oneshot"):
                oneshot = {**head, **oneshot_route(oneshot_space, seed, data, folder, args)}
                emit(oneshot)
            if args.route == "proxy":
                emit({**head, **proxy_route(space, seed, data, folder, args)})
            if per_trial and oneshot:
                rows.append((seed, per_trial, oneshot))
    for seed, base, ours in rows:
        emit(_summary(space.name, seed, base, ours))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", help="default: quickstart (pruning) or fashion_mnist_cells (--oneshot)")
    parser.add_argument("--trials", type=int, default=None, help="default 20 (pruning) or 40 (--oneshot)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (pruning) or 0 (--oneshot)")
    parser.add_argument("--oneshot", action="store_true", help="compare the one-shot route with the per-trial one")
    parser.add_argument("--supernet-epochs", type=int, default=8)
    parser.add_argument("--oneshot-trials", type=int, default=100)
    parser.add_argument(
        "--retrain-top",
        type=int,
        default=None,
        metavar="K",
        help="--oneshot: retrain the route's best K (default 3 for the one-shot route, 1 for proxy) "
        "and keep the best by validation",
    )
    parser.add_argument(
        "--widths", choices=WIDTHS, default="separate", help="--oneshot: the supernet's widths (bnas supernet --widths)"
    )
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default="separate",
        help="--oneshot: the supernet's kernels (bnas supernet --kernels)",
    )
    parser.add_argument(
        "--oneshot-min-ops",
        type=float,
        default=None,
        metavar="N",
        help="--oneshot: a floor on the one-shot route's OPs (constraints: {min_ops: N}) for its supernet's "
        "feasible paths, its search and its rerank; the per-trial route keeps the space as it is",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="--oneshot: steps each trial's inherited weights train before scoring",
    )
    parser.add_argument(
        "--paths", choices=PATHS, default="all", help="--oneshot: the paths the supernet trains (bnas supernet --paths)"
    )
    parser.add_argument(
        "--supernet-score",
        choices=SUPERNET_SCORES,
        default="accuracy",
        help="--oneshot: what scores a trial (bnas search --supernet-score): inherited accuracy, or ABS's angle",
    )
    parser.add_argument(
        "--oneshot-sampler",
        choices=SAMPLERS,
        default=None,
        help="--oneshot: the one-shot search's sampler (bnas search --sampler; default: the space's)",
    )
    parser.add_argument(
        "--route",
        choices=("both", "per_trial", "oneshot", "proxy"),
        default="both",
        help="--oneshot: run both routes, or one (see --summarize); proxy: the per-trial search on a proxy task",
    )
    parser.add_argument(
        "--proxy-subset",
        type=int,
        default=3200,
        metavar="N",
        help="--route proxy: each trial trains on a seeded N of the training images (the space's train_subset)",
    )
    parser.add_argument(
        "--proxy-epochs", type=int, default=1, metavar="E", help="--route proxy: each trial trains E epochs"
    )
    parser.add_argument(
        "--eval-seeds",
        type=int,
        nargs="+",
        default=[],
        metavar="SEED",
        help="--oneshot: retrain each route's chosen network again with these seeds and compare "
        "the mean test accuracies (not counted in the route's CPU seconds)",
    )
    parser.add_argument(
        "--retrain-epochs",
        type=int,
        default=None,
        help="--oneshot: the route's retrainings (its best, --eval-seeds) train E epochs "
        "(default: the space's budget); counted in its CPU seconds",
    )
    parser.add_argument(
        "--rerank-top",
        type=int,
        default=0,
        metavar="K",
        help="--oneshot: the K best trials by supernet score each train --rerank-steps steps from scratch "
        "(mean of 2 seeded runs) and only the best of them by that is retrained (instead of --retrain-top); "
        "counted in the route's CPU seconds",
    )
    parser.add_argument("--rerank-steps", type=int, default=25, help="--oneshot --rerank-top: training steps each")
    parser.add_argument(
        "--retrain-from",
        choices=("scratch", "supernet"),
        default="scratch",
        help="--oneshot --rerank-top: the one-shot route's retrainings (its pick, --eval-seeds) start from a random "
        "initialisation, or from the weights the pick inherits from the supernet (bnas eval --init-from)",
    )
    parser.add_argument("--keep", help="--oneshot: keep the runs (supernet, studies, retrainings) in DIR/seedS")
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="FILE",
        help="--oneshot: the summary of route lines saved from two --route runs",
    )
    args = parser.parse_args(argv)
    if args.rerank_top < 0 or args.rerank_steps < 1:
        parser.error("--rerank-top must be 0 or more and --rerank-steps at least 1")
    if args.rerank_top and args.route in ("per_trial", "proxy"):
        parser.error("--rerank-top applies to the one-shot route (--route oneshot or both)")
    if args.retrain_from == "supernet" and not (args.rerank_top and args.route in ("both", "oneshot")):
        parser.error("--retrain-from supernet applies to the one-shot route with --rerank-top")
    if args.oneshot_min_ops is not None and (args.oneshot_min_ops <= 0 or args.route not in ("both", "oneshot")):
        parser.error("--oneshot-min-ops must be positive and applies to the one-shot route (--route oneshot or both)")
    if args.retrain_top is not None and args.retrain_top < 1:
        parser.error("--retrain-top must be at least 1")
    if args.proxy_subset < 1 or args.proxy_epochs < 1:
        parser.error("--proxy-subset and --proxy-epochs must be at least 1")
    if args.supernet_score == "angle" and args.finetune_steps:
        parser.error(
            "--finetune-steps trains each trial before it is evaluated on data; --supernet-score angle reads none"
        )
    if args.oneshot and args.summarize:
        summarize(args.summarize)
        return 0
    if args.oneshot:
        args.seeds = args.seeds or [0]
        args.trials = args.trials or 40
        oneshot_vs_per_trial(args)
        return 0
    args.seeds = args.seeds or [0, 1, 2]
    args.trials = args.trials or 20
    space = load_space(args.space or str(REPO / "search_spaces" / "quickstart.yaml"))
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method, (sampler, pruner) in METHODS.items():
            with tempfile.TemporaryDirectory() as tmp:
                cfg = SearchConfig(
                    space=space,
                    out=Path(tmp),
                    trials=args.trials,
                    sampler=sampler,
                    pruner=pruner,
                    seed=seed,
                    progress=False,
                )
                t0 = time.perf_counter()
                study = run_search_study(cfg)
                wall = time.perf_counter() - t0
                trained, _ = epochs_saved(study)
                best = max((t.values[0] for t in study.trials if t.state.name == "COMPLETE"), default=0.0)
                row = {"best_val_acc": best, "training_epochs": trained, "wall_s": round(wall, 1)}
                results[method].append(row)
                emit(
                    {
                        "benchmark": "search_efficiency",
                        "space": space.name,
                        "method": method,
                        "seed": seed,
                        "trials": args.trials,
                        **row,
                    }
                )
    summary = {
        m: {k: round(statistics.mean(r[k] for r in rows), 4) for k in ("best_val_acc", "training_epochs", "wall_s")}
        for m, rows in results.items()
    }
    tpe, rnd = summary["tpe+median_pruning"], summary["random_no_pruning"]
    emit(
        {
            "benchmark": "search_efficiency",
            "summary": True,
            "space": space.name,
            "trials": args.trials,
            "seeds": args.seeds,
            "baseline": "random_no_pruning",
            "baseline_mean": rnd,
            "ours": "tpe+median_pruning",
            "ours_mean": tpe,
            "epochs_ratio_ours_over_baseline": round(tpe["training_epochs"] / max(rnd["training_epochs"], 1), 3),
            **machine(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
