"""The training recipe: its keys, their defaults and their validation.

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
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import LocatedError

__all__ = ["LOSSES", "OPTIMIZERS", "RESUMABLE_CHANGES", "SCHEDULES", "Recipe", "TrainingError"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "step", "exponential", "constant")
LOSSES = ("cross_entropy", "squared_hinge")
_OPTIMIZER_KEYS = {"name", "lr", "weight_decay", "betas", "eps", "momentum", "nesterov"}
_SCHEDULE_KEYS = {"name", "warmup_epochs", "final_lr", "step_size", "gamma"}
_DISTILL_KEYS = {"teacher", "checkpoint", "temperature", "alpha"}
# Keys that may change when a run is resumed (to extend it); any other change is an error.
RESUMABLE_CHANGES = frozenset({"epochs", "patience"})


class TrainingError(LocatedError):
    """Training cannot go on (a bad recipe, a diverged loss, a missing checkpoint); a recipe
    error carries the dotted key in ``.path``."""


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
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "training") -> Recipe:
        """A validated recipe; errors name the key as ``where.key``."""
        if data is not None and not isinstance(data, Mapping):
            raise TrainingError(f"expected a mapping of recipe keys, got {type(data).__name__}", where)
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"unknown recipe key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}", where)
        recipe = cls(**{k: copy.deepcopy(v) for k, v in data.items()})
        recipe.validate(where)
        return recipe

    def merged(self, overrides: Mapping[str, Any], where: str = "flags") -> Recipe:
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
            return TrainingError(f"expected {expected}, got {got!r}", f"{where}.{key}")

        def check_keys(key: str, value: Mapping[str, Any], allowed: set[str]) -> None:
            extra = sorted(set(value) - allowed)
            if extra:
                raise TrainingError(f"unknown key(s) {', '.join(extra)}; expected some of {', '.join(sorted(allowed))}", f"{where}.{key}")

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
