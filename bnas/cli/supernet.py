"""``bnas supernet SPACE.yaml --out RUN``: train the weight-sharing supernet of a search space
(one-shot search; ``bnas.search.supernet_run`` does the work)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..errors import BnasError
from ..search.path_sampling import PATHS, SAMPLINGS
from ..search.space import load_space
from ..search.supernet import KERNELS, WIDTHS
from ..search.supernet_run import SUPERNET_FILE, train_supernet
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "supernet",
        help="train a one-shot supernet of a search space (then: bnas search SPACE --supernet RUN/supernet.pt)",
    )
    p.add_argument("space", help="search-space YAML (see search_spaces/)")
    p.add_argument("--out", help="run folder (default runs/supernet-<space>-<time>)")
    p.add_argument(
        "--epochs",
        type=int,
        help="training epochs (default: the space's budget epochs; a supernet trains one path per batch, "
        "so it usually needs several times more)",
    )
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {SUPERNET_FILE}")
    p.add_argument(
        "--distill",
        action="store_true",
        help="in-place distillation: the largest path (widest, deepest) trains on the labels in every step "
        "and teaches the sampled path",
    )
    p.add_argument(
        "--widths",
        choices=WIDTHS,
        default="separate",
        help="separate (default): each width choice has its own weights; sliced: narrower widths are the "
        "leading channels of the widest's weights",
    )
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default="separate",
        help="separate (default): each op of an edge has its own weights; entangled: the conv ops of one edge "
        "share one kernel, a smaller kernel being the centre of the largest (AutoFormer's weight "
        "entanglement), so every sampled conv op trains it",
    )
    p.add_argument(
        "--paths",
        choices=PATHS,
        default="all",
        help="all (default): every batch trains a uniformly drawn path; feasible: only paths meeting the "
        "space's max_ops / min_ops / max_size_bytes / max_params constraints (redrawn until one does), the paths a "
        "search can pick",
    )
    p.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default="uniform",
        help="uniform (default): one path per batch and step; fair: FairNAS's strict fairness, a group of paths "
        "per batch in which every choice takes each option equally often (every op of every edge once with "
        "8 ops), one step for the group, each step costing the group's size in paths; needs --paths all",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: the space's budget optimizer.lr)")
    p.add_argument("--seed", type=int, default=0, help="data split, initialisation and path sampling (default 0)")
    p.add_argument(
        "--monitor-paths",
        type=int,
        default=3,
        help="paths validated after every epoch for the curves: the largest, then seeded samples (default 3)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--data-root", help="data folder (default $BNAS_DATA, else ~/.cache/bnas/data)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_catalog_argument(p)
    p.set_defaults(handler=run_supernet)


def run_supernet(args: argparse.Namespace) -> int:
    load_catalogs(args)
    for flag in ("epochs", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise BnasError(f"--{flag} must be positive, got {value}")
    if args.monitor_paths < 0:
        raise BnasError(f"--monitor-paths must be 0 or more, got {args.monitor_paths}")
    if args.threads:
        torch.set_num_threads(args.threads)
    space = load_space(args.space)
    out = Path(args.out or f"runs/supernet-{space.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    supernet = train_supernet(
        space,
        out,
        epochs=args.epochs,
        resume=args.resume,
        distill=args.distill,
        widths=args.widths,
        kernels=args.kernels,
        paths=args.paths,
        sampling=args.sampling,
        device=args.device,
        seed=args.seed,
        data_root=args.data_root,
        progress=not args.quiet,
        overrides={"optimizer.lr": args.lr} if args.lr is not None else None,
        monitor=args.monitor_paths,
    )
    print(
        f"supernet of {space.name}: {supernet.num_params():,} shared parameters, {supernet.meta['epochs']} epochs, "
        f"in {time.perf_counter() - start:.1f} s; {out / SUPERNET_FILE}\n"
        f"search it: bnas search {args.space} --supernet {out / SUPERNET_FILE} --seed {args.seed}"
    )
    return 0
