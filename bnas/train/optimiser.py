"""The optimiser and its learning rate: parameter groups, ``make_optimizer``, the schedule.

Weight decay reaches only the parameters it should (never BatchNorm, biases, ``rsign``
thresholds, learned weight scales or, by default, latent binary weights), and each binary
layer's learning-rate scale (BinaryNet's "glorot") rides along as ``lr_scale`` in its parameter
group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..binarize import BinaryConv2d, BinaryLinear, binary_layers
from .recipe import Recipe

__all__ = ["lr_factor", "make_optimizer", "param_groups", "set_lr"]


def _binarized_weight_layers(model: nn.Module) -> dict[int, BinaryConv2d | BinaryLinear]:
    """Binary layers whose weight is a latent binary weight (``has_latent_weights``), by
    ``id`` of the weight; the full-precision twin's weights are ordinary real weights."""
    return {id(layer.weight): layer for layer in binary_layers(model) if layer.has_latent_weights}


def _learned_scales(model: nn.Module) -> set[int]:
    """``id`` of every learned weight scale (``BinarizeConfig.learned_scale``): shaped
    (C_out, 1, 1, 1) to broadcast, but a per-channel scale like a BN gamma, so never decayed."""
    return {id(s) for layer in binary_layers(model) if (s := layer.kernel_quantizer.learned_scale) is not None}


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Weight decay only where it belongs; BinaryNet's per-layer learning-rate scale kept."""
    wd = float(recipe.optimizer.get("weight_decay", 0.0))
    latent = _binarized_weight_layers(model)
    scales = _learned_scales(model)
    groups: dict[tuple[float, float], list[Tensor]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        layer = latent.get(id(p))
        scale = float(layer.lr_scale) if layer is not None else 1.0
        decays = p.dim() > 1 and id(p) not in scales and (layer is None or recipe.decay_binary_weights)
        groups.setdefault((scale, wd if decays else 0.0), []).append(p)
    return [
        {"params": params, "lr": recipe.lr * scale, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), params in groups.items()
    ]


def make_optimizer(model: nn.Module, recipe: Recipe, *, allow_fused: bool = True) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over ``param_groups``, as ``recipe.optimizer`` names.

    ``allow_fused=False`` keeps Adam off its fused kernel, which treats every parameter as
    one contiguous run of memory: a parameter that is a strided view (a supernet's narrower
    width, sliced out of the widest tensor) would have the wrong elements updated."""
    opt = recipe.optimizer
    groups = param_groups(model, recipe)
    name = opt.get("name", "adam")
    devices = {p.device.type for g in groups for p in g["params"]}
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        # The fused kernel does Adam's element-wise update in one pass per tensor: on CPU it
        # roughly halves the optimiser's share of a step for large binary MLPs.
        fused = allow_fused and bool(devices) and devices <= {"cpu", "cuda"}
        return cls(
            groups,
            lr=recipe.lr,
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=float(opt.get("eps", 1e-8)),
            fused=fused,
        )
    return torch.optim.SGD(
        groups, lr=recipe.lr, momentum=float(opt.get("momentum", 0.9)), nesterov=bool(opt.get("nesterov", False))
    )


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


def set_lr(optimizer: torch.optim.Optimizer, recipe: Recipe, epoch: int) -> float:
    """Set every group's learning rate for ``epoch``; returns the base (unscaled) rate."""
    base = recipe.lr * lr_factor(recipe, epoch)
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_scale", 1.0)
    return base
