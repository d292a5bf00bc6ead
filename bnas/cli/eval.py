"""``bnas eval GENOTYPE.yaml``: train with the genotype's recipe (flags override it), test,
and write the report (``bnas.evaluate`` does the work)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..data import DATASETS
from ..errors import BnasError
from ..evaluate import evaluate
from ..genotype import load_genotype
from ..search.supernet_run import supernet_initialiser
from ..train import LOSSES, OPTIMIZERS, SCHEDULES
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="train a genotype on a dataset, test it, and write report.json / report.md / curves.png"
    )
    p.add_argument("genotype", help="genotype YAML file")
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default digits)")
    p.add_argument("--epochs", type=int, help="override the genotype's training.epochs")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--out", help="run folder (default runs/eval-<name>-<time>)")
    p.add_argument("--data-root", help="data folder (default $BNAS_DATA, else ~/.cache/bnas/data)")
    p.add_argument(
        "--download", action="store_true", help="download torchvision datasets when missing (needs internet)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate (optimizer.lr)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--seed", type=int)
    p.add_argument("--patience", type=int, help="early stopping patience in epochs (LeNet tutorial rule)")
    p.add_argument("--two-step", type=int, help="epochs with real weights before binarizing them (ReActNet)")
    p.add_argument("--teacher", help="real-valued teacher genotype for knowledge distillation")
    p.add_argument("--teacher-checkpoint", help="trained teacher weights (else the teacher is trained first)")
    p.add_argument(
        "--init-from",
        metavar="SUPERNET",
        help="start from the weights the genotype inherits from a one-shot supernet (RUN/supernet.pt of "
        "`bnas supernet`) and fine-tune them",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: torch's). Float sums round differently with another thread count, and a "
        "binary network amplifies that: a search trial trains on the search's --threads (default 1); give "
        "the same to repeat its training exactly",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_catalog_argument(p)
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    load_catalogs(args)  # before the genotype (and the teacher): their ops may be the catalogs' presets
    if args.threads is not None:
        if args.threads <= 0:
            raise BnasError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    genotype = load_genotype(args.genotype)
    overrides: dict[str, Any] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer.lr": args.lr,
        "optimizer.name": args.optimizer,
        "schedule.name": args.schedule,
        "loss": args.loss,
        "seed": args.seed,
        "patience": args.patience,
        "two_step": args.two_step,
    }
    if args.teacher:
        overrides["distill"] = {
            "teacher": args.teacher,
            **({"checkpoint": args.teacher_checkpoint} if args.teacher_checkpoint else {}),
        }
    out = args.out or f"runs/eval-{genotype.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = evaluate(
        genotype,
        args.dataset,
        overrides=overrides,
        device=args.device,
        out=out,
        data_root=args.data_root,
        resume=args.resume,
        progress=not args.quiet,
        download=args.download,
        initialise=supernet_initialiser(args.init_from, genotype) if args.init_from else None,
    )
    print(
        f"{genotype.name} on {report['dataset']}: test accuracy {report['test_acc']:.4f}, best validation accuracy "
        f"{report['best_val_acc']:.4f} (epoch {report['best_epoch']}), {report['epochs_run']} epochs in {report['wall_time_s']:.1f} s "
        f"({report['samples_per_s']:.0f} samples/s); report in {out}/report.md"
    )
    return 0
