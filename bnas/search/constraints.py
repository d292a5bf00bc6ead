"""Constraints (``constraints:`` of a search space): which bounds a genotype breaks, checked
before any training, and when a space is judged to have no genotype that meets them."""

from __future__ import annotations

import optuna

from .config import SearchConfig
from .space import CONSTRAINTS, FLOORS

__all__ = ["UNSATISFIABLE_AFTER", "breaks", "unsatisfiable", "violations"]

# Constraint checks cost no training, so a space whose sampled genotypes all break the
# constraints is given this many draws before the search says none meets them.
UNSATISFIABLE_AFTER = 25


def breaks(key: str, value: float, bound: float) -> bool:
    """Whether ``value`` of the metric that constraint ``key`` bounds is past ``bound``."""
    return value < bound if key in FLOORS else value > bound


def violations(metrics: dict[str, float], constraints: dict[str, float]) -> list[str]:
    """One phrase per broken bound, such as ``"1.2e+05 ops > max_ops 1e+05"`` or
    ``"3e+04 ops < min_ops 5e+04"``."""
    return [
        f"{metrics[m]:.4g} {m} {'<' if key in FLOORS else '>'} {key} {constraints[key]:.4g}"
        for key, m in CONSTRAINTS.items()
        if key in constraints and breaks(key, metrics[m], constraints[key])
    ]


def unsatisfiable(study: optuna.Study, cfg: SearchConfig) -> str | None:
    """Why to stop, once every sampled genotype has broken the constraints many times over:
    the study would otherwise end with zero trained trials and nothing to report. (A space
    without bounds gets here too when every draw has a constant output.)"""
    trials = study.get_trials(deepcopy=False)
    over = [t for t in trials if "constraint" in t.user_attrs]
    met = [t for t in trials if "ops" in t.user_attrs and "constraint" not in t.user_attrs]
    if not over or met or len(over) < min(UNSATISFIABLE_AFTER, cfg.trials):
        return None
    # Only the draws that broke that bound: a genotype rejected for its constant output alone
    # may be well within it. The sampled value nearest the bound says how far off it is.
    nearest: dict[str, float] = {}
    for key, m in CONSTRAINTS.items():
        if key in cfg.space.constraints:
            bound = cfg.space.constraints[key]
            values = [t.user_attrs[m] for t in over if m in t.user_attrs and breaks(key, t.user_attrs[m], bound)]
            if values:
                nearest[key] = max(values) if key in FLOORS else min(values)
    bounds = ", ".join(
        f"{key} {cfg.space.constraints[key]:.4g} ({'largest' if key in FLOORS else 'smallest'} sampled: {value:.4g})"
        for key, value in nearest.items()
    )
    constant = sum("constant output" in t.user_attrs["constraint"] for t in over)
    fixes = []
    if any(key not in FLOORS for key in nearest):
        fixes.append("loosen `constraints:` or offer smaller choices (channels, cells, ops)")
    if any(key in FLOORS for key in nearest):
        fixes.append("lower min_ops or offer larger choices (channels, cells, ops)")
    if constant:
        bounds = "; ".join(filter(None, [bounds, f"{constant} with a constant output (cut off by zero ops)"]))
        fixes.append("offer ops other than zero (or fewer zero choices) on the cell edges")
    advice = " or ".join(fixes)
    return (
        f"none of the {len(over)} sampled genotypes meets the constraints of {cfg.space.source or cfg.space.name}: "
        f"{bounds}; nothing was trained. {advice[:1].upper()}{advice[1:]}, "
        "then search again with another --out or --study"
    )
