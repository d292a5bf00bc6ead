"""``bnas search SPACE.yaml``: the command line of the architecture search (one process,
``--workers`` local processes, or a worker joining a shared study)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

from ..atomic import check_writable_dir
from ..errors import BnasError
from ..evaluate import resolve_device
from ..search.config import SUPERNET_SCORES
from ..search.outputs import saved_line, summary_text, write_outputs
from ..search.retrain import load_retrain_recipe, retrain_top
from ..search.runner import SearchConfig, open_study, run_search_study
from ..search.space import PRUNERS, SAMPLERS, load_space
from ..search.storage import SearchError, is_disk_full, open_storage, retry_db
from ..search.workers import RunLock
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="architecture search with Optuna: sample, train briefly, prune, write genotypes")
    p.add_argument("space", nargs="?", help="search-space YAML (see search_spaces/)")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold in total (default 20)")
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument("--out", help="run folder (default runs/<space>-<time>); rerunning with the same --out resumes")
    p.add_argument(
        "--storage",
        help="Optuna storage URL: sqlite:///PATH, postgresql://USER@HOST/DB, journal:PATH "
        "(default sqlite:///RUN/study.db)",
    )
    p.add_argument("--study", help="study name (default: the space's name)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the space's, else tpe")
    p.add_argument("--pruner", choices=PRUNERS, help="default: the space's, else median (single-objective only)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed, data split and training seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads per worker for training (default 1: trials are small; use --workers to use more cores)",
    )
    p.add_argument("--data-root", help="data folder (default $BNAS_DATA, else ~/.cache/bnas/data)")
    p.add_argument(
        "--workers", type=int, default=1, help="start K local worker processes on one shared study (default 1)"
    )
    p.add_argument("--devices", help="comma-separated GPU ids; worker i gets CUDA_VISIBLE_DEVICES=devices[i %% len]")
    p.add_argument(
        "--heartbeat",
        type=int,
        help="seconds between trial heartbeats on a database storage (default 10 with --storage)",
    )
    p.add_argument("--artifacts", help="artifact store folder shared by the workers (default RUN/artifacts)")
    p.add_argument(
        "--show", metavar="RUN", help="print the summary of a finished or running search again (and refresh its files)"
    )
    p.add_argument(
        "--supernet",
        metavar="RUN/supernet.pt",
        help="one-shot search: score each trial with the weights it inherits from this supernet "
        "(from `bnas supernet`, trained on the same space) instead of training it",
    )
    p.add_argument(
        "--supernet-score",
        choices=SUPERNET_SCORES,
        help="with --supernet: what scores a trial: accuracy (default), the validation accuracy of its inherited "
        "weights after BatchNorm recalibration; angle, ABS's angle between its weights in the untrained supernet "
        "and in the trained one (no data, a larger angle ranks higher)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        metavar="N",
        help="with --supernet: training batches (of 64) that re-estimate each trial's BatchNorm statistics (default 8)",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        metavar="N",
        help="with --supernet: train a copy of each trial's inherited weights for N steps (the space's budget "
        "optimiser and batch size, seeded) before scoring it, at the cost of N training steps per trial "
        "(default 0: the inherited weights as they are)",
    )
    p.add_argument(
        "--probe-samples",
        type=int,
        metavar="N",
        help="with --supernet: score each trial by a linear classifier refitted on its own features for N seeded "
        "training images instead of by the supernet's shared classifier (default 0: the shared one)",
    )
    p.add_argument(
        "--retrain-top",
        type=int,
        metavar="K",
        help="after the search, retrain its K best trials (complete, within the constraints, not duplicates; several "
        "objectives: the Pareto front, at most K) from scratch in RUN/retrain/trial-N and report their validation "
        "and test accuracy; a rerun resumes them",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        metavar="E",
        help="with --retrain-top: epochs per retraining (default: the space's, or the --retrain-recipe's)",
    )
    p.add_argument(
        "--retrain-recipe",
        metavar="FILE.yaml",
        help="with --retrain-top: retrain with this recipe instead of the space's budget: a YAML mapping of "
        "training keys (epochs, batch_size, optimizer, schedule, ...; see a genotype's training: section), or a "
        "genotype file, whose training: section is used; each key given replaces the budget's, the others stay",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_catalog_argument(p)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set by --workers for its children
    p.set_defaults(handler=run_search)


def _show(run: Path, storage: str | None) -> int:
    meta_path = run / "run.json"
    if not meta_path.is_file():
        raise BnasError(f"{run} is not a bnas search folder (no run.json); give the --out folder of a search")
    meta = json.loads(meta_path.read_text())
    url = storage or meta["storage"]
    if "***" in url:
        raise BnasError("the study's storage URL holds a password that is not saved; pass it again with --storage")
    try:
        study = optuna.load_study(study_name=meta["study"], storage=open_storage(url))
    except KeyError:
        raise BnasError(f"no study {meta['study']!r} in {meta['storage']}") from None
    write_outputs(study, run)
    print(summary_text(study, run))
    return 0


def _run_workers(args: argparse.Namespace, cfg: SearchConfig) -> tuple[optuna.Study, list[int]]:
    """Start ``--workers`` processes on one study (all train and validate with the same seed
    and split; the sampler draws per trial number, so no two propose alike) and, with
    ``--devices``, each has its own GPU."""
    study = open_study(cfg)  # created once here, so the workers never race to create it
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else []
    procs = []
    for i in range(args.workers):
        cmd = [
            sys.executable,
            "-m",
            "bnas",
            "search",
            args.space,
            "--trials",
            str(cfg.trials),
            "--out",
            str(cfg.out),
            "--storage",
            cfg.storage_url,
            "--study",
            cfg.name,
            "--seed",
            str(cfg.seed),
            "--worker-index",
            str(i),
            "--device",
            cfg.device,
        ]
        for flag, value in (
            ("--timeout", args.timeout),
            ("--sampler", args.sampler),
            ("--pruner", args.pruner),
            ("--data-root", args.data_root),
            ("--heartbeat", cfg.heartbeat),
            ("--artifacts", args.artifacts),
            ("--threads", args.threads),
            ("--supernet", cfg.supernet),
            ("--supernet-score", args.supernet_score),
            ("--calibration-batches", args.calibration_batches),
            ("--finetune-steps", args.finetune_steps),
            ("--probe-samples", args.probe_samples),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        for catalog in cfg.catalogs:  # a worker re-reads the space file (its `catalog:`), not these flags
            cmd += ["--catalog", catalog]
        if i > 0 or args.quiet:
            cmd.append("--quiet")
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        procs.append(subprocess.Popen(cmd, env=env))
    return study, [p.wait() for p in procs]


def _check_devices(args: argparse.Namespace, device: str) -> None:
    """``--devices`` hands out GPUs to ``--workers`` processes: anything else would be ignored."""
    if args.devices is None:
        return
    ids = [d.strip() for d in args.devices.split(",")]
    if not all(d.isdigit() for d in ids):
        raise BnasError(f"--devices takes comma-separated GPU numbers such as 0,1, got {args.devices!r}")
    if not device.startswith("cuda"):
        raise BnasError(
            f"--devices {args.devices} gives each worker a GPU, but this run uses --device {device}; "
            "add --device cuda, or drop --devices"
        )
    if args.workers < 2:
        raise BnasError(
            f"--devices {args.devices} spreads --workers K processes over GPUs, but this run has one "
            "process; add --workers K, or pick its GPU with --device cuda:N"
        )


def run_search(args: argparse.Namespace) -> int:
    catalogs = load_catalogs(args)  # before the space: its ops may be the catalogs' presets
    if args.show:
        return _show(Path(args.show), args.storage)
    if not args.space:
        raise BnasError("give a search-space file (e.g. search_spaces/quickstart.yaml), or --show RUN")
    for flag in ("trials", "workers", "threads", "heartbeat", "calibration_batches", "retrain_top", "retrain_epochs"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise BnasError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.calibration_batches is not None and args.supernet is None:
        raise BnasError(
            "--calibration-batches applies to a one-shot search: add --supernet RUN/supernet.pt, or drop it"
        )
    if args.supernet_score is not None and args.supernet is None:
        raise BnasError("--supernet-score applies to a one-shot search: add --supernet RUN/supernet.pt, or drop it")
    if args.supernet_score == "angle":
        for flag in ("calibration_batches", "finetune_steps", "probe_samples"):
            if getattr(args, flag) is not None:
                raise BnasError(
                    f"--{flag.replace('_', '-')} changes how the inherited weights are evaluated on data, which "
                    "--supernet-score angle does not do; drop one of the two"
                )
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise BnasError(f"--finetune-steps must be 0 or more, got {args.finetune_steps}")
    if args.finetune_steps is not None and args.supernet is None:
        raise BnasError("--finetune-steps applies to a one-shot search: add --supernet RUN/supernet.pt, or drop it")
    if args.probe_samples is not None and args.probe_samples < 0:
        raise BnasError(f"--probe-samples must be 0 or more, got {args.probe_samples}")
    if args.probe_samples is not None and args.supernet is None:
        raise BnasError("--probe-samples applies to a one-shot search: add --supernet RUN/supernet.pt, or drop it")
    for flag in ("retrain_epochs", "retrain_recipe"):
        if getattr(args, flag) is not None and args.retrain_top is None:
            raise BnasError(f"--{flag.replace('_', '-')} applies to --retrain-top K: add --retrain-top K, or drop it")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise BnasError(
            f"--timeout must be a positive, finite number of seconds, got {args.timeout}; "
            "leave it out to run until --trials are finished"
        )
    device = str(resolve_device(args.device))  # before anything is written: cuda without a GPU, tpu, cuda:abc
    _check_devices(args, device)
    if args.workers > 1 and args.storage and args.storage.startswith("sqlite"):
        raise BnasError(
            f"--workers {args.workers} with an SQLite --storage: SQLite locks the file against several "
            "writing processes; leave --storage out (the workers then share RUN/study.journal), or give "
            "journal:PATH or a postgresql:// URL"
        )
    space = load_space(args.space)
    retrain_recipe = load_retrain_recipe(args.retrain_recipe, space) if args.retrain_recipe else None
    out = Path(args.out or f"runs/{space.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable_dir(out, "--out")
    storage = args.storage
    if args.workers > 1 and storage is None:
        # Several processes on one machine share Optuna's journal file: no server needed.
        storage = f"journal:{(out / 'study.journal').resolve()}"
    heartbeat = args.heartbeat
    if heartbeat is None and storage is not None and not storage.startswith("journal:"):
        heartbeat = 10
    cfg = SearchConfig(
        space=space,
        out=out,
        trials=args.trials,
        timeout=args.timeout,
        storage=storage,
        study_name=args.study,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=args.seed,
        worker_index=args.worker_index,
        device=device,
        threads=args.threads,
        data_root=args.data_root,
        progress=not args.quiet,
        heartbeat=heartbeat,
        artifacts=Path(args.artifacts) if args.artifacts else None,
        catalogs=tuple(catalogs),
        # Absolute: --workers children and run.json name the same file from any folder.
        supernet=Path(args.supernet).resolve() if args.supernet else None,
        supernet_score=args.supernet_score or "accuracy",
        calibration_batches=args.calibration_batches or 8,
        finetune_steps=args.finetune_steps or 0,
        probe_samples=args.probe_samples or 0,
        retrain_top=args.retrain_top,
        retrain_epochs=args.retrain_epochs,
        retrain_recipe=retrain_recipe,
    )
    start = time.perf_counter()
    worker_codes: list[int] = []
    if args.workers > 1:
        study, worker_codes = _run_workers(args, cfg)
    else:
        study = run_search_study(cfg)
    if args.worker_index > 0:
        return 0  # the parent of --workers writes the outputs once, when all are done
    if cfg.retrain_top and not any(worker_codes):  # a worker stopped early: the study is not done yet
        with RunLock(out):  # two reruns never train into the same RUN/retrain/trial-N
            retrain_top(study, cfg)
    try:
        retry_db("write the search's outputs", lambda: write_outputs(study, out))
    except (OSError, BnasError) as exc:
        if is_disk_full(exc):
            raise SearchError(
                f"the disk is full while writing the search's outputs in {out} ({exc}); the study keeps "
                "every finished trial: free some space and run `bnas search --show RUN` to write them"
            ) from exc
        raise
    print(summary_text(study, out))
    print(f"search finished in {time.perf_counter() - start:.1f} s; {saved_line(study)}", file=sys.stderr)
    failed = {i: code for i, code in enumerate(worker_codes) if code != 0}
    if failed:
        # Each worker printed its own error; the parent's exit code must not hide them.
        raise SearchError(
            f"worker(s) {', '.join(f'{i} (exit {c})' for i, c in failed.items())} stopped early, see their "
            "messages above; every finished trial is kept in the study: rerun the same command to continue"
        )
    return 0
