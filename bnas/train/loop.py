"""The trainer: recipes, losses, optimisers, schedules, checkpoints.

A ``Recipe`` is the whole training configuration. ``bnas eval`` takes it from the genotype's
``training:`` section and lets flags override single keys. Recipe keys (all optional):

========================  ==============================================================
``optimizer``             ``{name: adam | adamw | sgd, lr, weight_decay, betas, eps}``;
                          SGD also takes ``momentum`` (default 0.9) and ``nesterov``.
                          Default ``{name: adam, lr: 0.001}``.
``schedule``              ``{name: cosine | linear | step | exponential | constant,
                          warmup_epochs, final_lr, step_size, gamma}``. The factor is a pure
                          function of the epoch, applied at the start of each epoch (no
                          scheduler state to checkpoint). Warm-up ramps linearly over
                          ``warmup_epochs``; cosine and linear then decay to ``final_lr``
                          (default 0), exponential decays geometrically to ``final_lr``
                          (default 1e-6), step multiplies by ``gamma`` (0.1) every
                          ``step_size`` (30) epochs. Default cosine.
``epochs``, ``batch_size``  positive integers (defaults 10 and 64).
``loss``                  ``cross_entropy`` (default) or ``squared_hinge`` (BinaryNet:
                          ``mean(max(0, 1 - t * logits)^2)`` with targets t = +-1).
``label_smoothing``       for cross-entropy, in [0, 1).
``decay_binary_weights``  also apply weight decay to the latent weights of binary layers
                          (default false: decay pulls latent weights towards 0, where their
                          sign flips on noise). BatchNorm, biases, ``rsign`` thresholds and
                          every other 1-D parameter never decay.
``two_step``              epochs trained with binary activations and real weights before
                          the weights are binarized too (ReActNet's two-step schedule);
                          0 = off (default).
``distill``               ``{teacher: GENOTYPE.yaml, checkpoint: PATH, temperature: 4,
                          alpha: 0.9}``: knowledge distillation from a real-valued teacher
                          (the teacher genotype built with binarization off; trained first
                          with this recipe when no checkpoint is given). Loss =
                          (1 - alpha) * task loss + alpha * T^2 * KL(teacher_T || student_T).
``patience``              early stopping on validation accuracy, the rule of the classic
                          LeNet-5 tutorial (deeplearning.net), counted in epochs: stop after
                          epoch e when e >= patience; an epoch whose validation error is
                          below ``improvement_threshold`` (0.995) x the best error so far
                          raises patience to ``max(patience, e * patience_increase)`` (2).
                          null = off (default).
``seed``                  seeds Python, NumPy and torch; CPU runs repeat bit for bit.
``amp``                   bfloat16 autocast on CUDA (default true; ignored on CPU).
``val_fraction``          the share of the training set held out for validation (0.1).
========================  ==============================================================

BinaryNet's per-layer learning-rate scale ("glorot") and latent clipping come from each
layer's ``BinarizeConfig``; dropout comes from the genotype. Latent weights are clipped after
every optimiser step.
"""
from __future__ import annotations

import copy
import ctypes
import logging
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import WriteError, atomic_path
from .binarize import binary_layers, clip_latent_weights, set_binarization
from .data import DataSplits, TensorLoader
from .errors import BnasError

__all__ = [
    "Recipe",
    "TrainingError",
    "TrainResult",
    "Trainer",
    "fit",
    "evaluate_accuracy",
    "save_checkpoint",
    "load_checkpoint",
    "make_optimizer",
    "task_loss",
    "distill_loss",
    "lr_factor",
    "seed_everything",
    "tune_cpu_allocator",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "step", "exponential", "constant")
LOSSES = ("cross_entropy", "squared_hinge")
_OPTIMIZER_KEYS = {"name", "lr", "weight_decay", "betas", "eps", "momentum", "nesterov"}
_SCHEDULE_KEYS = {"name", "warmup_epochs", "final_lr", "step_size", "gamma"}
_DISTILL_KEYS = {"teacher", "checkpoint", "temperature", "alpha"}
# Keys that may change when a run is resumed (to extend it); any other change is an error.
_RESUMABLE_CHANGES = {"epochs", "patience"}
CHECKPOINT_FORMAT = 1
# Entries every trainer checkpoint has (``Trainer.state``); a file without them cannot resume.
_STATE_KEYS = ("model", "optimizer", "epoch", "history", "best_val_acc", "best_epoch", "patience", "best_state", "rng")
_RESUME_ADVICE = "delete it (or choose another --out) and run without --resume to start again"

