"""A supernet training run: ``bnas supernet SPACE --out RUN`` (``train_supernet``) and the
file it leaves, ``RUN/supernet.pt`` (``load_supernet``).

``RUN/supernet.pt`` is both the checkpoint and the product: it holds the shared weights, the
optimiser, the position (epoch, step inside it), the history, every RNG state (the global
ones and the path sampler's) and the recipe, so an interrupted run (Ctrl-C, a killed job)
continues to bit-identical weights on the CPU with ``--resume``. It also holds the space
file's text and fingerprint, the seed and the dataset, so ``bnas search --supernet`` and
``bnas eval --init-from`` check that they use it on the space and split it was trained on.
It is written atomically after every epoch (and on Ctrl-C, between two steps).

Next to it: ``history.json`` (per epoch: the sampled paths' training loss and accuracy, and
the validation accuracy of a few fixed *monitor* paths with recalibrated BatchNorm) and
``curves.png``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import WriteError, check_writable_dir
from ..data import DataSplits
from ..evaluate import Initialiser, check_input_shape, resolve_device
from ..genotype import Genotype
from ..report import plot_curves
from ..train.allocator import tune_cpu_allocator
from ..train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_reason
from ..train.console import InterruptGuard, Progress, saved_on_interrupt
from ..train.loop import seed_everything
from ..train.recipe import Recipe, TrainingError, recipe_changes
from ..yaml_io import parse_yaml_mapping, write_text_atomic
from .objective import probe_genotype, search_data
from .path_sampling import PathSampler, check_sampling
from .space import SearchSpace, parse_space
from .supernet import (
    Choices,
    Supernet,
    SupernetError,
    calibration_batches,
    extract,
    make_supernet_optimizer,
    recalibrate_bn,
    score,
    supernet_recipe,
    train_supernet_epoch,
)

__all__ = [
    "SUPERNET_FILE",
    "SupernetTrainer",
    "initial_of",
    "initial_supernet",
    "load_supernet",
    "monitor_paths",
    "supernet_initialiser",
    "train_supernet",
]

log = logging.getLogger(__name__)

SUPERNET_FILE = "supernet.pt"
KIND = "bnas-supernet"
FORMAT = 2  # 2: records its widths, separate or sliced (bnas.search.supernet)
_ADVICE = "pass the supernet.pt that `bnas supernet SPACE --out RUN` wrote"
# What a key that older supernet files lack meant: files from before --paths trained every path,
# those from before --sampling one path per step, and those from before --kernels separate kernels.
_ABSENT = {"paths": "all", "sampling": "uniform", "kernels": "separate"}


# --------------------------------------------------------------------------------------
# The path sampler's state, in the form ``weights_only`` loads take
# --------------------------------------------------------------------------------------
def _random_state(rng: random.Random) -> dict[str, Any]:
    version, state, gauss_next = rng.getstate()
    return {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss_next}


def _set_random_state(rng: random.Random, saved: Mapping[str, Any]) -> None:
    rng.setstate((saved["version"], tuple(int(v) for v in saved["state"].tolist()), saved["gauss_next"]))


def monitor_paths(
    supernet: Supernet, count: int, seed: int, sampler: PathSampler | None = None
) -> list[tuple[str, Choices]]:
    """The paths validated after every epoch: the largest path of a seeded sample (widest,
    deepest), then seeded samples drawn as the training draws them (``sampler``, default
    uniform over all paths); the same ones on every resume."""
    rng = random.Random(f"bnas-monitor:{seed}")
    draw = sampler.draw if sampler is not None else supernet.sample_choices
    paths: list[tuple[str, Choices]] = []
    if count >= 1:
        paths.append(("largest", supernet.largest_choices(supernet.sample_choices(rng))))
    for i in range(1, count):
        paths.append((f"sample{i}", draw(rng)))
    return paths


class SupernetTrainer:
    """Trains ``supernet`` by single-path sampling (``paths`` and ``sampling``: see
    ``bnas.search.path_sampling``); checkpoints into ``out_dir``.

    Mirrors ``bnas.train.Trainer``: the same recipe keys, progress bar, Ctrl-C guard and
    atomic checkpoints, with the supernet's state (``state()``) in place of one network's.
    """

    def __init__(
        self,
        supernet: Supernet,
        data: DataSplits,
        recipe: Recipe,
        out_dir: str | os.PathLike[str] | None,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        distill: bool = False,
        paths: str = "all",
        sampling: str = "uniform",
        monitor: int = 3,
        calibration: int = 8,
        progress: bool = False,
    ):
        self.device = torch.device(device)
        self.supernet = supernet.to(self.device)
        self.data = data
        self.recipe = recipe
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.distill = distill
        self.progress = progress
        self.optimizer = make_supernet_optimizer(self.supernet, recipe)
        self.paths_rng = random.Random(seed)
        check_sampling(paths, sampling, distill)
        self.sampler = PathSampler(self.supernet, paths, sampling=sampling)
        self.monitor = monitor_paths(self.supernet, monitor, seed, self.sampler)
        self.calibration = calibration_batches(data, calibration, 64, seed, self.device) if monitor else []
        self.epoch = 0
        self.step_in_epoch = 0
        self.partial: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.elapsed_s = 0.0

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / SUPERNET_FILE if self.out_dir is not None else None

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        space = self.supernet.space
        return {
            "kind": KIND,
            "format": FORMAT,
            "model": self.supernet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "partial": dict(self.partial),
            "history": self.history,
            "elapsed_s": self.elapsed_s,
            "rng": rng_state(),
            "paths_rng": _random_state(self.paths_rng),
            "recipe": self.recipe.to_dict(),
            "distill": self.distill,
            "widths": self.supernet.widths,
            "kernels": self.supernet.kernels,
            "paths": self.sampler.mode,
            "sampling": self.sampler.sampling,
            "seed": self.seed,
            "dataset": self.data.name,
            "space_name": space.name,
            "space_fingerprint": space.fingerprint(),
            "space_source": str(Path(space.source).resolve()) if space.source else "",
            "space_yaml": _space_text(space),
        }

    def load_state(self, state: Mapping[str, Any], where: str) -> None:
        """Continue from a ``state()`` of an earlier session of this run (checked first)."""
        advice = "rerun without --resume and another --out to start a new supernet"
        _check_kind(state, where)
        for key, mine in (
            ("space_fingerprint", self.supernet.space.fingerprint()),
            ("seed", self.seed),
            ("distill", self.distill),
            ("widths", self.supernet.widths),
            ("kernels", self.supernet.kernels),
            ("paths", self.sampler.mode),
            ("sampling", self.sampler.sampling),
            ("dataset", self.data.name),
        ):
            saved = state.get(key, _ABSENT.get(key))
            if saved != mine:
                raise SupernetError(
                    f"{where} was trained with {key} {saved!r}, not {mine!r}; resume it with the "
                    f"same space file, --seed, --distill, --widths, --kernels, --paths and --sampling, or {advice}"
                )
        changed = recipe_changes(state.get("recipe") or {}, self.recipe)
        if changed:
            raise SupernetError(
                f"{where}: the recipe differs from the one the run started with ({', '.join(changed)}); "
                f"only --epochs may change when resuming, or {advice}"
            )
        try:
            self.supernet.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch = int(state["epoch"])
            self.step_in_epoch = int(state["step_in_epoch"])
            self.partial = {k: float(v) for k, v in dict(state["partial"]).items()}
            self.history = list(state["history"])
            self.elapsed_s = float(state["elapsed_s"])
            set_rng_state(state["rng"])
            _set_random_state(self.paths_rng, state["paths_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SupernetError(f"{where} is damaged or from another bnas version ({first}); {advice}") from exc

    def _save(self) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        try:
            save_checkpoint(path, self.state())
        except WriteError as exc:
            kept = "the previous supernet.pt is intact" if path.is_file() else "nothing was saved yet"
            raise TrainingError(
                f"cannot write {path} ({write_reason(exc.__cause__ or exc)}); {kept}: free some space and rerun "
                "the same command with --resume"
            ) from exc
        assert self.out_dir is not None
        write_text_atomic(self.out_dir / "history.json", json.dumps(self.history, indent=1) + "\n")
        if self.history:
            plot_curves(
                self.history,
                self.out_dir / "curves.png",
                f"supernet of {self.supernet.space.name}",
                ("train (sampled paths)", f"validation (mean of {len(self.monitor)} monitor paths)"),
            )

    # -- training ----------------------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        """Validation accuracy and loss of each monitor path (recalibrated BN), and their means."""
        row: dict[str, float] = {}
        if not self.monitor or not len(self.data.val_y):
            return {"val_acc": 0.0, "val_loss": 0.0}
        accs, losses = [], []
        for name, choices in self.monitor:
            genotype = self.supernet.genotype(choices, name=f"{self.supernet.space.name}-{name}")
            acc, loss = score(self.supernet, genotype, self.data, calibration=self.calibration, with_loss=True)
            row[f"val_acc_{name}"] = acc
            accs.append(acc)
            losses.append(loss)
        row["val_acc"] = sum(accs) / len(accs)
        row["val_loss"] = sum(losses) / len(losses)
        return row

    def fit(self) -> list[dict[str, float]]:
        """Train to ``recipe.epochs`` from wherever the run is; returns the history."""
        recipe = self.recipe
        if self.device.type == "cpu":
            tune_cpu_allocator()
        steps = len(self.data.loader("train", recipe.batch_size, shuffle=True, seed=recipe.seed))
        progress = Progress(recipe.epochs, steps, self.progress)
        save = self._save if self.checkpoint_path is not None else None

        def saved() -> str:
            return f"supernet saved at {self.checkpoint_path} (epoch {self.epoch + 1}, step {self.step_in_epoch})"

        with saved_on_interrupt(progress, save, saved) as guard:
            while self.epoch < recipe.epochs:
                self._run_epoch(progress, guard, steps)
                guard.check()
        return self.history

    def _run_epoch(self, progress: Progress, guard: InterruptGuard, steps: int) -> None:
        epoch, recipe = self.epoch, self.recipe
        progress.start_epoch(epoch, self.step_in_epoch)
        t0, cpu0 = time.perf_counter(), time.process_time()
        first_step = self.step_in_epoch
        cpu_before = float(self.partial.get("cpu_s", 0.0))  # spent in this epoch before an interruption

        def after_step(done: int, totals: dict[str, float]) -> None:
            self.step_in_epoch = done
            self.partial = {**totals, "cpu_s": cpu_before + time.process_time() - cpu0}
            seen = max(totals["seen"], 1.0)
            per_step = (time.perf_counter() - t0) / max(done - first_step, 1)
            remaining = per_step * ((steps - done) + (recipe.epochs - epoch - 1) * steps)
            rate = totals["seen"] / max(totals["time_s"], 1e-9)
            progress.step(epoch, done, totals["loss_sum"] / seen, totals["correct"] / seen, rate, remaining)
            guard.check()

        stats = train_supernet_epoch(
            self.supernet,
            self.data,
            self.optimizer,
            recipe,
            self.paths_rng,
            epoch,
            distill=self.distill,
            start_step=self.step_in_epoch,
            totals=self.partial,
            on_step=after_step,
            sample=self.sampler,
        )
        t_val = time.perf_counter()
        validation = self._validate()
        self.elapsed_s += stats.time_s + time.perf_counter() - t_val
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_acc": stats.acc,
            **validation,
            "lr": stats.lr,
            "epoch_time_s": stats.time_s,
            # This process's CPU seconds for the epoch and its validation (this session's part
            # of an epoch a Ctrl-C cut): what one-shot search costs, whatever the machine's load.
            "cpu_s": cpu_before + time.process_time() - cpu0,
            "samples_per_s": stats.samples / stats.time_s if stats.time_s > 0 else 0.0,
        }
        self.history.append(row)
        self.epoch, self.step_in_epoch, self.partial = epoch + 1, 0, {}
        self._save()
        mean_epoch = sum(r["epoch_time_s"] for r in self.history) / len(self.history)
        progress.end_epoch(epoch, row, (recipe.epochs - self.epoch) * mean_epoch)


def _space_text(space: SearchSpace) -> str:
    """The space file as written (so a supernet file alone can rebuild its space)."""
    if space.source and Path(space.source).is_file():
        return Path(space.source).read_text()
    return ""


def _check_kind(state: Any, where: str) -> None:
    if not isinstance(state, Mapping) or state.get("kind") != KIND:
        raise SupernetError(f"{where} is not a bnas supernet (no kind: {KIND}); {_ADVICE}")
    if state.get("format") != FORMAT:
        raise SupernetError(f"{where} has supernet format {state.get('format')!r}, not {FORMAT}; {_ADVICE}")


def train_supernet(
    space: SearchSpace,
    out: str | os.PathLike[str] | None,
    *,
    epochs: int | None = None,
    resume: bool = False,
    distill: bool = False,
    widths: str = "separate",
    kernels: str = "separate",
    paths: str = "all",
    sampling: str = "uniform",
    device: str = "cpu",
    seed: int = 0,
    data_root: str | None = None,
    progress: bool = False,
    data: DataSplits | None = None,
    overrides: Mapping[str, Any] | None = None,
    monitor: int = 3,
) -> Supernet:
    """Train (or, with ``resume``, continue) a supernet of ``space``; ``out/supernet.pt`` holds it.

    The recipe is the space's ``budget`` (what a trial trains with) with ``epochs`` and
    ``overrides``; the data is the search's split for ``seed`` (``search_data``), so a search
    with the same seed scores on images the supernet never trained on.
    """
    check_sampling(paths, sampling, distill)
    dev = resolve_device(device)
    recipe = supernet_recipe(space, {**dict(overrides or {}), **({"epochs": epochs} if epochs else {}), "seed": seed})
    out_dir = Path(out) if out is not None else None
    path = out_dir / SUPERNET_FILE if out_dir is not None else None
    if out_dir is not None and path is not None:
        if resume and not path.is_file():
            raise SupernetError(f"--resume: no {SUPERNET_FILE} in {out_dir}; run without --resume to start")
        if not resume and path.exists():
            raise SupernetError(
                f"{out_dir} already holds a supernet ({SUPERNET_FILE}); pass --resume to continue it "
                "(--epochs may grow) or choose another --out"
            )
        check_writable_dir(out_dir, "--out")
    if data is None:
        data = search_data(space, seed, data_root)
    check_input_shape(probe_genotype(space), data)
    data = data.to(dev)
    supernet = initial_supernet(space, seed, widths, kernels)
    trainer = SupernetTrainer(
        supernet,
        data,
        recipe,
        out_dir,
        device=dev,
        seed=seed,
        distill=distill,
        paths=paths,
        sampling=sampling,
        monitor=monitor,
        progress=progress,
    )
    if resume and path is not None:
        trainer.load_state(load_checkpoint(path, _ADVICE), str(path))
        if trainer.epoch >= recipe.epochs:
            log.info("%s is already trained for %d epochs (give a larger --epochs to go on)", path, trainer.epoch)
        else:
            log.info("resuming %s at epoch %d, step %d", path, trainer.epoch + 1, trainer.step_in_epoch)
    trainer.fit()
    supernet.meta = _meta(trainer.state(), str(path) if path else "")
    return supernet


def initial_supernet(
    space: SearchSpace, seed: int = 0, widths: str = "separate", kernels: str = "separate"
) -> Supernet:
    """The untrained supernet that ``train_supernet`` starts from with ``seed``, ``widths``
    and ``kernels``: the weights ``supernet.path_angle`` measures a path's training from."""
    seed_everything(seed)
    return Supernet(space, widths=widths, kernels=kernels)


