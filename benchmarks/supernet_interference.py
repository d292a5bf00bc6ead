"""Why a one-shot supernet's paths learn slowly (issue 14): one path of a space, trained
stand-alone, against the same path inside a supernet whose training samples more and more of
the space.

One feasible path (the *base* path, drawn with ``--seed``) is trained stand-alone for
``--steps`` batches. For each ``--modes`` entry a fresh supernet is trained on the same
batches, one sampled path per step (``bnas.search.supernet_step``, as ``bnas supernet``
trains), where the sampled path keeps the base path's choices except those the mode draws:

- ``fixed``: none (every step trains the base path);
- ``macro``: the widths and depths (``*.channels``, ``*.cells``);
- ``ops``: the cell edges' ops;
- ``cells``: the cell edges' ops and inputs;
- ``all``: every choice (uniform single-path sampling).

Each mode's line gives the base path's validation accuracy with its own weights trained
stand-alone (``baseline_val_acc``) and with the weights it inherits from the supernet
(``ours_val_acc``; both with BatchNorm recalibrated on the same batches), their ratio, and the
training accuracy of the sampled paths and of the stand-alone path over the last quarter of
the steps. ``--real`` switches binarization off in both (float weights and activations), to
tell binary-specific effects from weight sharing itself. ``--head-scales N`` adds a line with
the mean absolute value of the classifier's input (after the last cell and the head's pooling)
over N paths sampled as ``ops`` samples them, at initialisation: how far the input the shared
classifier sees moves from path to path.

    python benchmarks/supernet_interference.py [--space SPACE.yaml] [--steps 200]
        [--modes fixed macro ops cells all] [--real] [--head-scales 12] [--seed 0] [--threads 1]

JSON lines on stdout, one per mode, then a summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from bnas.binarize import clip_latent_weights, set_binarization  # noqa: E402
from bnas.builder import build  # noqa: E402
from bnas.data import DataSplits  # noqa: E402
from bnas.errors import BnasError  # noqa: E402
from bnas.search.linear_probe import classifier_inputs  # noqa: E402
from bnas.search.objective import search_data  # noqa: E402
from bnas.search.path_sampling import PathSampler  # noqa: E402
from bnas.search.space import load_space  # noqa: E402
from bnas.search.supernet import (  # noqa: E402  (its private choice-name rules too)
    Choices,
    Supernet,
    _is_cell_choice,
    _is_depth,
    _is_width,
    calibration_batches,
    make_supernet_optimizer,
    recalibrate_bn,
    score,
    supernet_recipe,
    supernet_step,
)
from bnas.train.loop import evaluate_accuracy  # noqa: E402
from bnas.train.losses import task_loss  # noqa: E402
from bnas.train.optimiser import make_optimizer, set_lr  # noqa: E402
from bnas.train.recipe import Recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = "supernet_interference"
log = logging.getLogger(BENCHMARK)


def _is_macro(name: str) -> bool:
    return _is_width(name) or _is_depth(name)


def _is_cell_op(name: str) -> bool:
    return _is_cell_choice(name) and name.endswith(".op")


# What each mode draws anew at every step; the other choices stay the base path's.
MODES: dict[str, Callable[[str], bool]] = {
    "fixed": lambda name: False,
    "macro": _is_macro,
    "ops": _is_cell_op,
    "cells": _is_cell_choice,
    "all": lambda name: True,
}


def mixed_path(supernet: Supernet, base: Choices, drawn: Callable[[str], bool], rng: random.Random) -> Choices:
    """A uniform draw from ``rng`` that keeps ``base``'s value of every choice ``drawn`` rejects."""
    sample = supernet.sample_choices(rng)
    return {name: (sample[name] if drawn(name) else value) for name, value in base.items()}