logger = logging.getLogger(__name__)


class TrainingError(BnasError):
    """Training cannot go on (a bad recipe, a diverged loss, a missing checkpoint)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Recipe:
    """The training configuration (see the module doc for every key)."""

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
        """A validated recipe; errors name the key as ``where.key``."""
        if data is not None and not isinstance(data, Mapping):
            raise TrainingError(f"{where}: expected a mapping of recipe keys, got {type(data).__name__}")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"{where}: unknown recipe key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        recipe = cls(**{k: copy.deepcopy(v) for k, v in data.items()})
        recipe.validate(where)
        return recipe

    def merged(self, overrides: Mapping[str, Any], where: str = "flags") -> "Recipe":
        """A copy with ``overrides`` applied; ``optimizer.lr`` style keys reach into mappings,
        and None values are skipped (a flag that was not given)."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if "." in key:
                outer, inner = key.split(".", 1)
                data[outer] = {**(data.get(outer) or {}), inner: value}
            else:
                data[key] = value
        return Recipe.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @property
    def lr(self) -> float:
        return float(self.optimizer.get("lr", 1e-3))

    def validate(self, where: str) -> None:
        def bad(key: str, expected: str, got: Any) -> TrainingError:
            return TrainingError(f"{where}.{key}: expected {expected}, got {got!r}")

        def check_keys(key: str, value: Mapping[str, Any], allowed: set[str]) -> None:
            extra = sorted(set(value) - allowed)
            if extra:
                raise TrainingError(f"{where}.{key}: unknown key(s) {', '.join(extra)}; expected some of {', '.join(sorted(allowed))}")

        opt = self.optimizer
        if not isinstance(opt, dict):
            raise bad("optimizer", f"a mapping {{name: {'|'.join(OPTIMIZERS)}, lr: ...}}", opt)
        check_keys("optimizer", opt, _OPTIMIZER_KEYS)
        if opt.get("name", "adam") not in OPTIMIZERS:
            raise bad("optimizer.name", " or ".join(OPTIMIZERS), opt.get("name"))
        if not _is_number(opt.get("lr", 1e-3)) or opt.get("lr", 1e-3) <= 0:
            raise bad("optimizer.lr", "a positive number", opt.get("lr"))
        if not _is_number(opt.get("weight_decay", 0.0)) or opt.get("weight_decay", 0.0) < 0:
            raise bad("optimizer.weight_decay", "a number >= 0", opt.get("weight_decay"))
        if not _is_number(opt.get("momentum", 0.9)) or not 0 <= opt.get("momentum", 0.9) < 1:
            raise bad("optimizer.momentum", "a number in [0, 1)", opt.get("momentum"))
        if not isinstance(opt.get("nesterov", False), bool):
            raise bad("optimizer.nesterov", "true or false", opt.get("nesterov"))
        betas = opt.get("betas", [0.9, 0.999])
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise bad("optimizer.betas", "two numbers in [0, 1)", betas)
        if not _is_number(opt.get("eps", 1e-8)) or opt.get("eps", 1e-8) <= 0:
            raise bad("optimizer.eps", "a positive number", opt.get("eps"))

        sched = self.schedule
        if not isinstance(sched, dict):
            raise bad("schedule", f"a mapping {{name: {'|'.join(SCHEDULES)}}}", sched)
        check_keys("schedule", sched, _SCHEDULE_KEYS)
        if sched.get("name", "cosine") not in SCHEDULES:
            raise bad("schedule.name", " or ".join(SCHEDULES), sched.get("name"))
        if not _is_int(sched.get("warmup_epochs", 0)) or sched.get("warmup_epochs", 0) < 0:
            raise bad("schedule.warmup_epochs", "an integer >= 0", sched.get("warmup_epochs"))
        if not _is_int(sched.get("step_size", 30)) or sched.get("step_size", 30) <= 0:
            raise bad("schedule.step_size", "a positive integer", sched.get("step_size"))
        if not _is_number(sched.get("gamma", 0.1)) or sched.get("gamma", 0.1) <= 0:
            raise bad("schedule.gamma", "a positive number", sched.get("gamma"))
        if "final_lr" in sched and (not _is_number(sched["final_lr"]) or sched["final_lr"] < 0):
            raise bad("schedule.final_lr", "a number >= 0", sched["final_lr"])
        if sched.get("name") == "exponential" and sched.get("final_lr", 1e-6) <= 0:
            raise bad("schedule.final_lr", "a positive number for the exponential schedule", sched.get("final_lr"))

        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise bad(key, "a positive integer", value)
        if self.loss not in LOSSES:
            raise bad("loss", " or ".join(LOSSES), self.loss)
        if not _is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a number in [0, 1)", self.label_smoothing)
        if self.label_smoothing and self.loss != "cross_entropy":
            raise bad("label_smoothing", "0 with the squared_hinge loss (it applies to cross_entropy)", self.label_smoothing)
        if not isinstance(self.decay_binary_weights, bool):
            raise bad("decay_binary_weights", "true or false", self.decay_binary_weights)
        if not _is_int(self.two_step) or self.two_step < 0:
            raise bad("two_step", "an integer >= 0 (epochs before the weights are binarized)", self.two_step)
        if self.distill is not None:
            if not isinstance(self.distill, dict):
                raise bad("distill", "{teacher: GENOTYPE.yaml, checkpoint: PATH, temperature: T, alpha: A}", self.distill)
            check_keys("distill", self.distill, _DISTILL_KEYS)
            if not isinstance(self.distill.get("teacher"), str) or not self.distill["teacher"]:
                raise bad("distill.teacher", "the path of a teacher genotype YAML", self.distill.get("teacher"))
            if "checkpoint" in self.distill and not isinstance(self.distill["checkpoint"], str):
                raise bad("distill.checkpoint", "the path of the teacher's checkpoint", self.distill["checkpoint"])
            if not _is_number(self.distill.get("temperature", 4.0)) or self.distill.get("temperature", 4.0) <= 0:
                raise bad("distill.temperature", "a positive number", self.distill.get("temperature"))
            if not _is_number(self.distill.get("alpha", 0.9)) or not 0 <= self.distill.get("alpha", 0.9) <= 1:
                raise bad("distill.alpha", "a number in [0, 1]", self.distill.get("alpha"))
        if self.patience is not None and (not _is_int(self.patience) or self.patience <= 0):
            raise bad("patience", "a positive integer or null", self.patience)
        if not _is_number(self.patience_increase) or self.patience_increase < 1:
            raise bad("patience_increase", "a number >= 1", self.patience_increase)
        if not _is_number(self.improvement_threshold) or not 0 < self.improvement_threshold <= 1:
            raise bad("improvement_threshold", "a number in (0, 1]", self.improvement_threshold)
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0", self.seed)
        if not isinstance(self.amp, bool):
            raise bad("amp", "true or false", self.amp)
        if not _is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "a number in [0, 1)", self.val_fraction)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    wall_time_s: float          # training and validation time of all sessions of the run
    samples_per_s: float        # training samples per second of training time


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------
def _binarized_weight_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Binary layers whose weight is a latent binary weight, by ``id`` of the weight.

    The full-precision twin (``bnas.build(..., binarize=False)``) has every quantizer
    switched off: its weights are ordinary real weights (decayed, no learning-rate scale).
    Under the two-step schedule the weights are latent binary weights from the start.
    """
    return {
        id(layer.weight): layer
        for layer in binary_layers(model)
        if layer.kernel_quantizer.name != "none" and (layer.kernel_quantizer.enabled or layer.input_quantizer.enabled)
    }


def _param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Weight decay only where it belongs; BinaryNet's per-layer learning-rate scale kept."""
    wd = float(recipe.optimizer.get("weight_decay", 0.0))
    latent = _binarized_weight_layers(model)
    groups: dict[tuple[float, float], list[Tensor]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        layer = latent.get(id(p))
        scale = float(layer.lr_scale) if layer is not None else 1.0
        decays = p.dim() > 1 and (layer is None or recipe.decay_binary_weights)
        groups.setdefault((scale, wd if decays else 0.0), []).append(p)
    return [
        {"params": params, "lr": recipe.lr * scale, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), params in groups.items()
    ]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    opt = recipe.optimizer
    groups = _param_groups(model, recipe)
    name = opt.get("name", "adam")
    devices = {p.device.type for g in groups for p in g["params"]}
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        # The fused kernel does Adam's element-wise update in one pass per tensor: on CPU it
        # roughly halves the optimiser's share of a step for large binary MLPs.
        fused = bool(devices) and devices <= {"cpu", "cuda"}
        return cls(groups, lr=recipe.lr, betas=tuple(opt.get("betas", (0.9, 0.999))), eps=float(opt.get("eps", 1e-8)), fused=fused)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=float(opt.get("momentum", 0.9)), nesterov=bool(opt.get("nesterov", False)))


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """The learning-rate multiplier for ``epoch`` (0-based): warm-up, then the schedule."""
    sched = recipe.schedule
    name = sched.get("name", "cosine")
    warmup = int(sched.get("warmup_epochs", 0))
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    t = (epoch - warmup) / max(1, recipe.epochs - warmup)
    if name in ("cosine", "linear"):
        floor = float(sched.get("final_lr", 0.0)) / recipe.lr
        shape = 0.5 * (1 + math.cos(math.pi * t)) if name == "cosine" else max(0.0, 1 - t)
        return floor + (1 - floor) * shape
    if name == "step":
        return float(sched.get("gamma", 0.1)) ** ((epoch - warmup) // int(sched.get("step_size", 30)))
    if name == "exponential":
        return (float(sched.get("final_lr", 1e-6)) / recipe.lr) ** t
    return 1.0


def _set_lr(optimizer: torch.optim.Optimizer, recipe: Recipe, epoch: int) -> float:
    base = recipe.lr * lr_factor(recipe, epoch)
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_scale", 1.0)
    return base


def task_loss(logits: Tensor, y: Tensor, recipe: Recipe) -> Tensor:
    if recipe.loss == "squared_hinge":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype) * 2 - 1
        return F.relu(1 - target * logits).square().mean()
    return F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's soft-target loss: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


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