def initial_of(supernet: Supernet) -> Supernet:
    """The untrained supernet that the trained ``supernet`` started from, rebuilt from the
    seed, widths and kernels its ``meta`` records, on its device."""
    meta = supernet.meta
    return initial_supernet(supernet.space, int(meta["seed"]), str(meta["widths"]), str(meta["kernels"])).to(
        supernet.device
    )


def _meta(state: Mapping[str, Any], path: str) -> dict[str, Any]:
    return {
        "path": path,
        "epochs": int(state["epoch"]),
        "space_name": state.get("space_name", ""),
        "space_fingerprint": state.get("space_fingerprint", ""),
        "space_source": state.get("space_source", ""),
        "seed": int(state.get("seed", 0)),
        "dataset": state.get("dataset", ""),
        "distill": bool(state.get("distill", False)),
        "widths": str(state.get("widths", "separate")),
        "kernels": str(state.get("kernels", _ABSENT["kernels"])),
        "paths": str(state.get("paths", _ABSENT["paths"])),
        "sampling": str(state.get("sampling", _ABSENT["sampling"])),
        "recipe": dict(state.get("recipe") or {}),
    }


def _space_from_state(state: Mapping[str, Any], where: str) -> SearchSpace:
    text, source = state.get("space_yaml") or "", state.get("space_source") or ""
    if not text:
        raise SupernetError(f"{where} does not hold its search space's text; give the space file as well")
    base = Path(source).parent if source else None
    space = parse_space(parse_yaml_mapping(text, f"{where} (its search space)", what="search space"), base=base)
    return replace(space, source=source or None)


