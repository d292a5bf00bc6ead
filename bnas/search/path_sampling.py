"""Which paths a supernet trains (``bnas supernet --paths``).

- ``all``: every choice of the space drawn uniformly and independently for every batch
  (single-path uniform sampling, as SPOS trains).
- ``feasible``: the same draws, redrawn until the path meets the space's cost constraints
  (``max_ops``, ``max_size_bytes``, ``max_params``). A search only ever scores paths inside
  those bounds, so the shared weights are trained for them alone; over-budget paths also
  take longer per step. The path's cost is counted on the supernet's own modules (its
  ``summarize``: one batch-1 forward, some 20 ms on ``fashion_mnist_cells``), with the same
  numbers ``bnas search`` checks. A latency bound (``max_latency_ms``) is not applied while
  training: timing a packed network per draw would cost more than the step itself.

Draws come from the caller's ``random.Random`` only, so a run repeats (and resumes) exactly.
"""

from __future__ import annotations

import random

from .constraints import violations
from .objective import cost_metrics
from .supernet import Choices, Supernet, SupernetError

__all__ = ["COST_BOUNDS", "PATHS", "PathSampler"]

PATHS = ("all", "feasible")
# The constraints a path's cost count decides (``max_latency_ms`` needs a timing).
COST_BOUNDS = ("max_ops", "max_size_bytes", "max_params")


class PathSampler:
    """Draws the choices of the path each supernet step trains (module doc).

    ``max_draws`` bounds the redraws of one ``feasible`` path; a space where that many draws
    in a row all break the constraints is refused (train all paths, or loosen the bounds).
    """

    def __init__(self, supernet: Supernet, mode: str = "all", max_draws: int = 1000):
        if mode not in PATHS:
            raise SupernetError(f"paths must be one of {', '.join(PATHS)}, got {mode!r}")
        if max_draws < 1:
            raise SupernetError(f"max_draws must be at least 1, got {max_draws}")
        self.supernet = supernet
        self.mode = mode
        self.max_draws = max_draws
        self.bounds = {k: float(v) for k, v in supernet.space.constraints.items() if k in COST_BOUNDS}
        self.draws = 0  # every path drawn, kept or not: with ``kept``, the share of paths rejected
        self.kept = 0

    def metrics(self, choices: Choices) -> dict[str, float]:
        """The cost of the path ``choices`` (the ``bnas search`` metrics the bounds name)."""
        genotype = self.supernet.genotype(choices)
        return cost_metrics(self.supernet.network(genotype), genotype.input)

    def feasible(self, choices: Choices) -> bool:
        return not self.bounds or not violations(self.metrics(choices), self.bounds)

    def __call__(self, rng: random.Random) -> Choices:
        if self.mode == "all" or not self.bounds:
            self.draws += 1
            self.kept += 1
            return self.supernet.sample_choices(rng)
        for _ in range(self.max_draws):
            choices = self.supernet.sample_choices(rng)
            self.draws += 1
            if self.feasible(choices):
                self.kept += 1
                return choices
        space = self.supernet.space
        bounds = ", ".join(f"{k} {v:.4g}" for k, v in self.bounds.items())
        raise SupernetError(
            f"none of {self.max_draws} paths drawn in a row from {space.source or space.name} meets its constraints "
            f"({bounds}); loosen `constraints:` or train every path with --paths all"
        )
