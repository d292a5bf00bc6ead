"""``bnas search``: the command line of the architecture search."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import optuna

from ..errors import BnasError
from .outputs import summary_text, write_outputs
from .runner import SearchConfig, epochs_saved, run_search_study
from .space import load_space

__all__ = ["add_search_arguments", "run_search"]


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", nargs="?", help="search-space YAML (see search_spaces/)")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold in total (default 20)")
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument("--out", help="run folder (default runs/<space>-<time>); rerunning with the same --out resumes")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///RUN/study.db)")
    p.add_argument("--study", help="study name (default: the space's name)")
    p.add_argument("--sampler", choices=["tpe", "random", "nsga2", "gp"], help="default: the space's, else tpe")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: the space's, else median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--data-root", help="data folder (default $BNAS_DATA, else ~/.cache/bnas/data)")
    p.add_argument("--show", metavar="RUN", help="print the summary of a finished or running search again")
    p.add_argument("--quiet", action="store_true")


def _mask(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _show(run: Path, storage: str | None) -> int:
    meta_path = run / "run.json"
    if not meta_path.is_file():
        raise BnasError(f"{run} is not a bnas search folder (no run.json)")
    meta = json.loads(meta_path.read_text())
    url = storage or meta["storage"]
    if "***" in url:
        raise BnasError("the study's storage URL holds a password that is not saved; pass it again with --storage")
    try:
        study = optuna.load_study(study_name=meta["study"], storage=url)
    except KeyError:
        raise BnasError(f"no study {meta['study']!r} in {_mask(url)}") from None
    write_outputs(study, run)
    print(summary_text(study, run))
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.show:
        return _show(Path(args.show), args.storage)
    if not args.space:
        raise BnasError("give a search-space file (e.g. search_spaces/quickstart.yaml), or --show RUN")
    if args.trials <= 0:
        raise BnasError(f"--trials must be positive, got {args.trials}")
    space = load_space(args.space)
    out = Path(args.out or f"runs/{space.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = SearchConfig(space=space, out=out, trials=args.trials, timeout=args.timeout, storage=args.storage,
                       study_name=args.study, sampler=args.sampler, pruner=args.pruner, seed=args.seed,
                       device=args.device, data_root=args.data_root, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"storage": _mask(cfg.storage_url), "study": cfg.name, "space": str(Path(args.space).resolve())}
    start = time.perf_counter()
    study = run_search_study(cfg)
    (out / "run.json").write_text(json.dumps(meta, indent=2))
    write_outputs(study, out)
    trained, saved = epochs_saved(study)
    print(summary_text(study, out))
    print(f"search finished in {time.perf_counter() - start:.1f} s; pruning, constraints and duplicate detection saved "
          f"{saved} of {trained + saved} training epochs", file=sys.stderr)
    return 0



