"""The study runner: samplers, pruners, the trial objective, resumption, workers.

A trial: sample a genotype (define-by-run), measure it and check the constraints *before*
training (an over-budget genotype costs no training: it is recorded as PRUNED at step 0,
with the violated bound in its ``constraint`` attribute), skip duplicates (same canonical
hash as an earlier trial: its result is reused, nothing is trained), then train for the
space's budget, reporting validation accuracy every epoch so the pruner can stop hopeless
trials early. A trial that raises is recorded as FAIL with its error and the study goes on.

Storage lives in ``storage.py``; this module only talks to an ``optuna.Study``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..atomic import check_writable_dir
from ..builder import build
from ..data import DataSplits, load_dataset
from ..errors import BnasError
from ..evaluate import check_input_shape, evaluate, resolve_device
from ..genotype import Genotype
from ..metrics import summarize
from ..yaml_io import write_text_atomic
from .space import CONSTRAINTS, SearchSpace, sample_genotype
from .storage import SearchError, first_line, is_disk_full, mask_url, open_storage, retry_db

__all__ = ["SearchConfig", "SearchError", "run_search_study", "make_sampler", "PerTrialSeeded", "trial_seed", "make_pruner",
           "open_study", "finished_count", "epochs_saved", "search_data"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
logger = logging.getLogger(__name__)


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
    worker_index: int = 0          # which of --workers K this process is (0 writes the outputs)
    device: str = "cpu"
    threads: int | None = None     # intra-op CPU threads per worker (default 1, see _set_threads)
    data_root: str | None = None
    progress: bool = True
    heartbeat: int | None = None
    retries: int = 1
    artifacts: Path | None = None
    extra_callbacks: list[Callable[..., None]] = field(default_factory=list)

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
                raise SearchError(f"the gp sampler handles several objectives from optuna 4.2 on (this is {optuna.__version__}); use nsga2")
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

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
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

    A stored study with other objectives, or made from a different search space, is refused
    before anything is written: its trials would not be comparable with new ones.
    """
    space = cfg.space
    sampler = PerTrialSeeded(cfg.sampler or space.sampler, cfg.seed, space.multi_objective)
    # Optuna cannot prune multi-objective studies (Trial.should_prune raises there).
    pruner = optuna.pruners.NopPruner() if space.multi_objective else make_pruner(cfg.pruner or space.pruner, space.epochs)
    storage = open_storage(cfg.storage_url, heartbeat=cfg.heartbeat, retries=cfg.retries)
    try:
        existing = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        existing = None
    if existing is not None:
        _check_compatible(existing, cfg)
        return existing
    try:
        study = optuna.create_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner, directions=space.directions)
    except optuna.exceptions.DuplicatedStudyError:
        return open_study(cfg)  # another worker created it a moment ago: join it
    study.set_user_attr("objectives", list(space.objectives))
    study.set_user_attr("space", space.name)
    study.set_user_attr("space_fingerprint", space.fingerprint())
    study.set_user_attr("epochs_per_trial", space.epochs)
    study.set_user_attr("seed", cfg.seed)
    study.set_user_attr("constraints", dict(space.constraints))
    return study


def _check_compatible(study: optuna.Study, cfg: SearchConfig) -> None:
    space = cfg.space
    stored = study.user_attrs.get("objectives")
    directions = [d.name.lower() for d in study.directions]
    where = f"study {cfg.name!r} in {mask_url(cfg.storage_url)}"
    if (stored is not None and stored != list(space.objectives)) or directions != space.directions:
        raise SearchError(f"{where} exists with objectives {stored or directions}, not {list(space.objectives)}; "
                          "pick another --study name or --out folder (nothing was changed)")
    fingerprint = study.user_attrs.get("space_fingerprint")
    if fingerprint is not None and fingerprint != space.fingerprint():
        raise SearchError(f"{where} was made from a different version of the search space {space.name!r} "
                          "(other choices, budget or constraints); its trials would not compare with new ones. "
                          "Pick another --study name or --out folder (nothing was changed)")
    seed = study.user_attrs.get("seed")
    if seed is not None and seed != cfg.seed:
        raise SearchError(f"{where} trains every trial with seed {seed} (data split and initialisation), not {cfg.seed}; "
                          f"resume it with --seed {seed}, or pick another --study name (nothing was changed)")


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _fail_stale_local(study: optuna.Study) -> int:
    """With the run folder's own SQLite file and its lock held, a RUNNING trial can only be
    left over from a killed process: mark it failed so the study can go on."""
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the search process was killed during this trial")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        count += 1
    return count


