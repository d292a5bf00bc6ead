"""``bnas eval``: train a genotype with its recipe, test it, write a report.

Outputs in ``--out`` (default ``runs/eval-<name>-<time>``): ``checkpoint.pt`` (every
epoch, atomic), ``report.json``, ``report.md`` and ``curves.png``.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import WriteError, atomic_path, check_writable_dir, new_dir_removed_on_failure
from .builder import build, check_ops
from .data import DataSplits, load_dataset
from .errors import BnasError
from .genotype import Genotype, load_genotype
from .metrics import summarize
from .report import write_report
from .signal_flow import constant_output
from .train import Recipe, Trainer, TrainingError, _state_mismatch, evaluate_accuracy, load_checkpoint, seed_everything

log = logging.getLogger(__name__)

__all__ = ["Initialiser", "evaluate", "resolve_device", "check_input_shape"]

# Sets a built network's weights before training; returns where they came from.
Initialiser = Callable[[nn.Module, DataSplits, Recipe, torch.device], str]


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")
_ACCEPTED_DEVICES = "cpu, cuda, cuda:N (a GPU index) or auto"


def resolve_device(name: str | None) -> torch.device:
    """The torch device for ``--device``: cpu, cuda, cuda:N or auto (a GPU when torch sees one).

    Anything else is refused here, before data is loaded or a trial runs: torch accepts
    ``meta`` (no storage, so nothing trains) and raises its own multi-line errors for the rest.
    """
    if name is None or name.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = name.strip().lower()
    match = _DEVICE.fullmatch(text)
    if text == "meta":
        raise BnasError(
            f"--device meta holds no data (shapes only), so nothing can train on it; use {_ACCEPTED_DEVICES}"
        )
    if match is None:
        raise BnasError(f"--device {name!r} is not a device bnas can train on; use {_ACCEPTED_DEVICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise BnasError(f"--device {name!r}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BnasError(f"--device {name} was asked for, but torch sees no CUDA device here; use --device cpu")
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise BnasError(
            f"--device {name}: torch sees {count} CUDA device(s) here (cuda:0 to cuda:{count - 1}); "
            "pick one of those, or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", int(index))


def check_input_shape(genotype: Genotype, data: DataSplits) -> None:
    if tuple(genotype.input) != tuple(data.input_shape):
        raise BnasError(
            f"genotype {genotype.name!r} takes input {list(genotype.input)} but dataset {data.name!r} gives "
            f"{list(data.input_shape)}; set `input: {list(data.input_shape)}` in the genotype or pick a matching dataset"
        )
    if genotype.num_classes != data.num_classes:
        raise BnasError(
            f"genotype {genotype.name!r} has num_classes {genotype.num_classes} but dataset {data.name!r} has {data.num_classes} classes"
        )


def _teacher(
    recipe: Recipe, data: DataSplits, device: torch.device, out: Path | None, progress: bool
) -> nn.Module | None:
    """The real-valued teacher for distillation: loaded from a checkpoint, or trained first."""
    spec = recipe.distill
    if not spec:
        return None
    if "teacher" not in spec:
        raise TrainingError("distill: needs `teacher: GENOTYPE.yaml` (built with binarization off)")
    teacher = build(load_genotype(spec["teacher"]), binarize=False)
    if spec.get("checkpoint"):
        advice = "pass the checkpoint.pt of a bnas eval run of the teacher genotype"
        state = load_checkpoint(spec["checkpoint"], advice)
        weights = state.get("model", state)
        mismatch = _state_mismatch(teacher, weights)
        if mismatch is not None:
            raise TrainingError(
                f"teacher checkpoint {spec['checkpoint']} does not fit the teacher "
                f"{spec['teacher']}: {mismatch}; {advice}"
            )
        teacher.load_state_dict(weights)
        return teacher
    teacher_recipe = recipe.merged({"distill": None})
    teacher_recipe.distill = None
    Trainer(teacher, data, teacher_recipe, device, out / "teacher" if out else None, progress=progress).fit()
    return teacher


def evaluate(
    genotype: Genotype | str | os.PathLike[str],
    dataset: str = "digits",
    *,
    overrides: Mapping[str, Any] | None = None,
    device: str | None = "cpu",
    out: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    download: bool = False,
    data: DataSplits | None = None,
    callbacks: list[Any] | None = None,
    test: bool = True,
    initialise: Initialiser | None = None,
) -> dict[str, Any]:
    """Train and test ``genotype``; returns the report (and writes it when ``out`` is set).

    ``initialise(model, data, recipe, device)`` sets the built network's weights before
    training instead of its random initialisation (e.g. ``bnas.search.supernet_run.
    supernet_initialiser``: the weights it inherits from a one-shot supernet) and returns
    where they came from, kept in the report as ``init_from``. A resumed run continues from
    its own checkpoint instead.
    """
    if not isinstance(genotype, Genotype):
        genotype = load_genotype(genotype)
    check_ops(genotype)  # op names and options before any data is loaded, as on load before
    constant = constant_output(genotype)
    if constant is not None:
        log.warning(
            "%s: the network's output does not depend on its input (%s); it will predict one class for "
            "every image, however long it trains",
            genotype.source or genotype.name,
            constant,
        )
    recipe = Recipe.from_dict(genotype.training, f"{genotype.source or genotype.name}: training").merged(
        dict(overrides or {})
    )
    dev = resolve_device(device)
    out_dir = Path(out) if out is not None else None
    # A run that fails before it writes anything (bad --init-from, a data error) leaves no
    # empty run folder behind.
    with new_dir_removed_on_failure(out_dir):
        if out_dir is not None:
            if resume and not (out_dir / "checkpoint.pt").is_file():
                raise BnasError(f"--resume: no checkpoint in {out_dir}; run without --resume to start")
            if not resume and (out_dir / "checkpoint.pt").exists():
                raise BnasError(
                    f"{out_dir} already holds a run (checkpoint.pt); pass --resume to continue it or choose another --out"
                )
            # Before loading data and training: a read-only --out would otherwise fail only at
            # the first checkpoint, after an epoch of work.
            check_writable_dir(out_dir, "--out")
        if data is None:
            data = load_dataset(
                dataset,
                data_root,
                val_fraction=recipe.val_fraction,
                seed=recipe.seed,
                shape=genotype.input,
                num_classes=genotype.num_classes,
                download=download,
            )
        check_input_shape(genotype, data)
        data = data.to(dev)
        seed_everything(recipe.seed)
        model = build(genotype)
        init_from = initialise(model, data, recipe, dev) if initialise is not None and not resume else None
        teacher = _teacher(recipe, data, dev, out_dir, progress)
        trainer = Trainer(model, data, recipe, dev, out_dir, teacher=teacher, progress=progress, callbacks=callbacks)
        if resume and not trainer.resume():
            raise BnasError(f"--resume: no checkpoint in {out_dir}; run without --resume to start")
        start = time.perf_counter()
        result = trainer.fit()
    wall = time.perf_counter() - start
    report: dict[str, Any] = {
        "genotype_name": genotype.name,
        "dataset": data.name,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "final_val_acc": result.history[-1]["val_acc"] if result.history else 0.0,
        "history": result.history,
        "wall_time_s": wall,
        "samples_per_s": result.samples_per_s,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "recipe": recipe.to_dict(),
        "metrics": {k: v for k, v in summarize(model, genotype.input).to_dict().items() if k != "layers"},
        "genotype": genotype.to_dict(),
        **({"init_from": str(init_from)} if init_from is not None else {}),
    }
    if test:
        test_loader = data.loader("test", 512)
        report["test_acc"], report["test_loss"] = evaluate_accuracy(model, test_loader, dev)
        if trainer.best_state is not None:
            final = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(trainer.best_state)
            report["test_acc_best_val_checkpoint"], _ = evaluate_accuracy(model, test_loader, dev)
            model.load_state_dict(final)
    if out_dir is not None:
        try:
            with atomic_path(out_dir / "model.pt", "model") as tmp:
                torch.save(model.state_dict(), tmp)
            write_report(out_dir, report)
        except (WriteError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Training is over and checkpoint.pt holds it: --resume only redoes the test and the outputs.
            what = str(exc) if isinstance(exc, WriteError) else f"cannot write the report in {out_dir}: {exc.strerror}"
            raise BnasError(
                f"{what}; training finished and {trainer.checkpoint_path} holds it: free some space, "
                "then rerun the same command with --resume to write model.pt and the report"
            ) from exc
    return report


def _versions() -> dict[str, str]:
    import networkx
    import optuna

    import bnas

    return {
        "bnas": bnas.__version__,
        "torch": torch.__version__,
        "networkx": networkx.__version__,
        "optuna": optuna.__version__,
        "python": platform.python_version(),
    }