# --------------------------------------------------------------------------------------
# CPU allocator
# --------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_ALLOCATOR_TUNED: bool | None = None


def tune_cpu_allocator(enable: bool = True) -> bool:
    """Let glibc reuse freed memory for large tensors instead of mapping fresh pages.

    glibc serves every allocation above 32 MiB with a fresh ``mmap``, and each of its pages
    faults on first touch. A binary layer materialises ``sign(W)`` (as large as its weight)
    every step, so for the 4096-wide BinaryNet MLP these faults cost more than the sign
    itself: the binary/float step-time ratio drops from about 1.4-1.7 to about 1.2-1.25 with
    this (``benchmarks/train_step.py`` measures both), and float steps get faster too.
    It sets ``M_MMAP_MAX = 0`` and a high ``M_TRIM_THRESHOLD``: process-wide, so the process
    keeps its peak heap instead of returning it to the OS. Linux with glibc only; a no-op
    elsewhere or when ``$BNAS_MALLOC_TUNE`` is ``0``. ``enable=False`` restores glibc's
    defaults. Returns whether the tuning is in effect.
    """
    global _ALLOCATOR_TUNED
    if enable and (_ALLOCATOR_TUNED or os.environ.get("BNAS_MALLOC_TUNE", "1") == "0"):
        return bool(_ALLOCATOR_TUNED)
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt knobs)
    except (OSError, AttributeError):
        return False
    if enable:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    else:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok


