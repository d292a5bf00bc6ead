"""The training loop: ``Trainer`` (epochs, validation, early stopping, checkpoints each
epoch, exact resume), ``fit``, ``evaluate_accuracy`` and ``seed_everything``."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import WriteError
from ..binarize import clip_latent_weights, set_binarization
from ..data import DataSplits, TensorLoader
from .allocator import tune_cpu_allocator
from .checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_ADVICE,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_reason,
)
from .console import InterruptGuard, Progress, saved_on_interrupt
from .losses import distill_loss, task_loss
from .optimiser import make_optimizer, set_lr
from .recipe import Recipe, TrainingError

__all__ = ["EpochCallback", "TrainResult", "Trainer", "evaluate_accuracy", "fit", "seed_everything"]

logger = logging.getLogger(__name__)

# Called after each epoch with the 1-based epoch and its history row.
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns: the per-epoch history and the run's summary."""

    history: list[dict[str, float]]
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    wall_time_s: float  # training and validation time of all sessions of the run
    samples_per_s: float  # training samples per second of training time


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: TensorLoader, device: torch.device | str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``loader``, in eval mode."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    model.train(was)
    if not total:
        return 0.0, 0.0
    return correct.item() / total, loss_sum.item() / total


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``model`` on ``data`` with ``recipe``; checkpoints into ``out_dir`` each epoch.

    ``out_dir/checkpoint.pt`` holds the model, the optimiser, the epoch and the position
    inside it, the history, the best validation state, the patience, every RNG state and the
    recipe, so ``resume()`` continues to bit-identical weights on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits,
        recipe: Recipe,
        device: torch.device | str = "cpu",
        out_dir: str | os.PathLike[str] | None = None,
        teacher: nn.Module | None = None,
        progress: bool = True,
        callbacks: list[EpochCallback] | None = None,
        tune_allocator: bool = True,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.data = data
        self.recipe = recipe
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self.tune_allocator = tune_allocator
        self.optimizer = make_optimizer(self.model, recipe)
        self.history: list[dict[str, float]] = []
        self.epoch = 0
        self.best_val_acc = -1.0
        self.best_epoch = -1
        self.patience = recipe.patience
        self.best_state: dict[str, Tensor] | None = None
        self.elapsed_s = 0.0  # training + validation time, summed over resumed sessions
        # Position inside an interrupted epoch (Ctrl-C saves mid-epoch; resume skips ahead).
        self.step_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time_s": 0.0}
        # (epoch, step) of the checkpoint on disk, for messages about what a failure keeps.
        self.saved_position: tuple[int, int] | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt``, or None for a run that keeps no checkpoint."""
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def state(self) -> dict[str, Any]:
        """Everything ``load_state`` needs to continue this run exactly (see the class doc)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "patience": self.patience,
            "best_state": self.best_state,
            "elapsed_s": self.elapsed_s,
            "rng": rng_state(),
            "recipe": self.recipe.to_dict(),
            "dataset": self.data.name,
            "step_in_epoch": self.step_in_epoch,
            "partial": dict(self.partial),
        }

    def load_state(self, state: Mapping[str, Any], where: str = "checkpoint", advice: str = RESUME_ADVICE) -> None:
        """Continue from ``state`` (a ``state()`` of an earlier session); a checkpoint that
        cannot resume this run is a ``TrainingError`` naming ``where`` and ending with ``advice``."""
        check_resumable(state, where, advice, model=self.model, dataset=self.data.name, recipe=self.recipe)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(
                f"{where}: the optimizer state does not fit this network and recipe ({first}); {advice}"
            ) from None
        try:
            self._restore_progress(state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise TrainingError(
                f"{where}: its training position is damaged ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); {advice}"
            ) from None
        self.saved_position = (self.epoch, self.step_in_epoch)

    def _restore_progress(self, state: Mapping[str, Any]) -> None:
        """The epoch, history, best state, patience and RNG states of a checkpoint."""
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_val_acc = float(state["best_val_acc"])
        self.best_epoch = int(state["best_epoch"])
        self.patience = state["patience"]
        if self.recipe.patience is not None and self.patience is not None:
            self.patience = max(int(self.patience), self.recipe.patience)
        elif self.recipe.patience is None:
            self.patience = None
        else:
            self.patience = self.recipe.patience
        self.best_state = state["best_state"]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.partial = {**self.partial, **dict(state.get("partial", {}))}
        set_rng_state(state["rng"])

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if there is one; True when resumed."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        self.load_state(load_checkpoint(path, RESUME_ADVICE), str(path))
        return True

    def _save(self) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        try:
            save_checkpoint(path, self.state())
        except WriteError as exc:
            # atomic_path kept the previous file: say which position it holds and how to go on.
            if self.saved_position is not None and path.is_file():
                epoch, step = self.saved_position
                at = f"after epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
                kept = (
                    f"the last good checkpoint ({at}) is intact: free some space, then rerun the same "
                    "command with --resume to continue from it"
                )
            else:
                kept = "no checkpoint was saved yet: free some space (or choose another --out) and start again"
            raise TrainingError(
                f"cannot write the checkpoint {path} ({write_reason(exc.__cause__ or exc)}); {kept}"
            ) from exc
        self.saved_position = (self.epoch, self.step_in_epoch)

    def _binarization_for(self, epoch: int) -> None:
        if self.recipe.two_step:
            set_binarization(self.model, activations=True, weights=epoch >= self.recipe.two_step)

    def _early_stop(self, epoch: int, val_acc: float, previous_best: float) -> bool:
        """The LeNet-5 tutorial's patience rule, counted in epochs (see ``patience`` in ``.recipe``)."""
        if self.patience is None:
            return False
        if (1 - val_acc) < (1 - previous_best) * self.recipe.improvement_threshold:
            self.patience = max(self.patience, math.ceil((epoch + 1) * self.recipe.patience_increase))
        return epoch + 1 >= self.patience

    def _diverged(self, loss: float, epoch: int, step: int) -> TrainingError:
        path = self.checkpoint_path
        kept = ""
        if path is not None and path.is_file():
            kept = f"; the last good checkpoint (after epoch {self.epoch}) is kept at {path}"
        return TrainingError(
            f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped{kept}. "
            "Lower the learning rate (--lr), or check the data and the genotype"
        )

    def fit(self) -> TrainResult:
        """Train to ``recipe.epochs`` (or until patience runs out), from wherever the run is."""
        recipe, device = self.recipe, self.device
        if device.type == "cpu" and self.tune_allocator:
            tune_cpu_allocator()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        train_loader = self.data.loader("train", recipe.batch_size, shuffle=True, seed=recipe.seed, device=device)
        val_loader = self.data.loader("val", 512, device=device)
        progress = Progress(recipe.epochs, len(train_loader), self.progress)
        use_amp = recipe.amp and device.type == "cuda"
        distill = recipe.distill or {}
        alpha, temperature = float(distill.get("alpha", 0.9)), float(distill.get("temperature", 4.0))
        stopped_early = False
        # Ctrl-C saves the exact position (epoch, step, RNG states): --resume continues from here.
        save = self._save if self.checkpoint_path is not None else None

        def saved() -> str:
            return f"checkpoint saved at {self.checkpoint_path} (epoch {self.epoch + 1}, step {self.step_in_epoch})"

        with saved_on_interrupt(progress, save, saved) as guard:
            while self.epoch < recipe.epochs:
                stop = self._run_epoch(train_loader, val_loader, progress, guard, use_amp, alpha, temperature)
                guard.check()
                if stop:
                    stopped_early = True
                    break
        train_time = sum(r["epoch_time_s"] for r in self.history)
        samples = sum(r["samples_per_s"] * r["epoch_time_s"] for r in self.history)
        return TrainResult(
            history=self.history,
            best_val_acc=max(self.best_val_acc, 0.0),
            best_epoch=self.best_epoch,
            epochs_run=self.epoch,
            stopped_early=stopped_early,
            wall_time_s=self.elapsed_s,
            samples_per_s=samples / train_time if train_time > 0 else 0.0,
        )

    def _run_epoch(
        self,
        train_loader: TensorLoader,
        val_loader: TensorLoader,
        progress: Progress,
        guard: InterruptGuard,
        use_amp: bool,
        alpha: float,
        temperature: float,
    ) -> bool:
        """One epoch (or the rest of an interrupted one) and its validation; True = stop."""
        recipe, device, epoch = self.recipe, self.device, self.epoch
        self._binarization_for(epoch)
        lr = set_lr(self.optimizer, recipe, epoch)
        train_loader.set_epoch(epoch)
        self.model.train()
        skip = self.step_in_epoch
        progress.start_epoch(epoch, skip)
        loss_sum, correct, seen = (
            float(self.partial["loss_sum"]),
            int(self.partial["correct"]),
            int(self.partial["seen"]),
        )
        done_before = float(self.partial.get("time_s", 0.0))  # time spent in this epoch before an interruption
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(train_loader):
            if step < skip:
                continue  # done before the interruption; the batch order is the same
            guard.check()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = self.model(x)
                loss = task_loss(logits.float(), y, recipe)
                if self.teacher is not None:
                    with torch.no_grad():
                        t_logits = self.teacher(x).float()
                    loss = (1 - alpha) * loss + alpha * distill_loss(logits.float(), t_logits, temperature)
            # One host sync per step: the loss for the NaN check and the batch's hits together.
            loss_value, hits = torch.stack((loss.detach().float(), (logits.argmax(1) == y).sum().float())).tolist()
            if not math.isfinite(loss_value):
                raise self._diverged(loss_value, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            clip_latent_weights(self.model)
            loss_sum += loss_value * len(y)
            correct += int(hits)
            seen += len(y)
            spent = done_before + time.perf_counter() - t0
            self.step_in_epoch = step + 1
            self.partial = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "time_s": spent}
            rate = seen / max(spent, 1e-9)
            per_step = (time.perf_counter() - t0) / (step + 1 - skip)
            remaining = per_step * ((len(train_loader) - step - 1) + (recipe.epochs - epoch - 1) * len(train_loader))
            progress.step(epoch, step + 1, loss_sum / seen, correct / seen, rate, remaining)
        epoch_time = done_before + time.perf_counter() - t0
        if seen == 0:
            raise TrainingError(f"{self.data.name}: the training split is empty")
        t_val = time.perf_counter()
        val_acc, val_loss = evaluate_accuracy(self.model, val_loader, device) if len(self.data.val_y) else (0.0, 0.0)
        # The time of an interrupted session inside this epoch was never added: add it all now.
        self.elapsed_s += epoch_time + (time.perf_counter() - t_val)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "epoch_time_s": epoch_time,
            "samples_per_s": seen / epoch_time if epoch_time > 0 else 0.0,
        }
        self.history.append(row)
        previous_best = self.best_val_acc
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch = val_acc, epoch + 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        stop = self._early_stop(epoch, val_acc, max(previous_best, 0.0))
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time_s": 0.0}
        self._save()
        mean_epoch = sum(r["epoch_time_s"] for r in self.history) / len(self.history)
        progress.end_epoch(epoch, row, (recipe.epochs - self.epoch) * mean_epoch)
        for callback in self.callbacks:
            callback(epoch + 1, row)
        return stop


def fit(model: nn.Module, data: DataSplits, recipe: Recipe, **kwargs: Any) -> TrainResult:
    """Train ``model`` (see ``Trainer`` for the keyword arguments)."""
    return Trainer(model, data, recipe, **kwargs).fit()
