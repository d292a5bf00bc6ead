"""Ranking quality of a one-shot supernet (issue 14): how well the supernet's scores of N
sampled architectures agree with the accuracy each reaches trained stand-alone.

N distinct architectures satisfying the space's constraints are sampled uniformly with a
seeded ``random.Random``. Each is trained stand-alone with the space's budget, seeded exactly
as a search trial is (stand-alone results are cached per genotype hash and written after each
architecture, so an interrupted run resumes and several supernets share one set of
trainings). Each is then scored with a supernet (BN-recalibrated validation accuracy with the
inherited weights), and Kendall tau and Spearman rho between the two are reported. JSON lines
on stdout: one per architecture, then a summary; progress on stderr.

``--supernet A.pt B.pt ...`` scores with an ensemble of supernets (trained apart: another
recipe, or another run): each ranks the architectures by its own score and an architecture's
score is its mean rank over them. The summary's ``per_supernet_kendall_tau`` gives each
supernet's own tau beside the ensemble's, and ``*_by_mean_acc`` the ensemble's tau when it
ranks by the mean accuracy instead (a score one trial can be given alone).

``--standalone-only --part K/N`` trains only every N-th architecture, from the K-th on (K in
1..N), so N processes, one thread each, can share the stand-alone phase. The cache is saved
by merging into the file on disk under a lock, so parts sharing one cache file lose nothing;
a later run without ``--part`` finds every result there.

``--train-seeds 0 1`` trains every architecture once per seed (same architectures, same data
split; only the initialisation and batch order change). The stand-alone accuracy is then the
mean over the seeds, and the summary gives the rank agreement between the seeds themselves
(``standalone_seed_tau``): how far a single stand-alone training can be trusted as ground truth.

    python benchmarks/oneshot_ranking.py [--space SPACE.yaml] [--archs 20] [--seed 0]
        [--standalone-only | --supernet RUN/supernet.pt [RUN2/supernet.pt ...] | --supernet-epochs E [--distill] [--widths W] [--kernels K] [--paths P] [--sampling S]]
        [--calibration-batches 8] [--finetune-steps 0] [--probe-samples 0] [--standalone-cache FILE] [--train-seeds 0 1] [--threads 1]
        [--part K/N (with --standalone-only)] [--training-free] [--short-training STEPS]

The summary gives Kendall tau and Spearman rho for two supernet scores: the validation
accuracy with the inherited weights, and their validation loss (`*_by_loss`, lower ranks higher).
With ``--probe-samples N`` both come from a linear probe refitted on each architecture's own
features for N training images (``bnas.search.linear_probe``) instead of from the supernet's
shared classifier. A third score needs no data: ABS's angle metric (Hu et al. 2020,
``*_by_angle``), the angle between the vector of the path's conv and linear weights in the
untrained supernet (rebuilt from the supernet's seed) and in the trained one; a larger angle
ranks higher.

Baselines are ranked beside the supernet against the same stand-alone accuracies: the
architecture's OPs alone (``*_by_ops``, always); with ``--training-free`` a score that
trains nothing (``*_training_free``): Mellor et al.'s NASWOT taken on a binary network's own
codes, the log-determinant of how often the signs each binarizing layer takes agree between
128 seeded training images, averaged over 3 random initialisations; and with
``--short-training STEPS`` (``*_short_training``) each architecture's validation accuracy after STEPS
steps of its own training from scratch (the space's budget optimiser and batch size, mean of 2
seeded runs), what a per-trial search would learn from a budget of a few steps. A supernet
that ranks no better than these has not paid for its training.

When two or more of the supernet, ``--training-free`` and ``--short-training`` score the same
architectures, the summary also ranks by their combination: each score ranks the
architectures, and an architecture's combined score is its mean rank (as an ensemble of
supernets is combined). ``*_supernet_and_short_training`` and the like name each pair, and
``*_supernet_and_training_free_and_short_training`` all three. Scores whose errors differ
gain from this; supernets trained alike did not (their ensembles rank as each alone).
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from bnas.atomic import write_text_atomic  # noqa: E402
from bnas.data import DataSplits  # noqa: E402
from bnas.errors import BnasError  # noqa: E402
from bnas.evaluate import evaluate  # noqa: E402
from bnas.search.constraints import violations  # noqa: E402
from bnas.search.objective import _trial_metrics, search_data  # noqa: E402
from bnas.search.path_sampling import PATHS, SAMPLINGS  # noqa: E402
from bnas.search.space import SearchSpace, load_space, sample_genotype  # noqa: E402
from bnas.search.supernet import KERNELS, WIDTHS  # noqa: E402
from bnas.signal_flow import constant_output  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = "oneshot_ranking"
CACHE_FORMAT = 1
log = logging.getLogger(BENCHMARK)


class RankingError(BnasError):
    """A flag or cache file this benchmark cannot work with."""


class _Uniform:
    """A trial-like object answering every ``suggest_categorical`` uniformly from ``rng``
    (as ``Supernet.sample_choices`` does), recording its answers."""

    number = 0

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.params: dict[str, Any] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        value = choices[self.rng.randrange(len(choices))]
        self.params[name] = value
        return value


def sample_archs(space: SearchSpace, n: int, seed: int, max_draws: int | None = None) -> list[dict[str, Any]]:
    """``n`` distinct (by canonical hash) genotypes of ``space`` meeting its constraints (and,
    as a search requires, with an output that depends on the input), drawn
    uniformly with ``random.Random(seed)``; each as ``{genotype, hash, choices, metrics}``."""
    rng = random.Random(seed)
    limit = max_draws if max_draws is not None else 200 * n
    archs: list[dict[str, Any]] = []
    seen: set[str] = set()
    draws = rejected = 0
    while len(archs) < n and draws < limit:
        draws += 1
        answer = _Uniform(rng)
        genotype = sample_genotype(answer, space)
        digest = genotype.canonical_hash()
        if digest in seen:
            continue
        seen.add(digest)
        metrics = _trial_metrics(genotype, with_latency=space.needs_latency)
        if violations(metrics, dict(space.constraints)) or constant_output(genotype) is not None:
            rejected += 1
            continue
        named = replace(genotype, name=f"{space.name}-rank-{len(archs)}")
        archs.append({"genotype": named, "hash": digest, "choices": answer.params, "metrics": metrics})
    if len(archs) < n:
        raise RankingError(
            f"--archs {n}: only {len(archs)} distinct genotypes of {space.source or space.name} meet its constraints "
            f"after {draws} draws ({rejected} rejected: over budget or with a constant output); ask for fewer --archs or loosen `constraints:`"
        )
    log.info("sampled %d archs in %d draws (%d distinct ones rejected by constraints)", n, draws, rejected)
    return archs


# --------------------------------------------------------------------------------------
# Stand-alone phase
# --------------------------------------------------------------------------------------
def load_cache(path: Path, space: SearchSpace, seed: int, train_seed: int | None = None) -> dict[str, Any]:
    """The cache at ``path`` (an empty one when absent); refuses one made for another space,
    seed or training seed (``train_seed``, default ``seed``; a cache without one used ``seed``)."""
    train_seed = seed if train_seed is None else train_seed
    empty = {
        "format": CACHE_FORMAT,
        "space": space.name,
        "fingerprint": space.fingerprint(),
        "seed": seed,
        "train_seed": train_seed,
        "archs": {},
    }
    if not path.exists():
        return empty
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RankingError(
            f"--standalone-cache {path}: not a readable JSON cache ({exc}); delete it or choose another file"
        ) from exc
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("archs"), dict):
        raise RankingError(f"--standalone-cache {path}: not a {BENCHMARK} cache; delete it or choose another file")
    if cache.get("fingerprint") != space.fingerprint() or cache.get("seed") != seed:
        raise RankingError(
            f"--standalone-cache {path}: made for space {cache.get('space')!r} (another fingerprint) or seed "
            f"{cache.get('seed')} (asked: {space.name!r}, seed {seed}); choose another cache file"
        )
    if cache.get("train_seed", cache.get("seed")) != train_seed:
        raise RankingError(
            f"--standalone-cache {path}: trained with seed {cache.get('train_seed', cache.get('seed'))} "
            f"(asked: training seed {train_seed}); choose another cache file"
        )
    return cache


def cache_paths(base: Path, seed: int, train_seeds: list[int]) -> list[Path]:
    """One cache file per training seed: ``base`` for ``seed`` itself, ``base`` with ``-trainT``
    before its suffix for another seed T."""
    return [base if t == seed else base.with_name(f"{base.stem}-train{t}{base.suffix}") for t in train_seeds]


def save_cache(path: Path, cache: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Merge ``cache``'s results into the file at ``path`` and write it atomically, under an
    exclusive lock on ``path`` + ``.lock``: processes sharing the file (``--part``) each add
    their own results and lose none of the others'. Returns the merged cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        on_disk = load_cache(path, space, cache["seed"], cache["train_seed"])
        merged = {**cache, "archs": {**on_disk["archs"], **cache["archs"]}}
        write_text_atomic(path, json.dumps(merged, indent=1, sort_keys=True) + "\n", what="stand-alone cache")
    return merged


def in_part(index: int, part: tuple[int, int] | None) -> bool:
    """Whether architecture ``index`` (from 0) belongs to ``--part K/N``: every N-th from the K-th."""
    return part is None or index % part[1] == part[0] - 1


def parse_part(text: str) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N, as ``--part`` takes it."""
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"{text!r}: give K/N with 1 <= K <= N, e.g. 1/2 and 2/2 for two processes")
    return int(k), int(n)