# --------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads
# --------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain types (``weights_only`` loads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` via a temp file + rename: a crash or a full disk never leaves half a
    checkpoint, and the previous one stays intact (a failure is a ``WriteError``)."""
    with atomic_path(path, "checkpoint") as tmp:
        torch.save(dict(payload), tmp)


def load_checkpoint(path: str | os.PathLike[str], advice: str = "delete it or pass another file") -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint`` (or any ``weights_only``-safe file).

    Every way the file can be bad (missing, empty, truncated, foreign bytes, pickled code,
    not a mapping) is one ``TrainingError`` naming the file and ending with ``advice``. Torch's
    own text is never repeated: for a file with pickled objects it suggests
    ``weights_only=False``, which would run whatever code a hostile file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}")
    try:
        with path.open("rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror or type(exc).__name__}; {advice}") from None
    if size == 0:
        raise TrainingError(f"{path} is empty (0 bytes): its write was cut short; {advice}")
    try:
        # weights_only: tensors and plain values only, never code from the file. Torch's
        # warnings about a foreign file's pickle protocol would only precede our error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the file is readable, so any failure is its content's
        is_zip, is_pickle = head == b"PK\x03\x04", head[:1] == b"\x80"  # torch.save's formats, new and legacy
        if isinstance(exc, pickle.UnpicklingError) and (is_zip or is_pickle):
            what = "not a bnas checkpoint: it holds Python objects other than tensors and plain values, which bnas never loads"
        elif is_zip:
            what = "truncated or damaged (an incomplete PyTorch file)"
        else:
            what = "not a PyTorch checkpoint (foreign or random bytes)"
        raise TrainingError(f"{path} ({size} bytes) is {what}; {advice}") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path} holds a {type(state).__name__}, not a bnas checkpoint (a mapping); {advice}")
    return state


def _state_mismatch(model: nn.Module, saved: Any) -> str | None:
    """The first difference between ``model``'s tensors and the checkpoint's ``saved`` ones."""
    if not isinstance(saved, Mapping):
        return f"its 'model' entry is a {type(saved).__name__}, not a state_dict"
    mine = model.state_dict()
    for key, tensor in mine.items():
        if key not in saved:
            return f"this network's tensor {key} {list(tensor.shape)} is missing from the checkpoint"
        other = saved[key]
        if not isinstance(other, Tensor):
            return f"its {key} is a {type(other).__name__}, not a tensor"
        if other.shape != tensor.shape:
            return f"tensor {key} has shape {list(other.shape)} in the checkpoint but {list(tensor.shape)} in this network"
    extra = [key for key in saved if key not in mine]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"the checkpoint has tensor {extra[0]}{more}, which this network does not"
    return None


def _write_reason(exc: BaseException) -> str:
    """Why a write failed, in words (torch's stream errors say "unexpected pos 704 vs 598")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return "the file could not be written in full; the disk may be full"


# --------------------------------------------------------------------------------------
# Progress and interruption
# --------------------------------------------------------------------------------------
EpochCallback = Callable[[int, dict[str, float]], None]


class _Progress:
    """A tqdm bar per epoch on a terminal; plain log lines otherwise (one per epoch, and
    one a minute inside long epochs)."""

    LOG_EVERY_S = 60.0

    def __init__(self, total_epochs: int, steps: int, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.steps = steps
        self.total_epochs = total_epochs
        self.bar: Any = None
        self.last_log = 0.0

    def start_epoch(self, epoch: int, done_steps: int) -> None:
        self.last_log = time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, initial=done_steps, desc=f"epoch {epoch + 1}/{self.total_epochs}",
                            leave=False, file=sys.stderr, unit="step", dynamic_ncols=True)

    def step(self, epoch: int, step: int, loss: float, acc: float, rate: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, acc {acc:.3f}, {rate:.0f} samples/s, run ETA {_duration(eta_s)}", refresh=False)
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last_log >= self.LOG_EVERY_S:
            self.last_log = time.perf_counter()
            print(f"epoch {epoch + 1}/{self.total_epochs}  step {step}/{self.steps}  loss {loss:.4f}  acc {acc:.4f}  "
                  f"{rate:.0f} samples/s  ETA {_duration(eta_s)}", file=sys.stderr, flush=True)

    def end_epoch(self, epoch: int, row: Mapping[str, float], eta_s: float) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(
                f"epoch {epoch + 1}/{self.total_epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"val acc {row['val_acc']:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:.0f} samples/s  "
                f"{row['epoch_time_s']:.1f} s  ETA {_duration(eta_s)}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _InterruptGuard:
    """Turns the first Ctrl-C into a request that the loop honours between two steps, so the
    checkpoint it writes is a consistent state (never half an optimiser step). A second
    Ctrl-C interrupts at once. Only the main thread can own signal handlers; elsewhere the
    guard does nothing and a KeyboardInterrupt arrives wherever it arrives."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
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
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def state(self) -> dict[str, Any]:
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
            "rng": _rng_state(),
            "recipe": self.recipe.to_dict(),
            "dataset": self.data.name,
            "step_in_epoch": self.step_in_epoch,
            "partial": dict(self.partial),
        }

    def load_state(self, state: Mapping[str, Any], where: str = "checkpoint", advice: str = _RESUME_ADVICE) -> None:
        if not isinstance(state, Mapping):
            raise TrainingError(f"{where} holds a {type(state).__name__}, not a bnas training checkpoint; {advice}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise TrainingError(f"{where} is not a bnas training checkpoint (no {', '.join(missing)} entries; "
                                f"a bare model.pt or another program's file?); {advice}")
        if state.get("dataset", self.data.name) != self.data.name:
            raise TrainingError(f"{where} was trained on {state['dataset']!r}, not {self.data.name!r}; pass --dataset {state['dataset']}")
        saved = state.get("recipe")
        if saved is not None:
            mine = self.recipe.to_dict()
            changed = sorted(k for k in set(saved) | set(mine) if k not in _RESUMABLE_CHANGES and saved.get(k) != mine.get(k))
            if changed:
                details = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine.get(k)!r} now" for k in changed)
                raise TrainingError(f"{where}: the recipe differs from the one the run started with ({details}); "
                                    "only epochs and patience may change when resuming")
        mismatch = _state_mismatch(self.model, state["model"])
        if mismatch is not None:
            raise TrainingError(f"{where} does not fit this network: {mismatch}; it was trained from another genotype "
                                "or width: resume with that genotype, or choose another --out")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(f"{where}: the optimizer state does not fit this network and recipe ({first}); {advice}") from None
        try:
            self._restore_progress(state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise TrainingError(f"{where}: its training position is damaged ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); {advice}") from None
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
        _set_rng_state(state["rng"])

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if there is one; True when resumed."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        self.load_state(load_checkpoint(path, _RESUME_ADVICE), str(path))
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
                kept = (f"the last good checkpoint ({at}) is intact: free some space, then rerun the same "
                        "command with --resume to continue from it")
            else:
                kept = "no checkpoint was saved yet: free some space (or choose another --out) and start again"
            raise TrainingError(f"cannot write the checkpoint {path} ({_write_reason(exc.__cause__ or exc)}); {kept}") from exc
        self.saved_position = (self.epoch, self.step_in_epoch)

    def _binarization_for(self, epoch: int) -> None:
        if self.recipe.two_step:
            set_binarization(self.model, activations=True, weights=epoch >= self.recipe.two_step)

    def _early_stop(self, epoch: int, val_acc: float, previous_best: float) -> bool:
        """The LeNet-5 tutorial's patience rule, counted in epochs (see the module doc)."""
        if self.patience is None:
            return False
        if (1 - val_acc) < (1 - previous_best) * self.recipe.improvement_threshold:
            self.patience = max(self.patience, int(math.ceil((epoch + 1) * self.recipe.patience_increase)))
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
        recipe, device = self.recipe, self.device
        if device.type == "cpu" and self.tune_allocator:
            tune_cpu_allocator()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        train_loader = self.data.loader("train", recipe.batch_size, shuffle=True, seed=recipe.seed, device=device)
        val_loader = self.data.loader("val", 512, device=device)
        progress = _Progress(recipe.epochs, len(train_loader), self.progress)
        use_amp = recipe.amp and device.type == "cuda"
        distill = recipe.distill or {}
        alpha, temperature = float(distill.get("alpha", 0.9)), float(distill.get("temperature", 4.0))
        stopped_early = False
        guard = _InterruptGuard()
        try:
            with guard:
                while self.epoch < recipe.epochs:
                    stop = self._run_epoch(train_loader, val_loader, progress, guard, use_amp, alpha, temperature)
                    guard.check()
                    if stop:
                        stopped_early = True
                        break
        except KeyboardInterrupt:
            progress.close()
            # Save the exact position (epoch, step, RNG states): --resume continues from here.
            # The caller (the CLI) says "interrupted"; this only says what was kept.
            if self.checkpoint_path is not None:
                self._save()
                logger.warning("checkpoint saved at %s (epoch %d, step %d); rerun with --resume to continue",
                               self.checkpoint_path, self.epoch + 1, self.step_in_epoch)
            raise
        finally:
            progress.close()
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
        progress: _Progress,
        guard: _InterruptGuard,
        use_amp: bool,
        alpha: float,
        temperature: float,
    ) -> bool:
        """One epoch (or the rest of an interrupted one) and its validation; True = stop."""
        recipe, device, epoch = self.recipe, self.device, self.epoch
        self._binarization_for(epoch)
        lr = _set_lr(self.optimizer, recipe, epoch)
        train_loader.set_epoch(epoch)
        self.model.train()
        skip = self.step_in_epoch
        progress.start_epoch(epoch, skip)
        loss_sum, correct, seen = float(self.partial["loss_sum"]), int(self.partial["correct"]), int(self.partial["seen"])
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
            "epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "epoch_time_s": epoch_time,
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
