"""Training: a ``Recipe`` (the whole configuration) drives a ``Trainer`` over a network.

One job per module:

==================  ======================================================================
``recipe``          ``Recipe``, its keys and defaults (the module doc lists them all), its
                    validation, and ``TrainingError``
``optimiser``       parameter groups (weight decay, per-layer learning-rate scale),
                    ``make_optimizer`` and the learning-rate schedule
``losses``          the task loss (cross-entropy, squared hinge) and the distillation loss
``checkpoint``      atomic saves, safe loads, RNG states, whether a checkpoint can resume
``console``         the progress bar / log lines and the Ctrl-C guard
``allocator``       glibc ``mallopt`` tuning for CPU training
``loop``            ``Trainer``, ``fit``, ``evaluate_accuracy``, ``seed_everything``
==================  ======================================================================

Every name is importable from ``bnas.train`` as before the split.
"""

from __future__ import annotations

from .allocator import tune_cpu_allocator
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, state_mismatch
from .loop import EpochCallback, Trainer, TrainResult, evaluate_accuracy, fit, seed_everything
from .losses import distill_loss, task_loss
from .optimiser import lr_factor, make_optimizer, param_groups
from .recipe import LOSSES, OPTIMIZERS, SCHEDULES, Recipe, TrainingError

# The private names ``bnas.evaluate`` and the tests imported before the split.
_param_groups = param_groups
_state_mismatch = state_mismatch

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochCallback",
    "Recipe",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "distill_loss",
    "evaluate_accuracy",
    "fit",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
    "state_mismatch",
    "task_loss",
    "tune_cpu_allocator",
]
