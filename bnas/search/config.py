"""What one ``bnas search`` process is asked to do: the search's settings in one record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .space import SearchSpace

__all__ = ["SUPERNET_SCORES", "SearchConfig"]

# What scores a one-shot trial (--supernet-score): its inherited weights' validation accuracy,
# or ABS's angle between its weights before and after supernet training.
SUPERNET_SCORES = ("accuracy", "angle")


@dataclass
class SearchConfig:
    space: SearchSpace
    out: Path
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    seed: int = 0
    worker_index: int = 0  # which of --workers K this process is (0 writes the outputs)
    device: str = "cpu"
    threads: int | None = None  # intra-op CPU threads per worker (default 1, see runner.set_threads)
    data_root: str | None = None
    progress: bool = True
    heartbeat: int | None = None
    retries: int = 1
    artifacts: Path | None = None
    extra_callbacks: list[Callable[..., None]] = field(default_factory=list)
    # --catalog files (absolute paths), passed on to --workers children and kept in run.json;
    # a space's own `catalog:` list is the space's (in its fingerprint).
    catalogs: tuple[str, ...] = ()
    # One-shot search (--supernet): trials are scored with the supernet's inherited weights
    # (BN recalibrated on this many seeded training batches) instead of being trained;
    # with finetune_steps, a copy of the inherited weights first trains that many steps;
    # with probe_samples, a linear probe refitted on that many training images' features
    # scores instead of the shared classifier (bnas.search.linear_probe).
    # supernet_score "angle" scores by ABS's angle instead, without any data.
    supernet: Path | None = None
    supernet_score: str = "accuracy"
    calibration_batches: int = 8
    finetune_steps: int = 0
    probe_samples: int = 0
    # --retrain-top K: the best K trials retrained from scratch once the study is done,
    # with the space's budget, changed by the --retrain-recipe keys (retrain.load_retrain_recipe)
    # and --retrain-epochs.
    retrain_top: int | None = None
    retrain_epochs: int | None = None
    retrain_recipe: dict[str, Any] | None = None

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or self.space.name

    @property
    def local_storage(self) -> bool:
        """The default embedded SQLite file of the run folder (one process owns it)."""
        return self.storage is None
