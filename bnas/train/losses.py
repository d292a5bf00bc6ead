"""The training losses: the task loss a recipe names, and the distillation loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .recipe import Recipe

__all__ = ["distill_loss", "task_loss"]


def task_loss(logits: Tensor, y: Tensor, recipe: Recipe) -> Tensor:
    """Cross-entropy (with the recipe's label smoothing) or BinaryNet's squared hinge."""
    if recipe.loss == "squared_hinge":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype) * 2 - 1
        return F.relu(1 - target * logits).square().mean()
    return F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's soft-target loss: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    return (
        F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
        * t
        * t
    )
