"""Which paths a supernet trains (``bnas supernet --paths``).

- ``all``: every choice of the space drawn uniformly and independently for every batch
  (single-path uniform sampling, as SPOS trains).
- ``feasible``: the same draws, redrawn until the path meets the space's cost constraints
  (``max_ops``, ``min_ops``, ``max_size_bytes``, ``max_params``). A search only ever scores paths inside
  those bounds, so the shared weights are trained for them alone; over-budget paths also
  take longer per step. The path's cost is counted on the supernet's own modules (its
  ``summarize``: one batch-1 forward, some 20 ms on ``fashion_mnist_cells``), with the same
  numbers ``bnas search`` checks. A latency bound (``max_latency_ms``) is not applied while
  training: timing a packed network per draw would cost more than the step itself.

How they are grouped (``bnas supernet --sampling``):

- ``uniform``: one path per batch and step.
- ``fair``: strict fairness, as FairNAS trains (Chu et al. 2021): per batch a group of ``m``
  paths (``m``: the most options any choice has, 8 ops on ``fashion_mnist_cells``) in which
  every choice takes each option equally often, so every candidate op of every edge trains
  on the same batch and one optimiser step updates them together. A step then costs ``m``
  single-path steps. It needs every path trainable (``paths all``): a group whose ``m``
  paths must all meet the constraints is rarely drawn.

Draws come from the caller's ``random.Random`` only, so a run repeats (and resumes) exactly.
"""

from __future__ import annotations

import random

from .constraints import violations
from .objective import cost_metrics
from .supernet import Choices, Supernet, SupernetError

__all__ = ["COST_BOUNDS", "PATHS", "SAMPLINGS", "PathSampler", "check_sampling"]

PATHS = ("all", "feasible")
SAMPLINGS = ("uniform", "fair")
# The constraints a path's cost count decides (``max_latency_ms`` needs a timing).
COST_BOUNDS = ("max_ops", "min_ops", "max_size_bytes", "max_params")


def check_sampling(paths: str, sampling: str, distill: bool = False) -> None:
    """Refuse a ``--paths`` / ``--sampling`` / ``--distill`` combination that cannot train."""
    if paths not in PATHS:
        raise SupernetError(f"paths must be one of {', '.join(PATHS)}, got {paths!r}")
    if sampling not in SAMPLINGS:
        raise SupernetError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if sampling == "fair" and paths != "all":
        raise SupernetError(
            "fair sampling trains groups in which every op of every edge appears, which paths within the "
            "constraints rarely form; use --paths all with --sampling fair"
        )
    if sampling == "fair" and distill:
        raise SupernetError(
            "in-place distillation teaches one sampled path per step; drop --distill or --sampling fair"
        )


class PathSampler:
    """Draws the choices of the path each supernet step trains (module doc).

    ``max_draws`` bounds the redraws of one ``feasible`` path; a space where that many draws
    in a row all break the constraints is refused (train all paths, or loosen the bounds).
    """

    def __init__(self, supernet: Supernet, mode: str = "all", max_draws: int = 1000, sampling: str = "uniform"):
        check_sampling(mode, sampling)
        self.sampling = sampling
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

    def __call__(self, rng: random.Random) -> Choices | list[Choices]:
        """The next step's path, or (fair sampling) its group of paths."""
        if self.sampling == "fair":
            group = self.supernet.fair_choices(rng)
            self.draws += len(group)
            self.kept += len(group)
            return group
        return self.draw(rng)

    def draw(self, rng: random.Random) -> Choices:
        """One path, uniform over all paths or over the feasible ones (``mode``)."""
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