def standalone_phase(
    archs: list[dict[str, Any]],
    space: SearchSpace,
    seed: int,
    cache_path: Path,
    get_data: Any,
    device: str,
    train_seed: int | None = None,
) -> dict[str, Any]:
    """Train every arch not in the cache (as a search trial would, with ``train_seed``, default
    ``seed``), saving the cache after each; sets ``arch["standalone"]`` and ``arch["cached"]``."""
    train_seed = seed if train_seed is None else train_seed
    cache = load_cache(cache_path, space, seed, train_seed)
    for i, arch in enumerate(archs):
        entry = cache["archs"].get(arch["hash"])
        if entry is not None:
            arch["standalone"], arch["cached"] = entry, True
            continue
        log.info(
            "stand-alone %d/%d (training seed %d): %s (%.0f ops)",
            i + 1,
            len(archs),
            train_seed,
            arch["hash"],
            arch["metrics"]["ops"],
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = evaluate(
            arch["genotype"],
            space.dataset,
            device=device,
            data=get_data(),
            test=False,
            progress=False,
            overrides={"seed": train_seed},
        )
        entry = {
            "val_acc": float(report["best_val_acc"]),
            "cpu_s": round(time.process_time() - cpu0, 2),
            "wall_s": round(time.perf_counter() - wall0, 2),
            "ops": arch["metrics"]["ops"],
            "choices": arch["choices"],
        }
        log.info("  val acc %.4f, %.0f CPU s", entry["val_acc"], entry["cpu_s"])
        cache["archs"][arch["hash"]] = entry
        cache = save_cache(cache_path, cache, space)
        arch["standalone"], arch["cached"] = entry, False
    return cache


# --------------------------------------------------------------------------------------
# Supernet phase
# --------------------------------------------------------------------------------------
def load_supernets(args: argparse.Namespace, space: SearchSpace) -> tuple[list[Any], dict[str, Any]]:
    """The ``--supernet`` files, loaded and checked before any stand-alone training, and the
    summary fields they give."""
    from bnas.search.supernet_run import load_supernet

    supernets = [load_supernet(path, space, device=args.device) for path in args.supernet]
    metas = [dict(getattr(net, "meta", {}) or {}) for net in supernets]
    for path, meta in zip(args.supernet, metas, strict=True):
        if meta.get("seed") is not None and meta["seed"] != args.seed:
            # Another seed held out other validation images, which that supernet trained on.
            raise RankingError(
                f"--supernet {path}: trained with seed {meta['seed']} (asked: --seed {args.seed}); "
                f"score with a supernet of seed {args.seed}, or pass --seed {meta['seed']}"
            )
    info = dict(
        supernet=args.supernet[0] if len(args.supernet) == 1 else list(args.supernet),
        supernet_epochs=_one_or_all([m.get("epochs") for m in metas]),
        distill=_one_or_all([m.get("distill") for m in metas]),
        widths=_one_or_all([m.get("widths") for m in metas]),
        kernels=_one_or_all([m.get("kernels") for m in metas]),
        paths=_one_or_all([m.get("paths") for m in metas]),
        sampling=_one_or_all([m.get("sampling") for m in metas]),
        supernet_seed=_one_or_all([m.get("seed") for m in metas]),
        supernet_train_cpu_s=0.0,
    )
    return supernets, info


def supernet_phase(
    archs: list[dict[str, Any]],
    space: SearchSpace,
    args: argparse.Namespace,
    data: DataSplits,
    loaded: tuple[list[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score every arch with the ``loaded`` supernets (or train one), returning the phase's
    summary fields."""
    from bnas.search.supernet import calibration_batches, path_angle, score
    from bnas.search.supernet_run import initial_of

    info: dict[str, Any] = {}
    cpu0 = time.process_time()
    if loaded is not None:
        supernets, loaded_info = loaded
        info.update(loaded_info)
    else:
        from bnas.search.supernet_run import train_supernet

        out = Path(args.supernet_out) if args.supernet_out else _default_supernet_out(space, args)
        resume = (out / "supernet.pt").is_file()
        log.info(
            "training a supernet: %d epochs%s -> %s%s",
            args.supernet_epochs,
            " with in-place distillation" if args.distill else "",
            out,
            " (resuming)" if resume else "",
        )
        supernets = [
            train_supernet(
                space,
                out=out,
                epochs=args.supernet_epochs,
                resume=resume,
                distill=args.distill,
                widths=args.widths,
                kernels=args.kernels,
                paths=args.paths,
                sampling=args.sampling,
                device=args.device,
                seed=args.seed,
                data=data,
            )
        ]
        info.update(
            supernet=str(out / "supernet.pt"),
            supernet_epochs=args.supernet_epochs,
            distill=args.distill,
            widths=args.widths,
            kernels=args.kernels,
            paths=args.paths,
            sampling=args.sampling,
            supernet_seed=args.seed,
            supernet_train_cpu_s=round(time.process_time() - cpu0, 2),
            supernet_resumed=resume,
        )
    cpu1 = time.process_time()
    calibration = calibration_batches(data, args.calibration_batches, 64, args.seed, supernets[0].device)
    for k, supernet in enumerate(supernets):
        # Trained here or loaded, a supernet's meta says the seed, widths and kernels it started from.
        initial = initial_of(supernet)
        for i, arch in enumerate(archs):
            arch.setdefault("supernet_angles", []).append(path_angle(supernet, initial, arch["genotype"]))
            acc, loss = score(
                supernet,
                arch["genotype"],
                data,
                calibration=calibration,
                with_loss=True,
                seed=args.seed,
                finetune_steps=args.finetune_steps,
                probe_samples=args.probe_samples,
            )
            arch.setdefault("supernet_accs", []).append(float(acc))
            arch.setdefault("supernet_losses", []).append(float(loss))
            log.info(
                "supernet %d/%d scored %d/%d: %s supernet %.4f stand-alone %.4f",
                k + 1,
                len(supernets),
                i + 1,
                len(archs),
                arch["hash"],
                acc,
                arch["standalone_acc"],
            )
    for arch in archs:
        arch["supernet_acc"] = sum(arch["supernet_accs"]) / len(supernets)
        arch["supernet_loss"] = sum(arch["supernet_losses"]) / len(supernets)
        arch["supernet_angle"] = sum(arch["supernet_angles"]) / len(supernets)
        arch["score_by_acc"], arch["score_by_loss"] = arch["supernet_acc"], -arch["supernet_loss"]
        arch["score_by_angle"] = arch["supernet_angle"]
    if len(supernets) > 1:
        # An ensemble of supernets: each ranks the archs, and an arch's score is its mean rank
        # (Borda count), so a supernet whose accuracies spread wider does not outweigh the rest.
        acc_ranks = [mean_ranks([a["supernet_accs"][k] for a in archs]) for k in range(len(supernets))]
        loss_ranks = [mean_ranks([-a["supernet_losses"][k] for a in archs]) for k in range(len(supernets))]
        angle_ranks = [mean_ranks([a["supernet_angles"][k] for a in archs]) for k in range(len(supernets))]
        for i, arch in enumerate(archs):
            arch["score_by_acc"] = sum(r[i] for r in acc_ranks) / len(supernets)
            arch["score_by_loss"] = sum(r[i] for r in loss_ranks) / len(supernets)
            arch["score_by_angle"] = sum(r[i] for r in angle_ranks) / len(supernets)
        info["per_supernet_kendall_tau"] = [
            rank_correlations([a["standalone_acc"] for a in archs], [a["supernet_accs"][k] for a in archs])[
                "kendall_tau"
            ]
            for k in range(len(supernets))
        ]
    info["scoring_cpu_s"] = round(time.process_time() - cpu1, 2)
    return info


# --------------------------------------------------------------------------------------
# A training-free baseline: what a supernet's ranking should beat at no training cost
# --------------------------------------------------------------------------------------
TRAINING_FREE_IMAGES = 128
TRAINING_FREE_INITS = 3


def sign_codes(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each image's binary code: 1 where a binarizing layer's quantizer gave +1, over every
    such layer of ``network`` in order (rows: images; float 0/1)."""
    from bnas.binarize.layers import binary_layers

    codes: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        codes.append((output > 0).flatten(1).float())

    hooks = [
        layer.input_quantizer.register_forward_hook(keep) for layer in binary_layers(network) if layer.binarizes_input
    ]
    try:
        with torch.no_grad():
            network(images)
    finally:
        for hook in hooks:
            hook.remove()
    if not codes:
        raise RankingError("--training-free: the network has no layer binarizing its input, so no sign codes to score")
    return torch.cat(codes, dim=1)


def sign_code_logdet(codes: torch.Tensor) -> float:
    """log det of the images' code-agreement kernel: K[i, j] is the fraction of positions where
    codes i and j agree (1 on the diagonal). Higher when the network's signs tell the images
    apart (Mellor et al.'s NASWOT score on a binary network's own codes; the 1e-6 ridge keeps
    images with identical codes finite)."""
    c = codes.double()
    agree = (c @ c.T + (1 - c) @ (1 - c).T) / c.shape[1]
    ridge = 1e-6 * torch.eye(len(agree), dtype=agree.dtype)
    return float(torch.linalg.slogdet(agree + ridge).logabsdet)


def training_free_score(genotype: Any, images: torch.Tensor, seed: int, inits: int = TRAINING_FREE_INITS) -> float:
    """The mean ``sign_code_logdet`` of ``genotype`` built with ``inits`` seeded random
    initialisations (seeds ``seed``, ``seed + 1``, ...), in training mode (BatchNorm normalises
    with the batch's statistics, as in a network's first step)."""
    from bnas.builder import build

    scores = []
    for init in range(inits):
        torch.manual_seed(seed + init)
        network = build(genotype).to(images.device).train()
        scores.append(sign_code_logdet(sign_codes(network, images)))
    return sum(scores) / len(scores)


def training_free_phase(archs: list[dict[str, Any]], data: DataSplits, seed: int, device: str) -> float:
    """Set ``arch["training_free"]`` for every arch, all on the same seeded training images;
    returns the CPU seconds taken."""
    from bnas.search.supernet import calibration_batches

    cpu0 = time.process_time()
    (images,) = calibration_batches(data, 1, TRAINING_FREE_IMAGES, seed, device)
    for arch in archs:
        arch["training_free"] = training_free_score(arch["genotype"], images, seed)
    return round(time.process_time() - cpu0, 2)


# --------------------------------------------------------------------------------------
# A short-training baseline: a few steps of each architecture's own training from scratch
# --------------------------------------------------------------------------------------
SHORT_TRAINING_INITS = 2


def short_trained(genotype: Any, data: DataSplits, recipe: Any, steps: int, seed: int, device: str = "cpu") -> Any:
    """``genotype`` built with torch seeded ``seed`` and trained ``steps`` steps from scratch on
    the first training batches shuffled with ``seed`` (the recipe's optimiser and batch size at
    its initial learning rate, latent weights clipped: ``finetune_inherited`` applied to a fresh
    network)."""
    from bnas.builder import build
    from bnas.search.supernet import finetune_inherited

    torch.manual_seed(seed)
    network = build(genotype).to(device).train()
    return finetune_inherited(network, data, recipe, steps, seed)


def short_training_score(
    genotype: Any,
    data: DataSplits,
    recipe: Any,
    steps: int,
    seed: int,
    device: str = "cpu",
    inits: int = SHORT_TRAINING_INITS,
) -> float:
    """The mean validation accuracy of ``short_trained`` networks seeded ``seed``, ``seed + 1``,
    ... (``inits`` of them), each scored in eval mode with the BatchNorm statistics it ran up."""
    from bnas.train.loop import evaluate_accuracy

    accuracies = []
    for init in range(inits):
        network = short_trained(genotype, data, recipe, steps, seed + init, device).eval()
        accuracies.append(evaluate_accuracy(network, data.loader("val", 512, device=device), device)[0])
    return sum(accuracies) / len(accuracies)


def short_training_phase(
    archs: list[dict[str, Any]], space: SearchSpace, data: DataSplits, steps: int, seed: int, device: str
) -> float:
    """Set ``arch["short_training"]`` for every arch; returns the CPU seconds taken."""
    from bnas.search.supernet import supernet_recipe

    recipe = supernet_recipe(space)
    cpu0 = time.process_time()
    for arch in archs:
        arch["short_training"] = short_training_score(arch["genotype"], data, recipe, steps, seed, device)
    return round(time.process_time() - cpu0, 2)


def _one_or_all(values: list[Any]) -> Any:
    """One value when every supernet shares it, else the list (one per supernet)."""
    return values[0] if all(v == values[0] for v in values) else values


def combined_scores(scores: dict[str, list[float]]) -> dict[str, list[float]]:
    """Every combination of two or more of ``scores`` (name -> one score per architecture):
    ``"a_and_b"`` -> each architecture's mean rank under ``a`` and ``b``."""
    ranks = {name: mean_ranks(values) for name, values in scores.items()}
    combined: dict[str, list[float]] = {}
    for size in range(2, len(ranks) + 1):
        for names in itertools.combinations(ranks, size):
            combined["_and_".join(names)] = [
                sum(ranks[name][i] for name in names) / size for i in range(len(ranks[names[0]]))
            ]
    return combined


def mean_ranks(values: list[float]) -> list[float]:
    """Ranks 1..n of ``values`` (the highest ranks n), tied values sharing their mean rank."""
    from scipy.stats import rankdata

    return [float(r) for r in rankdata(values, method="average")]


def _default_supernet_out(space: SearchSpace, args: argparse.Namespace) -> Path:
    tag = f"supernet-{space.name}-e{args.supernet_epochs}{'-distill' if args.distill else ''}-{args.widths}{'-entangled' if args.kernels == 'entangled' else ''}-{args.paths}{'-fair' if args.sampling == 'fair' else ''}-seed{args.seed}"
    return REPO / "runs" / BENCHMARK / tag


def rank_correlations(xs: list[float], ys: list[float]) -> dict[str, float | None]:
    """Kendall tau (tau-b) and Spearman rho with their p-values; None where undefined (a constant side)."""
    from scipy.stats import kendalltau, spearmanr

    tau = kendalltau(xs, ys)
    rho = spearmanr(xs, ys)

    def clean(v: Any) -> float | None:
        v = float(v)
        return None if math.isnan(v) else round(v, 4)

    return {
        "kendall_tau": clean(tau.statistic),
        "kendall_p": clean(tau.pvalue),
        "spearman_rho": clean(rho.statistic),
        "spearman_p": clean(rho.pvalue),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "fashion_mnist_cells.yaml"))
    parser.add_argument("--archs", type=int, default=20, help="architectures to sample (distinct, within constraints)")
    parser.add_argument("--seed", type=int, default=0, help="sampling, data split, training and calibration seed")
    parser.add_argument(
        "--standalone-cache",
        default=None,
        help="JSON cache of stand-alone results (default runs/oneshot_ranking/standalone-SPACE-seedS.json)",
    )
    phase = parser.add_mutually_exclusive_group()
    phase.add_argument(
        "--supernet",
        nargs="+",
        default=None,
        help="a trained supernet (RUN/supernet.pt) to score with; several: rank by each arch's mean rank over them",
    )
    phase.add_argument("--supernet-epochs", type=int, default=None, help="train a supernet for E epochs here")
    phase.add_argument("--standalone-only", action="store_true", help="train and report the stand-alone phase only")
    parser.add_argument("--distill", action="store_true", help="with --supernet-epochs: in-place distillation")
    parser.add_argument("--widths", choices=WIDTHS, default="separate", help="with --supernet-epochs: its widths")
    parser.add_argument(
        "--kernels",
        choices=KERNELS,
        default="separate",
        help="with --supernet-epochs: its kernels (bnas supernet --kernels)",
    )
    parser.add_argument("--paths", choices=PATHS, default="all", help="with --supernet-epochs: the paths it trains")
    parser.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="uniform",
        help="with --supernet-epochs: one path or a fair group per step",
    )
    parser.add_argument(
        "--supernet-out",
        default=None,
        help="with --supernet-epochs: its run folder (default runs/oneshot_ranking/supernet-...)",
    )
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="train each architecture once per seed and rank by the mean (default: --seed only); "
        "the summary's standalone_seed_tau compares the seeds",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="train a copy of each arch's inherited weights this many steps before scoring (bnas search --finetune-steps)",
    )
    parser.add_argument(
        "--probe-samples",
        type=int,
        default=0,
        help="score each arch by a linear probe refitted on its features for this many training images "
        "(bnas.search.linear_probe) instead of by the supernet's shared classifier",
    )
    parser.add_argument(
        "--part",
        type=parse_part,
        default=None,
        metavar="K/N",
        help="with --standalone-only: train and report only every N-th architecture from the K-th, "
        "so N processes can share the stand-alone phase (and its cache file)",
    )
    parser.add_argument(
        "--training-free",
        action="store_true",
        help=f"also rank by a training-free score: the log-determinant of the sign-code agreement of "
        f"{TRAINING_FREE_IMAGES} training images at initialisation (mean of {TRAINING_FREE_INITS} initialisations)",
    )
    parser.add_argument(
        "--short-training",
        type=int,
        default=None,
        metavar="STEPS",
        help=f"also rank by a short training: each arch's validation accuracy after STEPS steps from scratch "
        f"(the space's budget optimiser and batch size; mean of {SHORT_TRAINING_INITS} seeded runs)",
    )
    parser.add_argument("--calibration-batches", type=int, default=8, help="BN recalibration batches (of 64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.train_seeds is not None and len(set(args.train_seeds)) != len(args.train_seeds):
        parser.error("--train-seeds: give each seed once")
    if args.archs < 2:
        parser.error("--archs must be at least 2 (a rank correlation needs pairs)")
    if args.finetune_steps < 0:
        parser.error("--finetune-steps must be 0 or more")
    if args.probe_samples < 0:
        parser.error("--probe-samples must be 0 or more")
    if args.short_training is not None and args.short_training < 1:
        parser.error("--short-training must be at least 1 step")
    if args.calibration_batches < 1:
        parser.error("--calibration-batches must be at least 1")
    if args.supernet_epochs is not None and args.supernet_epochs < 1:
        parser.error("--supernet-epochs must be at least 1")
    if args.distill and args.supernet_epochs is None:
        parser.error("--distill applies to --supernet-epochs (a loaded supernet was trained as it was)")
    if args.part is not None and not args.standalone_only:
        parser.error("--part applies to --standalone-only (scoring needs every architecture's result)")
    if args.part is not None and args.part[1] > args.archs:
        parser.error(f"--part {args.part[0]}/{args.part[1]}: at most --archs ({args.archs}) parts")
    if not (args.standalone_only or args.supernet or args.supernet_epochs):
        parser.error("give --supernet RUN/supernet.pt, --supernet-epochs E or --standalone-only")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    space = load_space(args.space)
    cache_path = Path(
        args.standalone_cache or REPO / "runs" / BENCHMARK / f"standalone-{space.name}-seed{args.seed}.json"
    )

    loaded: list[DataSplits] = []

    def get_data() -> DataSplits:
        if not loaded:
            loaded.append(search_data(space, args.seed, args.data_root))
        return loaded[0]

    archs = sample_archs(space, args.archs, args.seed)
    # --part: this process's share of the sample; each keeps its index in the whole sample.
    indices = [i for i in range(len(archs)) if in_part(i, args.part)]
    archs = [archs[i] for i in indices]
    loaded_supernets = load_supernets(args, space) if args.supernet is not None else None
    ensemble = args.supernet is not None and len(args.supernet) > 1
    train_seeds = args.train_seeds if args.train_seeds else [args.seed]
    paths = cache_paths(cache_path, args.seed, train_seeds)
    cpu0 = time.process_time()
    runs: list[list[dict[str, Any]]] = [[] for _ in archs]
    cached = [True] * len(archs)
    for train_seed, path in zip(train_seeds, paths, strict=True):
        standalone_phase(archs, space, args.seed, path, get_data, args.device, train_seed)
        for i, arch in enumerate(archs):
            runs[i].append(arch["standalone"])
            cached[i] = cached[i] and arch["cached"]
    for i, arch in enumerate(archs):
        # The ground truth: the mean over the training seeds (a single seed's when one).
        arch["standalone_acc"] = sum(r["val_acc"] for r in runs[i]) / len(runs[i])
    standalone_cpu = round(time.process_time() - cpu0, 2)
    info: dict[str, Any] = {}
    if not args.standalone_only:
        info = supernet_phase(archs, space, args, get_data(), loaded_supernets)
    training_free_cpu_s = training_free_phase(archs, get_data(), args.seed, args.device) if args.training_free else None
    short_training_cpu_s = (
        short_training_phase(archs, space, get_data(), args.short_training, args.seed, args.device)
        if args.short_training is not None
        else None
    )
    for i, arch in enumerate(archs):
        emit(
            {
                "benchmark": BENCHMARK,
                "space": space.name,
                "arch": indices[i],
                "hash": arch["hash"],
                "ops": arch["metrics"]["ops"],
                "choices": arch["choices"],
                "standalone_val_acc": arch["standalone_acc"],
                "standalone_val_accs": [r["val_acc"] for r in runs[i]],
                "standalone_cpu_s": round(sum(r["cpu_s"] for r in runs[i]), 2),
                "cached": cached[i],
                "supernet_val_acc": arch.get("supernet_acc"),
                "supernet_val_loss": arch.get("supernet_loss"),
                "supernet_angle": arch.get("supernet_angle"),
                **({"training_free_score": arch["training_free"]} if args.training_free else {}),
                **({"short_training_val_acc": arch["short_training"]} if args.short_training is not None else {}),
                **(
                    {
                        "supernet_val_accs": arch["supernet_accs"],
                        "supernet_mean_rank": arch["score_by_acc"],
                        "supernet_mean_rank_by_loss": arch["score_by_loss"],
                        "supernet_angles": arch["supernet_angles"],
                        "supernet_mean_rank_by_angle": arch["score_by_angle"],
                    }
                    if ensemble
                    else {}
                ),
            }
        )
    standalone = [a["standalone_acc"] for a in archs]
    summary: dict[str, Any] = {
        "benchmark": BENCHMARK,
        "summary": True,
        "space": space.name,
        "archs": len(archs),
        "part": None if args.part is None else f"{args.part[0]}/{args.part[1]}",
        "seed": args.seed,
        "train_seeds": train_seeds,
        "standalone_cache": str(cache_path),
        "standalone_caches": [str(p) for p in paths],
        "standalone_trained": sum(not c for c in cached),
        "standalone_cpu_s": standalone_cpu,
        "standalone_cpu_s_all": round(sum(r["cpu_s"] for run in runs for r in run), 2),
        "standalone_val_acc_range": [min(standalone), max(standalone)],
    }
    # The baselines a supernet's ranking is judged beside: the architecture's size alone, and
    # (--training-free) a score taken at initialisation.
    by_ops = rank_correlations(standalone, [a["metrics"]["ops"] for a in archs])
    summary.update({f"{k}_by_ops": v for k, v in by_ops.items()})
    if args.training_free:
        free = rank_correlations(standalone, [a["training_free"] for a in archs])
        summary.update({f"{k}_training_free": v for k, v in free.items()})
        summary["training_free_cpu_s"] = training_free_cpu_s
    if args.short_training is not None:
        short = rank_correlations(standalone, [a["short_training"] for a in archs])
        summary.update({f"{k}_short_training": v for k, v in short.items()})
        summary.update(short_training_steps=args.short_training, short_training_cpu_s=short_training_cpu_s)
    # Scores whose errors differ may rank better together than alone: each combination of the
    # scores taken here, by mean rank.
    scores = {
        **({"supernet": [a["score_by_acc"] for a in archs]} if not args.standalone_only else {}),
        **({"training_free": [a["training_free"] for a in archs]} if args.training_free else {}),
        **({"short_training": [a["short_training"] for a in archs]} if args.short_training is not None else {}),
    }
    for name, combined in combined_scores(scores).items():
        summary.update({f"{k}_{name}": v for k, v in rank_correlations(standalone, combined).items()})
    if len(train_seeds) > 1:
        # How well one stand-alone training ranks like another: the ceiling a supernet's tau
        # can be judged against (the mean over pairs of seeds).
        pairs = [(a, b) for a in range(len(train_seeds)) for b in range(a + 1, len(train_seeds))]
        taus = [
            rank_correlations([r[a]["val_acc"] for r in runs], [r[b]["val_acc"] for r in runs])["kendall_tau"]
            for a, b in pairs
        ]
        defined = [t for t in taus if t is not None]
        summary["standalone_seed_tau"] = round(sum(defined) / len(defined), 4) if defined else None
    if not args.standalone_only:
        summary.update(
            info,
            calibration_batches=args.calibration_batches,
            finetune_steps=args.finetune_steps,
            probe_samples=args.probe_samples,
        )
        summary.update(rank_correlations(standalone, [a["score_by_acc"] for a in archs]))
        # Ranking by the inherited weights' validation loss (lower is better) instead of accuracy.
        by_loss = rank_correlations(standalone, [a["score_by_loss"] for a in archs])
        summary.update({f"{k}_by_loss": v for k, v in by_loss.items()})
        # ABS's angle: how far each path's weights turned from their initialisation.
        by_angle = rank_correlations(standalone, [a["score_by_angle"] for a in archs])
        summary.update({f"{k}_by_angle": v for k, v in by_angle.items()})
        if ensemble:
            # The ensemble by its mean accuracy instead of its mean rank: the score a search can
            # give one trial at a time.
            by_mean_acc = rank_correlations(standalone, [a["supernet_acc"] for a in archs])
            summary.update({f"{k}_by_mean_acc": v for k, v in by_mean_acc.items()})
    summary.update(load_average=[round(v, 2) for v in os.getloadavg()], **machine())
    emit(summary)


if __name__ == "__main__":
    try:
        main()
    except BnasError as exc:
        sys.exit(f"error: {exc}")