class _RunLock:
    """An exclusive lock on the run folder, so two processes never share the embedded SQLite file."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.fh = open(folder / ".lock", "w")

    def __enter__(self) -> "_RunLock":
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            raise SearchError(
                f"another bnas search is running in {Path(self.fh.name).parent}; wait for it, or share a study across "
                "processes with --storage (PostgreSQL or journal file) and --workers"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


# --------------------------------------------------------------------------------------
# Data, threads and measurements
# --------------------------------------------------------------------------------------
def search_data(space: SearchSpace, seed: int, data_root: str | None = None) -> DataSplits:
    """The splits every trial of a study trains and validates on (never the test set's labels).

    The validation split is carved from the training set with the study's seed, exactly as
    ``bnas eval`` carves it from the genotype's recipe, so a trial's genotype file retrained
    with ``bnas eval`` sees the same split. ``train_subset`` (a proxy task) keeps a seeded
    subset of the remaining training images.
    """
    data = load_dataset(space.dataset, data_root, val_fraction=float(space.budget.get("val_fraction", 0.1)),
                        seed=seed, shape=space.input, num_classes=space.num_classes)
    if space.train_subset is not None and space.train_subset < len(data.train_y):
        keep = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed + 1))[: space.train_subset]
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    return data


def _set_threads(cfg: SearchConfig) -> None:
    """One intra-op thread per worker by default: trials are small networks whose per-op
    cost is dominated by overheads that more threads do not reduce, and on a shared CPU
    oversubscribed threads spin against each other (a 10x slowdown measured here). Use
    ``--workers`` to spread trials over cores, or ``--threads`` for big per-trial models."""
    if torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads or 1)


def _trial_metrics(genotype: Genotype, with_latency: bool) -> dict[str, float]:
    model = build(genotype)
    s = summarize(model, genotype.input)
    metrics = {"ops": float(s.ops), "size": float(s.size_bytes), "params": float(s.params_binary + s.params_real),
               "bops": float(s.bops), "flops": float(s.flops)}
    if with_latency:
        metrics["latency_ms"] = packed_latency_ms(model, genotype.input)
    return metrics


def packed_latency_ms(model: torch.nn.Module, shape: tuple[int, ...], repeats: int = 15) -> float:
    """Batch-1 CPU latency (ms) of the packed 1-bit inference network (``bnas export``'s
    model on the XNOR kernels): the median of repeats after warm-up. Weights do not change
    the time, so the untrained network is measured before any training."""
    from ..export import pack_model

    packed = pack_model(model)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        for _ in range(3):
            packed(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            packed(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _violations(metrics: dict[str, float], constraints: dict[str, float]) -> list[str]:
    return [f"{metrics[m]:.4g} {m} > {key} {constraints[key]:.4g}"
            for key, m in CONSTRAINTS.items() if key in constraints and metrics[m] > constraints[key]]


# --------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------
class Objective:
    def __init__(self, cfg: SearchConfig, data: DataSplits, study: optuna.Study):
        self.cfg, self.data, self.study = cfg, data, study
        self.space = cfg.space
        (cfg.out / "genotypes").mkdir(parents=True, exist_ok=True)

    def _earlier_twin(self, trial: optuna.Trial, digest: str) -> FrozenTrial | None:
        """An earlier finished trial with the same genotype. A twin still running in another
        worker is waited for (its worker is checked for death meanwhile), so no genotype is
        trained twice."""
        while True:
            twins = [t for t in self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                     if t.user_attrs.get("genotype_hash") == digest and t.number < trial.number
                     and "constraint" not in t.user_attrs]
            done = [t for t in twins if t.state in FINISHED]
            if done:
                return done[0]
            if not twins:
                return None
            _fail_dead_local_workers(self.study)
            if self.cfg.heartbeat:
                optuna.storages.fail_stale_trials(self.study)
            time.sleep(1.0)

    def _write_genotype(self, trial: optuna.Trial, genotype: Genotype, note: str) -> None:
        header = f"bnas search: study {self.cfg.name!r}, trial {trial.number} ({note})"
        path = self.cfg.out / "genotypes" / f"trial-{trial.number}.yaml"
        genotype.to_yaml(path, header=header)
        # Also into the study's artifact store, shared by all workers (a folder on a shared path).
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        store_dir = self.cfg.artifacts or self.cfg.out / "artifacts"
        store_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            artifact = upload_artifact(artifact_store=FileSystemArtifactStore(str(store_dir)), file_path=str(path), study_or_trial=trial)
        trial.set_user_attr("genotype_artifact", artifact)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        space = self.space
        genotype = sample_genotype(trial, space, training={"seed": self.cfg.seed})
        digest = genotype.canonical_hash()
        trial.set_user_attr("genotype_hash", digest)
        trial.set_user_attr("epochs", 0)
        try:
            metrics = _trial_metrics(genotype, with_latency=space.needs_latency)
        except BnasError as exc:
            raise BnasError(f"the sampled genotype does not build: {exc}") from None
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        violations = _violations(metrics, dict(space.constraints))
        if violations:
            # Checked before any training: an over-budget genotype costs nothing. PRUNED (not
            # FAIL) at step 0 with no value: samplers rank it below every trained trial and
            # learn to leave that region; the pruner's statistics are untouched.
            trial.set_user_attr("constraint", "; ".join(violations))
            self._write_genotype(trial, genotype, "over budget, not trained: " + "; ".join(violations))
            raise optuna.TrialPruned("over budget: " + "; ".join(violations))
        twin = self._earlier_twin(trial, digest)
        if twin is not None:
            return self._reuse(trial, genotype, twin)
        self._write_genotype(trial, genotype, "sampled")

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.set_user_attr("epochs", epoch)
            trial.set_user_attr("val_acc", max(row["val_acc"], trial.user_attrs.get("val_acc") or 0.0))
            if not space.multi_objective:
                trial.report(row["val_acc"], epoch)
                # After the last epoch there is nothing left to save: the trial completes.
                if epoch < space.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (val acc {row['val_acc']:.4f})")

        start = time.perf_counter()
        result = evaluate(genotype, space.dataset, device=self.cfg.device, data=self.data, progress=False,
                          callbacks=[report], test=False, overrides={"seed": self.cfg.seed})
        trial.set_user_attr("train_time_s", time.perf_counter() - start)
        val_acc = float(result["best_val_acc"])
        trial.set_user_attr("val_acc", val_acc)
        values = [val_acc] + [metrics["latency_ms" if o == "latency" else o] for o in space.objectives[1:]]
        return tuple(values) if space.multi_objective else val_acc

    def _reuse(self, trial: optuna.Trial, genotype: Genotype, twin: FrozenTrial) -> float | tuple[float, ...]:
        """The same genotype as ``twin``: its result stands for this trial, nothing is trained."""
        trial.set_user_attr("duplicate_of", twin.number)
        trial.set_user_attr("val_acc", twin.user_attrs.get("val_acc"))
        if twin.state == TrialState.PRUNED:
            self._write_genotype(trial, genotype, f"same genotype as trial {twin.number}, which was pruned; not trained again")
            # Its learning curve, so the sampler ranks this trial as it ranked the twin.
            for step, value in sorted(twin.intermediate_values.items()):
                trial.report(value, step)
            raise optuna.TrialPruned(f"same genotype as trial {twin.number}, which was pruned")
        self._write_genotype(trial, genotype, f"same genotype as trial {twin.number}; not trained again")
        return tuple(twin.values) if self.space.multi_objective else twin.values[0]


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
class _ProgressLine:
    """One line per finished trial: done / pruned / failed, best so far, epochs saved, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.done_here = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done_here += 1
        if not self.enabled:
            return
        trials = study.get_trials(deepcopy=False)
        n = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        finished = n[TrialState.COMPLETE] + n[TrialState.PRUNED]
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done_here * max(0, self.total - finished)
        best = ""
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            top = max(complete, key=lambda t: t.values[0])
            best = f" | best val acc {top.values[0]:.4f} (trial {top.number})"
        trained, saved = epochs_saved(study)
        what = _trial_note(trial)
        print(
            f"[{finished}/{self.total}] trial {trial.number} {what} | done {n[TrialState.COMPLETE]}, "
            f"pruned {n[TrialState.PRUNED]}, failed {n[TrialState.FAIL]}{best} | epochs {trained} trained, "
            f"{saved} saved | ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def _trial_note(t: FrozenTrial) -> str:
    a = t.user_attrs
    if t.state == TrialState.FAIL:
        return f"failed ({a.get('error', 'unknown error')})"
    if "constraint" in a:
        return f"over budget ({a['constraint']})"
    if "duplicate_of" in a:
        return f"same genotype as trial {a['duplicate_of']}"
    if t.state == TrialState.PRUNED:
        return f"pruned after epoch {a.get('epochs', 0)} (val acc {a.get('val_acc') or 0:.4f})"
    return f"val acc {t.values[0]:.4f} in {a.get('epochs', 0)} epochs"


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A worker names itself on its trial the moment the trial exists. A RUNNING trial still
# without a name this long after it started lost its worker in between (for example the
# database went away right after the trial was created): nobody will ever finish it, and
# without a heartbeat row Optuna's stale-trial check never sees it either.
ORPHAN_GRACE_S = 120.0


def _orphaned(t: FrozenTrial, grace_s: float) -> bool:
    started = t.datetime_start
    return "worker" not in t.user_attrs and started is not None and (datetime.now() - started).total_seconds() > grace_s


def _fail_dead_local_workers(study: optuna.Study, orphan_grace_s: float = ORPHAN_GRACE_S) -> int:
    """RUNNING trials of a worker process on this host that no longer exists (storages
    without heartbeats, e.g. the journal file, need this), and orphaned trials (see
    ``ORPHAN_GRACE_S``) are failed and queued again once."""
    host = socket.gethostname()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if _orphaned(t, orphan_grace_s):
            why = f"interrupted: its worker never registered ({orphan_grace_s:.0f} s after the trial started)"
        elif name == host and pid.isdigit() and not _pid_alive(int(pid)):
            why = f"interrupted: worker {worker} was killed during this trial"
        else:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", why)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if t.params and t.user_attrs.get("retry_of") is None:  # an orphan may not have sampled yet
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        failed += 1
    return failed


class _Surplus(Exception):
    """This trial would take the study past its requested total (a race between workers)."""


def _guard_total(objective: Callable[[optuna.Trial], Any], total: int) -> Callable[[optuna.Trial], Any]:
    """The requested count is study-wide: two workers racing for the last slot are ordered
    by trial number, and the later one steps back."""

    def run(trial: optuna.Trial) -> Any:
        trial.set_user_attr("worker", _worker_id())
        trials = trial.study.get_trials(deepcopy=False)
        ahead = sum(t.state in FINISHED or (t.state == TrialState.RUNNING and t.number < trial.number) for t in trials)
        if ahead >= total:
            trial.set_user_attr("error", f"surplus: the study already had {total} trials finished or running")
            raise _Surplus()
        return objective(trial)

    return run


def _recording_errors(objective: Callable[[optuna.Trial], Any], out: Path, progress: bool,
                      disk_full: list[BaseException] | None = None) -> Callable[[optuna.Trial], Any]:
    """A crashed trial keeps its error (one line in the study, the traceback in
    RUN/errors/trial-N.txt); Optuna then records it as FAIL and the study goes on.

    A full disk is not the trial's fault and every next trial would meet it too: it is
    appended to ``disk_full`` so the runner stops with one line instead of failing on."""

    def run(trial: optuna.Trial) -> Any:
        try:
            return objective(trial)
        except (optuna.TrialPruned, _Surplus):
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted: the search was stopped during this trial")
            raise
        except Exception as exc:
            if is_disk_full(exc):
                trial.set_user_attr("error", f"disk full: {exc}".splitlines()[0][:500])
                if disk_full is not None:
                    disk_full.append(exc)
                raise  # no traceback file: there is no room for it
            if "error" not in trial.user_attrs:
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            write_text_atomic(out / "errors" / f"trial-{trial.number}.txt", traceback.format_exc())
            raise

    return run


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) ends the running trial as FAIL with a reason,
    like Ctrl-C, instead of leaving it RUNNING in the study."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _first_choices(space: SearchSpace) -> dict[str, Any]:
    """Parameters for a FixedTrial that picks the first choice everywhere (a shape probe)."""

    class _Recorder:
        number = 0

        def __init__(self) -> None:
            self.params: dict[str, Any] = {}

        def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
            self.params[name] = choices[0]
            return choices[0]

    rec = _Recorder()
    sample_genotype(rec, space)
    return rec.params


def _write_run_meta(cfg: SearchConfig) -> None:
    """RUN/run.json: where the study lives, so `bnas search --show RUN` finds it (no password)."""
    meta = {"storage": mask_url(cfg.storage_url), "study": cfg.name,
            "space": str(Path(cfg.space.source).resolve()) if cfg.space.source else None, "seed": cfg.seed}
    write_text_atomic(cfg.out / "run.json", json.dumps(meta, indent=2) + "\n")


# Constraint checks cost no training, so a space whose sampled genotypes all break the
# constraints is given this many draws before the search says none meets them.
UNSATISFIABLE_AFTER = 25
FAILURES_IN_A_ROW = 10


def _disk_full_error(cfg: SearchConfig, exc: BaseException) -> SearchError:
    return SearchError(
        f"the disk is full ({first_line(exc)}); the study in {mask_url(cfg.storage_url)} keeps every trial finished so far "
        f"and the files already in {cfg.out} are intact; free some space and rerun the same command to resume")


def _unsatisfiable(study: optuna.Study, cfg: SearchConfig) -> str | None:
    """Why to stop, once every sampled genotype has broken the constraints many times over:
    the study would otherwise end with zero trained trials and nothing to report."""
    if not cfg.space.constraints:
        return None
    trials = study.get_trials(deepcopy=False)
    over = [t for t in trials if "constraint" in t.user_attrs]
    met = [t for t in trials if "ops" in t.user_attrs and "constraint" not in t.user_attrs]
    if met or len(over) < min(UNSATISFIABLE_AFTER, cfg.trials):
        return None
    smallest = {m: min(t.user_attrs[m] for t in over if m in t.user_attrs) for key, m in CONSTRAINTS.items()
                if key in cfg.space.constraints and any(m in t.user_attrs for t in over)}
    bounds = ", ".join(f"{key} {cfg.space.constraints[key]:.4g} (smallest sampled: {smallest[m]:.4g})"
                       for key, m in CONSTRAINTS.items() if m in smallest)
    return (f"none of the {len(over)} sampled genotypes meets the constraints of {cfg.space.source or cfg.space.name}: "
            f"{bounds}; nothing was trained. Loosen `constraints:` or offer smaller choices (channels, cells, ops), "
            "then search again with another --out or --study")


def _write_outputs_before_stopping(study: optuna.Study, cfg: SearchConfig) -> None:
    """The files an abort message points to (trials.csv, summary.md) exist when it is read."""
    from .outputs import write_outputs

    try:
        write_outputs(study, cfg.out)
    except (OSError, BnasError) as exc:
        logger.warning("could not write the search's outputs to %s: %s", cfg.out, first_line(exc))


def run_search_study(cfg: SearchConfig) -> optuna.Study:
    """Run (or resume, or join) the study until it holds ``cfg.trials`` finished trials."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # bnas prints its own progress and failures
    # Up front, before any storage, data or training: a wrong device or an unwritable run
    # folder would otherwise show up trial after trial.
    resolve_device(cfg.device)
    check_writable_dir(cfg.out, "--out")
    _set_threads(cfg)
    lock = _RunLock(cfg.out) if cfg.local_storage else None
    if lock is not None:
        lock.__enter__()
    try:
        study = retry_db("open the study", lambda: open_study(cfg))
        _write_run_meta(cfg)
        if lock is not None:
            stale = _fail_stale_local(study)
            if stale:
                print(f"marked {stale} trial(s) left running by a killed search as failed", file=sys.stderr)
        data = search_data(cfg.space, cfg.seed, cfg.data_root)
        probe = sample_genotype(optuna.trial.FixedTrial(_first_choices(cfg.space)), cfg.space)
        check_input_shape(probe, data)
        if cfg.space.multi_objective and cfg.progress:
            print("note: Optuna cannot prune multi-objective studies; every trial trains its full budget. "
                  "For pruning, use objectives: [val_acc] with a constraint (constraints: {max_ops: ...}).", file=sys.stderr)
        disk_full: list[BaseException] = []
        objective = _guard_total(_recording_errors(Objective(cfg, data, study), cfg.out, cfg.progress, disk_full), cfg.trials)
        callbacks = [_ProgressLine(cfg.trials, cfg.progress), *cfg.extra_callbacks]
        deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        failures_in_a_row = 0
        with _sigterm_as_interrupt():
            while True:
                unsatisfiable = retry_db("check the constraints", lambda: _unsatisfiable(study, cfg))
                if unsatisfiable:
                    _write_outputs_before_stopping(study, cfg)
                    raise SearchError(unsatisfiable)
                finished = retry_db("count trials", lambda: finished_count(study))
                if finished >= cfg.trials or (deadline is not None and time.monotonic() > deadline):
                    break
                running = retry_db("count trials", lambda: len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))))
                if finished + running >= cfg.trials:
                    # Other workers hold the remaining slots: wait, and take over a slot whose
                    # worker died (heartbeats where the storage has them, PIDs on this host).
                    retry_db("check for dead workers", lambda: _fail_dead_local_workers(study))
                    if cfg.heartbeat:
                        retry_db("check for stale trials", lambda: optuna.storages.fail_stale_trials(study))
                    time.sleep(1.0)
                    continue
                # One trial per optimize() call: Optuna runs the heartbeat and stale-trial checks,
                # and a crashed trial is recorded as FAIL with its error while the study goes on.
                before = retry_db("count trials", lambda: len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))))
                retry_db("run a trial", lambda: study.optimize(objective, n_trials=1, callbacks=callbacks,
                                                                catch=(Exception,), gc_after_trial=False))
                if disk_full:
                    raise _disk_full_error(cfg, disk_full[0]) from disk_full[0]
                after = retry_db("count trials", lambda: len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))))
                failures_in_a_row = failures_in_a_row + 1 if after > before else 0
                if failures_in_a_row >= FAILURES_IN_A_ROW:
                    _write_outputs_before_stopping(study, cfg)
                    raise SearchError(f"{FAILURES_IN_A_ROW} trials in a row failed; see the `error` column of "
                                      f"{cfg.out / 'trials.csv'} and the tracebacks in {cfg.out / 'errors'}")
        return study
    except (OSError, BnasError) as exc:
        if is_disk_full(exc) and not isinstance(exc, SearchError):
            raise _disk_full_error(cfg, exc) from exc
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def epochs_saved(study: optuna.Study) -> tuple[int, int]:
    """(epochs trained, epochs saved) over finished trials.

    Saved = what full training of every finished trial would have cost minus what was
    trained: epochs cut by pruning, over-budget trials never trained, duplicates reused.
    """
    per_trial = int(study.user_attrs.get("epochs_per_trial", 0))
    trained = saved = 0
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        e = 0 if "duplicate_of" in t.user_attrs else int(t.user_attrs.get("epochs", 0))
        trained += e
        saved += max(0, per_trial - e)
    return trained, saved


def saved_by_reason(study: optuna.Study) -> dict[str, int]:
    """Epochs saved, split into pruning, constraints and duplicates."""
    per_trial = int(study.user_attrs.get("epochs_per_trial", 0))
    out = {"pruning": 0, "constraints": 0, "duplicates": 0}
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if "constraint" in t.user_attrs:
            out["constraints"] += per_trial
        elif "duplicate_of" in t.user_attrs:
            out["duplicates"] += per_trial
        elif t.state == TrialState.PRUNED:
            out["pruning"] += max(0, per_trial - int(t.user_attrs.get("epochs", 0)))
    return out