def last_quarter(steps: int) -> int:
    """The first step counted in the 'last quarter' training accuracies."""
    return steps - max(1, steps // 4)


def train_standalone(model: nn.Module, batches: list[tuple[Tensor, Tensor]], recipe: Recipe) -> float:
    """Train ``model`` on ``batches`` (the recipe's optimiser at its first epoch's learning
    rate, latent weights clipped after each step); its training accuracy over the last quarter."""
    optimizer = make_optimizer(model, recipe)
    set_lr(optimizer, recipe, 0)
    model.train()
    hits = seen = 0
    start = last_quarter(len(batches))
    for step, (x, y) in enumerate(batches):
        logits = model(x).float()
        loss = task_loss(logits, y, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        if step >= start:
            hits += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return hits / seen


def train_supernet_mode(
    supernet: Supernet,
    base: Choices,
    mode: str,
    batches: list[tuple[Tensor, Tensor]],
    recipe: Recipe,
    seed: int,
) -> tuple[float, int]:
    """Train ``supernet`` on ``batches``, one path per step drawn by ``mode``; the sampled
    paths' training accuracy over the last quarter, and how many distinct paths were trained."""
    optimizer = make_supernet_optimizer(supernet, recipe)
    set_lr(optimizer, recipe, 0)
    rng = random.Random(f"bnas-interference:{seed}:{mode}")
    hits = seen = 0
    start = last_quarter(len(batches))
    distinct: set[str] = set()
    for step, (x, y) in enumerate(batches):
        path = mixed_path(supernet, base, MODES[mode], rng)
        distinct.add(supernet.genotype(path).canonical_hash())
        _, correct = supernet_step(supernet, path, x, y, optimizer, recipe)
        if step >= start:
            hits += correct
            seen += len(y)
    return hits / seen, len(distinct)


def classifier_input_scales(
    supernet: Supernet, base: Choices, batch: tuple[Tensor, Tensor], count: int, seed: int
) -> list[float]:
    """Mean |input| of the classifier of ``count`` paths drawn as ``ops`` draws them, at the
    supernet's weights, with BatchNorm on the batch's statistics (as in training)."""
    rng = random.Random(f"bnas-interference-scales:{seed}")
    scales: list[float] = []
    for _ in range(count):
        net = supernet.network(supernet.genotype(mixed_path(supernet, base, MODES["ops"], rng)))
        features, _ = classifier_inputs(net, [batch], batch_statistics=True)
        scales.append(round(float(features.abs().mean()), 4))
    return scales


def val_acc(model: nn.Module, data: DataSplits, calibration: list[Tensor]) -> float:
    recalibrate_bn(model, calibration)
    acc, _ = evaluate_accuracy(model, data.loader("val", 512), torch.device("cpu"))
    return float(acc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "fashion_mnist_cells.yaml"))
    parser.add_argument("--steps", type=int, default=200, help="training batches per network")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--real", action="store_true", help="binarization off in every network")
    parser.add_argument("--head-scales", type=int, default=0, help="paths whose classifier input to measure")
    parser.add_argument("--seed", type=int, default=0, help="base path, data split, batches and initialisation")
    parser.add_argument("--calibration-batches", type=int, default=8, help="BN recalibration batches (of 64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    space = load_space(args.space)
    data = search_data(space, args.seed, args.data_root)
    recipe = supernet_recipe(space)
    loader = data.loader("train", recipe.batch_size, shuffle=True, seed=args.seed)
    loader.set_epoch(0)
    batches = [batch for _, batch in zip(range(args.steps), loader, strict=False)]
    if len(batches) < args.steps:
        raise BnasError(f"{space.name}: the training split has only {len(batches)} batches, fewer than --steps")
    calibration = calibration_batches(data, args.calibration_batches, 64, args.seed)

    def fresh_supernet() -> Supernet:
        torch.manual_seed(args.seed)
        supernet = Supernet(space)
        if args.real:
            set_binarization(supernet, activations=False, weights=False)
        return supernet

    # The base path is drawn within the space's constraints as built (binary): with --real the
    # float convs would count as float OPs and no path would fit.
    torch.manual_seed(args.seed)
    probe = Supernet(space)
    base = PathSampler(probe, "feasible").draw(random.Random(args.seed))
    genotype = probe.genotype(base, name=f"{space.name}-base-path")
    log.info("base path %s; %d steps", genotype.canonical_hash(), args.steps)
    common: dict[str, Any] = {
        "benchmark": BENCHMARK,
        "space": space.name,
        "steps": args.steps,
        "seed": args.seed,
        "real": args.real,
        "base_path": genotype.canonical_hash(),
    }
    if args.head_scales:
        scales = classifier_input_scales(fresh_supernet(), base, batches[0], args.head_scales, args.seed)
        emit(
            {
                **common,
                "measure": "classifier_input_abs_mean",
                "paths": len(scales),
                "values": scales,
                "min": min(scales),
                "max": max(scales),
                "max_over_min": round(max(scales) / min(scales), 2),
            }
        )

    cpu0 = time.process_time()
    torch.manual_seed(args.seed)
    alone = build(genotype)
    if args.real:
        set_binarization(alone, activations=False, weights=False)
    alone_train_acc = train_standalone(alone, batches, recipe)
    alone_val = val_acc(alone, data, calibration)
    log.info("stand-alone: train %.4f, val %.4f", alone_train_acc, alone_val)
    ratios: dict[str, float] = {}
    for mode in args.modes:
        supernet = fresh_supernet()
        sampled_acc, distinct = train_supernet_mode(supernet, base, mode, batches, recipe, args.seed)
        inherited = float(score(supernet, genotype, data, calibration=calibration))
        ratios[mode] = round(inherited / alone_val, 4) if alone_val else float("nan")
        log.info("%s: sampled paths train %.4f, base path inherited val %.4f", mode, sampled_acc, inherited)
        emit(
            {
                **common,
                "mode": mode,
                "distinct_paths": distinct,
                "baseline": "the base path trained alone",
                "ours": "the base path with weights inherited from the supernet",
                "baseline_val_acc": round(alone_val, 4),
                "ours_val_acc": round(inherited, 4),
                "ratio": ratios[mode],
                "standalone_train_acc_last_quarter": round(alone_train_acc, 4),
                "sampled_paths_train_acc_last_quarter": round(sampled_acc, 4),
            }
        )
    emit(
        {
            **common,
            "summary": True,
            "ratios": ratios,
            "cpu_s": round(time.process_time() - cpu0, 1),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            **machine(),
        }
    )


if __name__ == "__main__":
    try:
        main()
    except BnasError as exc:
        sys.exit(f"error: {exc}")
