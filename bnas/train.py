"""The trainer: recipes, losses, optimisers, schedules, checkpoints.

A ``Recipe`` is the whole training configuration. It comes from the genotype's
``training:`` section, overridden by flags. Recipe keys (all optional):

=====================  ===============================================================
optimizer              ``{name: adam|sgd, lr, momentum, nesterov, weight_decay}``
schedule               ``{name: cosine|step|linear|exponential|constant, warmup_epochs,
                       step_size, gamma, final_lr}``
epochs, batch_size     integers
loss                   ``cross_entropy`` or ``squared_hinge`` (BinaryNet, +-1 targets)
label_smoothing        for cross-entropy
decay_binary_weights   also apply weight decay to latent binary weights (default false;
                       BN, biases, thresholds and other 1-D parameters never decay)
two_step               epochs with binary activations and real weights before the weights
                       are binarized too (ReActNet's two-step schedule); 0 = off
distill                ``{teacher: GENOTYPE.yaml, checkpoint: PATH, temperature, alpha}``:
                       knowledge distillation from a real-valued teacher (the genotype
                       built with binarization off; trained first when no checkpoint)
patience               early stopping on validation accuracy, the LeNet-5 tutorial rule:
                       stop when the epoch reaches ``patience``; an improvement of more
                       than ``improvement_threshold`` (relative, on the error) raises
                       patience to ``epoch * patience_increase``. null = off
seed, amp, val_fraction  repeatability, mixed precision on CUDA, validation share
=====================  ===============================================================
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .binarize import binary_layers, clip_latent_weights, set_binarization
from .data import DataSplits, TensorLoader
from .errors import BnasError

__all__ = ["Recipe", "TrainingError", "TrainResult", "Trainer", "fit", "evaluate_accuracy", "save_checkpoint", "load_checkpoint"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "linear", "exponential", "constant")
LOSSES = ("cross_entropy", "squared_hinge")


class TrainingError(BnasError):
    """Training cannot go on (a bad recipe, a diverged loss, a missing checkpoint)."""


@dataclass
class Recipe:
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adam", "lr": 1e-3})
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "cosine"})
    epochs: int = 10
    batch_size: int = 64
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    decay_binary_weights: bool = False
    two_step: int = 0
    distill: dict[str, Any] | None = None
    patience: int | None = None
    patience_increase: float = 2.0
    improvement_threshold: float = 0.995
    seed: int = 0
    amp: bool = True
    val_fraction: float = 0.1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "training") -> "Recipe":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"{where}: unknown recipe key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        recipe = cls(**{k: copy.deepcopy(v) for k, v in data.items()})
        recipe.validate(where)
        return recipe

    def merged(self, overrides: Mapping[str, Any]) -> "Recipe":
        """A copy with ``overrides`` applied (``optimizer.lr`` style keys reach into dicts)."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if "." in key:
                outer, inner = key.split(".", 1)
                data[outer] = {**(data.get(outer) or {}), inner: value}
            else:
                data[key] = value
        return Recipe.from_dict(data, "flags")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def validate(self, where: str) -> None:
        def bad(key: str, expected: str, got: Any) -> TrainingError:
            return TrainingError(f"{where}.{key}: expected {expected}, got {got!r}")

        if not isinstance(self.optimizer, dict) or self.optimizer.get("name", "adam") not in OPTIMIZERS:
            raise bad("optimizer", f"{{name: {'|'.join(OPTIMIZERS)}, lr: ...}}", self.optimizer)
        lr = self.optimizer.get("lr", 1e-3)
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise bad("optimizer.lr", "a positive number", lr)
        if not isinstance(self.schedule, dict) or self.schedule.get("name", "cosine") not in SCHEDULES:
            raise bad("schedule", f"{{name: {'|'.join(SCHEDULES)}}}", self.schedule)
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(key, "a positive integer", value)
        if self.loss not in LOSSES:
            raise bad("loss", " or ".join(LOSSES), self.loss)
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise bad("patience", "a positive integer or null", self.patience)
        if self.distill is not None and not isinstance(self.distill, dict):
            raise bad("distill", "{teacher: GENOTYPE.yaml, checkpoint: PATH, temperature: T, alpha: A}", self.distill)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    wall_time_s: float
    samples_per_s: float


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Weight decay only where it belongs; BinaryNet's per-layer learning-rate scale kept."""
    base_lr = float(recipe.optimizer.get("lr", 1e-3))
    wd = float(recipe.optimizer.get("weight_decay", 0.0))
    latent = {id(layer.weight): layer for layer in binary_layers(model)}
    groups: dict[tuple[float, float], list[Tensor]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        layer = latent.get(id(p))
        scale = layer.lr_scale if layer is not None else 1.0
        decays = p.dim() > 1 and (layer is None or recipe.decay_binary_weights)
        groups.setdefault((scale, wd if decays else 0.0), []).append(p)
    return [
        {"params": params, "lr": base_lr * scale, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), params in groups.items()
    ]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    opt = recipe.optimizer
    groups = _param_groups(model, recipe)
    if opt.get("name", "adam") == "adam":
        # The fused kernel does Adam's element-wise update in one pass per tensor: on CPU it
        # roughly halves the optimiser's share of a step for large binary MLPs.
        return torch.optim.Adam(groups, lr=float(opt.get("lr", 1e-3)), fused=True)
    return torch.optim.SGD(groups, lr=float(opt.get("lr", 0.1)), momentum=float(opt.get("momentum", 0.9)), nesterov=bool(opt.get("nesterov", False)))


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """The learning-rate multiplier for ``epoch`` (0-based): warm-up, then the schedule."""
    sched = recipe.schedule
    name = sched.get("name", "cosine")
    warmup = int(sched.get("warmup_epochs", 0))
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    total = max(1, recipe.epochs - warmup)
    t = (epoch - warmup) / total
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if name == "linear":
        return max(0.0, 1 - t)
    if name == "step":
        return float(sched.get("gamma", 0.1)) ** ((epoch - warmup) // int(sched.get("step_size", 30)))
    if name == "exponential":
        final = float(sched.get("final_lr", 1e-6)) / float(recipe.optimizer.get("lr", 1e-3))
        return final ** t
    return 1.0


def _set_lr(optimizer: torch.optim.Optimizer, recipe: Recipe, epoch: int) -> float:
    base = float(recipe.optimizer.get("lr", 1e-3)) * lr_factor(recipe, epoch)
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_scale", 1.0)
    return base


def task_loss(logits: Tensor, y: Tensor, recipe: Recipe) -> Tensor:
    if recipe.loss == "squared_hinge":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype) * 2 - 1
        return F.relu(1 - target * logits).square().mean()
    return F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: TensorLoader, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``loader``."""
    was = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was)
    return (correct / total if total else 0.0), (loss_sum / total if total else 0.0)


# --------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads
# --------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` via a temp file + rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as exc:
        raise TrainingError(f"{path}: not a readable bnas checkpoint ({exc})") from None


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
EpochCallback = Callable[[int, dict[str, float]], None]


class _Progress:
    """tqdm bar on a terminal, plain log lines otherwise."""

    def __init__(self, total_epochs: int, steps: int, enabled: bool):
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.steps = steps
        self.total_epochs = total_epochs
        self.bar = None

    def start_epoch(self, epoch: int) -> None:
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.total_epochs}", leave=False, file=sys.stderr)

    def step(self, loss: float, acc: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", samples_s=f"{rate:.0f}")
            self.bar.update(1)

    def end_epoch(self, epoch: int, row: dict[str, float], eta_s: float) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(
                f"epoch {epoch + 1}/{self.total_epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"val acc {row['val_acc']:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:.0f} samples/s  "
                f"{row['epoch_time_s']:.1f} s  ETA {eta_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )


class Trainer:
    """Trains ``model`` on ``data`` with ``recipe``; checkpoints into ``out_dir`` each epoch."""

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
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.data = data
        self.recipe = recipe
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self.optimizer = make_optimizer(self.model, recipe)
        self.history: list[dict[str, float]] = []
        self.epoch = 0
        self.best_val_acc = -1.0
        self.best_epoch = -1
        self.patience = recipe.patience
        self.best_state: dict[str, Tensor] | None = None
        # Position inside an interrupted epoch (Ctrl-C saves mid-epoch; resume skips ahead).
        self.step_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0}

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "patience": self.patience,
            "best_state": self.best_state,
            "rng": _rng_state(),
            "recipe": self.recipe.to_dict(),
            "step_in_epoch": self.step_in_epoch,
            "partial": dict(self.partial),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_val_acc = float(state["best_val_acc"])
        self.best_epoch = int(state["best_epoch"])
        self.patience = state["patience"]
        self.best_state = state["best_state"]
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.partial = dict(state.get("partial", self.partial))
        _set_rng_state(state["rng"])

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if there is one; True when resumed."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        self.load_state(load_checkpoint(path))
        return True

    def _save(self) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self.state())

    def _binarization_for(self, epoch: int) -> None:
        if self.recipe.two_step:
            set_binarization(self.model, activations=True, weights=epoch >= self.recipe.two_step)

    def _early_stop(self, epoch: int, val_acc: float, previous_best: float) -> bool:
        """The LeNet-5 tutorial's patience rule, counted in epochs."""
        if self.patience is None:
            return False
        if (1 - val_acc) < (1 - previous_best) * self.recipe.improvement_threshold:
            self.patience = max(self.patience, int(math.ceil((epoch + 1) * self.recipe.patience_increase)))
        return epoch + 1 >= self.patience

    def fit(self) -> TrainResult:
        recipe, device = self.recipe, self.device
        train_loader = self.data.loader("train", recipe.batch_size, shuffle=True, seed=recipe.seed)
        val_loader = self.data.loader("val", 512)
        progress = _Progress(recipe.epochs, len(train_loader), self.progress)
        use_amp = recipe.amp and device.type == "cuda"
        distill = recipe.distill or {}
        alpha, temperature = float(distill.get("alpha", 0.9)), float(distill.get("temperature", 4.0))
        start = time.perf_counter()
        samples_seen = 0
        stopped_early = False
        try:
            while self.epoch < recipe.epochs:
                epoch = self.epoch
                self._binarization_for(epoch)
                lr = _set_lr(self.optimizer, recipe, epoch)
                train_loader.set_epoch(epoch)
                self.model.train()
                progress.start_epoch(epoch)
                t0 = time.perf_counter()
                skip = self.step_in_epoch
                loss_sum, correct, seen = float(self.partial["loss_sum"]), int(self.partial["correct"]), int(self.partial["seen"])
                for step, (x, y) in enumerate(train_loader):
                    if step < skip:
                        continue  # done before an interruption; the batch order is the same
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = self.model(x)
                        loss = task_loss(logits.float(), y, recipe)
                        if self.teacher is not None:
                            with torch.no_grad():
                                t_logits = self.teacher(x).float()
                            loss = (1 - alpha) * loss + alpha * distill_loss(logits.float(), t_logits, temperature)
                    if not torch.isfinite(loss):
                        kept = f"; the last good checkpoint (end of epoch {epoch}) is kept at {self.checkpoint_path}" if self.checkpoint_path and self.checkpoint_path.is_file() else ""
                        raise TrainingError(
                            f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopping{kept}. "
                            "Lower the learning rate or check the data"
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    clip_latent_weights(self.model)
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += len(y)
                    self.step_in_epoch = step + 1
                    self.partial = {"loss_sum": loss_sum, "correct": correct, "seen": seen}
                    progress.step(loss_sum / seen, correct / seen, seen / max(time.perf_counter() - t0, 1e-9))
                self.step_in_epoch = 0
                self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0}
                epoch_time = time.perf_counter() - t0
                samples_seen += seen
                val_acc, val_loss = evaluate_accuracy(self.model, val_loader, device) if len(self.data.val_y) else (0.0, 0.0)
                row = {
                    "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                    "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "epoch_time_s": epoch_time,
                    "samples_per_s": seen / epoch_time,
                }
                self.history.append(row)
                previous_best = self.best_val_acc
                if val_acc > self.best_val_acc:
                    self.best_val_acc, self.best_epoch = val_acc, epoch + 1
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                stop = self._early_stop(epoch, val_acc, max(previous_best, 0.0))
                self.epoch = epoch + 1
                self._save()
                eta = (recipe.epochs - self.epoch) * epoch_time
                progress.end_epoch(epoch, row, eta)
                for callback in self.callbacks:
                    callback(epoch + 1, row)
                if stop:
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            # Save the exact position (epoch, step, RNG states): --resume continues from here.
            if self.checkpoint_path is not None:
                self._save()
                print(
                    f"\ninterrupted: checkpoint saved at {self.checkpoint_path} (epoch {self.epoch + 1}, step {self.step_in_epoch}); "
                    "rerun with --resume to continue",
                    file=sys.stderr,
                )
            raise
        wall = time.perf_counter() - start
        return TrainResult(
            history=self.history,
            best_val_acc=max(self.best_val_acc, 0.0),
            best_epoch=self.best_epoch,
            epochs_run=self.epoch,
            stopped_early=stopped_early,
            wall_time_s=wall,
            samples_per_s=samples_seen / wall if wall > 0 else 0.0,
        )


def fit(model: nn.Module, data: DataSplits, recipe: Recipe, **kwargs: Any) -> TrainResult:
    """Train ``model`` (see ``Trainer`` for the keyword arguments)."""
    return Trainer(model, data, recipe, **kwargs).fit()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
