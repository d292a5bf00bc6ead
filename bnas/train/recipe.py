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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import GenotypeError, LocatedError
from ..schemas import validate as validate_schema
from ..schemas.recipe import LOSSES, OPTIMIZERS, SCHEDULES

__all__ = ["LOSSES", "OPTIMIZERS", "RESUMABLE_CHANGES", "SCHEDULES", "Recipe", "TrainingError", "recipe_changes"]

# Keys that may change when a run is resumed (to extend it); any other change is an error.
RESUMABLE_CHANGES = frozenset({"epochs", "patience"})


def recipe_changes(saved: Mapping[str, Any] | None, recipe: Recipe) -> list[str]:
    """The keys, sorted, in which ``recipe`` differs from a checkpoint's ``saved`` recipe
    dict beyond ``RESUMABLE_CHANGES`` (none when the checkpoint kept no recipe)."""
    if saved is None:
        return []
    mine = recipe.to_dict()
    return sorted(k for k in set(saved) | set(mine) if k not in RESUMABLE_CHANGES and saved.get(k) != mine.get(k))


class TrainingError(LocatedError):
    """Training cannot go on (a bad recipe, a diverged loss, a missing checkpoint); a recipe
    error carries the dotted key in ``.path``."""


def _check(data: Any, where: str) -> None:
    """The recipe schema (``bnas.schemas.recipe``) checks ``data``; its error becomes a
    ``TrainingError`` at ``where.key``."""
    try:
        validate_schema("recipe", dict(data) if isinstance(data, Mapping) else data, None, where)
    except GenotypeError as exc:
        raise TrainingError(exc.message, exc.path) from exc


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
        _check(data, where)
        # Built from the values as written (the schema's model would turn ``lr: 1`` into 1.0).
        return cls(**{k: copy.deepcopy(v) for k, v in (data or {}).items()})

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
        """Check this recipe against the schema; a ``TrainingError`` names ``where.key``."""
        _check(self.to_dict(), where)
