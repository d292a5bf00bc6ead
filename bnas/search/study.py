"""Opening a study: sampler and pruner factories, per-trial seeding, and the checks that a
stored study matches the search that joins it.

Storage URLs live in ``storage.py``; this module turns one into an ``optuna.Study``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ..yaml_io import write_text_atomic
from .config import SearchConfig
from .oneshot import SUPERNET_ATTR, check_supernet, load_oneshot
from .storage import SearchError, mask_url, open_storage

__all__ = ["PerTrialSeeded", "make_pruner", "make_sampler", "open_study", "trial_seed", "write_run_meta"]


def make_sampler(name: str, seed: int, multi_objective: bool = False) -> optuna.samplers.BaseSampler:
    """One sampler seeded with ``seed`` (the search seeds a fresh one per trial, see
    ``PerTrialSeeded``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # Multivariate TPE models the joint choices of a cell (ops and inputs interact);
            # constant_liar keeps parallel workers from sampling the same point.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "gp":
            if not hasattr(optuna.samplers, "GPSampler"):
                raise SearchError(f"the gp sampler needs optuna >= 3.6 (this is {optuna.__version__}); use tpe")
            if multi_objective and tuple(int(p) for p in optuna.__version__.split(".")[:2]) < (4, 2):
                raise SearchError(
                    f"the gp sampler handles several objectives from optuna 4.2 on (this is {optuna.__version__}); use nsga2"
                )
            return optuna.samplers.GPSampler(seed=seed)
    raise SearchError(f"unknown sampler {name!r}; expected tpe, random, nsga2 or gp")


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` in a study searched with ``seed``."""
    digest = hashlib.sha256(f"bnas-sampler:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PerTrialSeeded(optuna.samplers.BaseSampler):
    """A sampler whose random stream is a function of (seed, trial number), not of the process.

    A sampler seeded once per process replays its first proposals on every start: a resumed
    study (Ctrl-C, rerun) or a second host running the same command proposed trial 0's
    genotype again, trial 1's, and so on. Trial numbers are handed out by the storage, unique
    within the study, so seeding a fresh sampler for each trial with ``trial_seed(seed,
    number)`` gives every start of every process fresh proposals. What the proposals depend
    on is then the seed, the trial number and the study's history (which TPE, NSGA-II and GP
    condition on anyway): one process from scratch with a seed is reproducible, and a study
    resumed after an interruption proposes what one uninterrupted run would have.
    """

    def __init__(self, name: str, seed: int, multi_objective: bool = False):
        self.name, self.seed, self.multi_objective = name, seed, multi_objective
        self._inner = make_sampler(name, seed, multi_objective)  # also validates the name

    @property
    def inner(self) -> optuna.samplers.BaseSampler:
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = make_sampler(self.name, trial_seed(self.seed, trial.number), self.multi_objective)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # Three trained trials set the median before anything is pruned; epochs are reported
        # from 1, so every epoch is judged (a search's budgets are a few epochs).
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchError(f"unknown pruner {name!r}; expected median, hyperband or none")


def open_study(cfg: SearchConfig) -> optuna.Study:
    """Create, resume or join the study.

    A stored study with other objectives, or made from a different search space, or scored
    otherwise (one-shot with another supernet, or per-trial training), is refused before
    anything is written: its trials would not be comparable with new ones.
    """
    space = cfg.space
    # Loaded (and checked against the space) before the study is touched; once per process.
    supernet = load_oneshot(cfg).info if cfg.supernet is not None else None
    sampler = PerTrialSeeded(cfg.sampler or space.sampler, cfg.seed, space.multi_objective)
    # Optuna cannot prune multi-objective studies (Trial.should_prune raises there).
    pruner = (
        optuna.pruners.NopPruner() if space.multi_objective else make_pruner(cfg.pruner or space.pruner, space.epochs)
    )
    storage = open_storage(cfg.storage_url, heartbeat=cfg.heartbeat, retries=cfg.retries)
    try:
        existing = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        existing = None
    if existing is not None:
        _check_compatible(existing, cfg, supernet)
        return existing
    try:
        directions = [StudyDirection[d.upper()] for d in space.directions]
        study = optuna.create_study(
            study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner, directions=directions
        )
    except optuna.exceptions.DuplicatedStudyError:
        return open_study(cfg)  # another worker created it a moment ago: join it
    if supernet is not None:  # first: a study with objectives but no supernet is a per-trial one
        study.set_user_attr(SUPERNET_ATTR, supernet)
    study.set_user_attr("objectives", list(space.objectives))
    study.set_user_attr("space", space.name)
    study.set_user_attr("space_fingerprint", space.fingerprint())
    # A one-shot trial would never train: no epochs to count as saved (stats.epochs_saved).
    study.set_user_attr("epochs_per_trial", 0 if supernet is not None else space.epochs)
    study.set_user_attr("seed", cfg.seed)
    study.set_user_attr("constraints", dict(space.constraints))
    return study


def _check_compatible(study: optuna.Study, cfg: SearchConfig, supernet: dict[str, Any] | None = None) -> None:
    space = cfg.space
    stored = study.user_attrs.get("objectives")
    directions = [d.name.lower() for d in study.directions]
    where = f"study {cfg.name!r} in {mask_url(cfg.storage_url)}"
    if (stored is not None and stored != list(space.objectives)) or directions != space.directions:
        raise SearchError(
            f"{where} exists with objectives {stored or directions}, not {list(space.objectives)}; "
            "pick another --study name or --out folder (nothing was changed)"
        )
    fingerprint = study.user_attrs.get("space_fingerprint")
    if fingerprint is not None and fingerprint != space.fingerprint():
        raise SearchError(
            f"{where} was made from a different version of the search space {space.name!r} "
            "(other choices, budget or constraints); its trials would not compare with new ones. "
            "Pick another --study name or --out folder (nothing was changed)"
        )
    seed = study.user_attrs.get("seed")
    if seed is not None and seed != cfg.seed:
        raise SearchError(
            f"{where} trains every trial with seed {seed} (data split and initialisation), not {cfg.seed}; "
            f"resume it with --seed {seed}, or pick another --study name (nothing was changed)"
        )
    attrs = study.user_attrs
    if SUPERNET_ATTR in attrs or "objectives" in attrs:  # else another worker is creating it right now
        check_supernet(attrs.get(SUPERNET_ATTR), supernet, where)


def write_run_meta(cfg: SearchConfig) -> None:
    """RUN/run.json: where the study lives, so `bnas search --show RUN` finds it (no password)."""
    meta = {
        "storage": mask_url(cfg.storage_url),
        "study": cfg.name,
        "space": str(Path(cfg.space.source).resolve()) if cfg.space.source else None,
        "seed": cfg.seed,
        # The presets its genotypes may name: `bnas eval/info/export --catalog FILE` needs them.
        "catalogs": [*cfg.space.catalog_files, *(c for c in cfg.catalogs if c not in cfg.space.catalog_files)],
        # A one-shot search's supernet (the study records its hash and epochs as well).
        "supernet": str(Path(cfg.supernet).resolve()) if cfg.supernet is not None else None,
    }
    write_text_atomic(cfg.out / "run.json", json.dumps(meta, indent=2) + "\n")