def load_supernet(path: str | os.PathLike[str], space: SearchSpace | None = None, device: str = "cpu") -> Supernet:
    """The trained supernet in ``path`` (a ``RUN/supernet.pt``), on ``device``.

    With ``space``, its fingerprint must be the one the supernet was trained on; without,
    the space is rebuilt from the text the file holds. ``supernet.meta`` says how it was
    trained (epochs, seed, dataset, space fingerprint, recipe, path).
    """
    where = str(path)
    state = load_checkpoint(path, _ADVICE)
    _check_kind(state, where)
    if space is None:
        space = _space_from_state(state, where)
    elif state.get("space_fingerprint") != space.fingerprint():
        raise SupernetError(
            f"{where} was trained on search space {state.get('space_name')!r} "
            f"({state.get('space_source') or 'no file recorded'}), not on this version of {space.name!r} "
            f"({space.source or 'given in code'}): other choices, budget or constraints; train a supernet of "
            "this space with `bnas supernet SPACE --out RUN`"
        )
    meta = _meta(state, where)
    supernet = Supernet(space, widths=meta["widths"], kernels=meta["kernels"])
    try:
        supernet.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SupernetError(f"{where}: its weights do not fit the space's supernet ({first}); {_ADVICE}") from exc
    supernet.meta = meta
    return supernet.to(resolve_device(device))


def supernet_initialiser(path: str | os.PathLike[str], genotype: Genotype) -> Initialiser:
    """An ``initialise`` for ``bnas.evaluate``: the weights ``genotype`` inherits from the
    supernet in ``path``, its BatchNorm statistics re-estimated on 8 training batches of 64
    (shuffled with the recipe's seed); ``bnas eval --init-from`` fine-tunes from them."""

    def initialise(model: nn.Module, data: DataSplits, recipe: Recipe, device: torch.device) -> str:
        supernet = load_supernet(path, device=str(device))
        if data.name != supernet.meta["dataset"]:
            raise SupernetError(
                f"--init-from {path}: the supernet was trained on {supernet.meta['dataset']!r}, not {data.name!r}; "
                f"pass --dataset {supernet.meta['dataset']}"
            )
        inherited = extract(supernet, genotype)
        recalibrate_bn(inherited, calibration_batches(data, 8, 64, recipe.seed, device))
        model.load_state_dict(inherited.state_dict())
        log.info("initialised %s from %s (%d supernet epochs)", genotype.name, path, supernet.meta["epochs"])
        return str(path)

    return initialise
