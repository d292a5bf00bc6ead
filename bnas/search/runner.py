"""The study runner: samplers, pruners, storage, the trial objective, resumption.

A trial: sample a genotype (define-by-run), check the constraints *before* training (an
over-budget genotype costs no training), skip duplicates (same canonical hash as a finished
trial: its result is reused), then train for the space's budget, reporting validation
accuracy every epoch so the pruner can stop hopeless trials early.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..builder import build
from ..data import DataSplits, load_dataset
from ..errors import BnasError
from ..evaluate import check_input_shape, evaluate
from ..genotype import Genotype
from ..metrics import summarize
from ..yaml_io import write_text_atomic
from .space import SearchSpace, sample_genotype

__all__ = ["SearchConfig", "SearchError", "run_search_study", "make_sampler", "make_pruner", "open_study", "finished_count"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchError(BnasError):
    pass


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
    device: str = "cpu"
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


def make_sampler(name: str, seed: int, multi_objective: bool) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        if not hasattr(optuna.samplers, "GPSampler"):
            raise SearchError(f"the gp sampler needs optuna >= 3.6 (this is {optuna.__version__}); use tpe")
        return optuna.samplers.GPSampler(seed=seed)
    raise SearchError(f"unknown sampler {name!r}; expected tpe, random, nsga2 or gp")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchError(f"unknown pruner {name!r}; expected median, hyperband or none")


def _storage(cfg: SearchConfig) -> optuna.storages.BaseStorage | str:
    url = cfg.storage_url
    if url.startswith("journal:"):
        # Optuna's journal file: several workers on one machine, no server needed.
        from optuna.storages import journal

        path = Path(url.split(":", 1)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = journal.JournalFileOpenLock(str(path))
        return optuna.storages.JournalStorage(journal.JournalFileBackend(str(path), lock_obj=lock))
    kwargs: dict[str, Any] = {}
    if cfg.heartbeat:
        kwargs = {"heartbeat_interval": cfg.heartbeat, "grace_period": cfg.heartbeat * 3,
                  "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=cfg.retries)}
    engine_kwargs = {"pool_pre_ping": True} if url.startswith("postgresql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # sqlalchemy raises many driver-specific types here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SearchError(f"cannot open the study storage {url!r}: {first}. Check the URL, that the server is running and reachable, and the credentials") from None


def open_study(cfg: SearchConfig) -> optuna.Study:
    """Create or load the study; a stored study with other objectives is an error."""
    space = cfg.space
    sampler = make_sampler(cfg.sampler or space.sampler, cfg.seed, space.multi_objective)
    pruner_name = cfg.pruner or space.pruner
    pruner = optuna.pruners.NopPruner() if space.multi_objective else make_pruner(pruner_name, space.epochs)
    storage = _storage(cfg)
    try:
        existing = optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        existing = None
    if existing is not None:
        stored = existing.user_attrs.get("objectives")
        want = list(space.objectives)
        directions = [d.name.lower() for d in existing.directions]
        if (stored is not None and stored != want) or directions != space.directions:
            raise SearchError(
                f"study {cfg.name!r} in {cfg.storage_url} exists with objectives {stored or directions}, not {want}; "
                "pick another --study name (nothing was changed)"
            )
        return existing
    try:
        study = optuna.create_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner, directions=space.directions)
    except optuna.exceptions.DuplicatedStudyError:
        # Another worker created it a moment ago: join it.
        return open_study(cfg)
    study.set_user_attr("objectives", list(space.objectives))
    study.set_user_attr("space", space.name)
    study.set_user_attr("epochs_per_trial", space.epochs)
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _fail_stale_local(study: optuna.Study) -> int:
    """With the run folder's own SQLite file and its lock held, a RUNNING trial can only be
    left over from a killed process: mark it failed so the study can go on."""
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the search process was killed during this trial")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
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
            raise SearchError(
                f"another bnas search is running in {Path(self.fh.name).parent}; wait for it, or share a study across "
                "processes with --storage (PostgreSQL or journal file) and --workers"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


# --------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------
def _trial_metrics(genotype: Genotype) -> dict[str, float]:
    model = build(genotype)
    s = summarize(model, genotype.input)
    return {"ops": float(s.ops), "size": float(s.size_bytes), "params": float(s.params_binary + s.params_real),
            "bops": float(s.bops), "flops": float(s.flops)}


def _violations(metrics: dict[str, float], constraints: dict[str, float]) -> list[str]:
    checks = {"max_ops": "ops", "max_size_bytes": "size", "max_params": "params"}
    return [f"{metrics[m]:.4g} {m} > {key} {constraints[key]:.4g}" for key, m in checks.items() if key in constraints and metrics[m] > constraints[key]]


class Objective:
    def __init__(self, cfg: SearchConfig, data: DataSplits, study: optuna.Study):
        self.cfg, self.data, self.study = cfg, data, study
        self.space = cfg.space
        (cfg.out / "genotypes").mkdir(parents=True, exist_ok=True)

    def _duplicate_of(self, trial: optuna.Trial, digest: str) -> FrozenTrial | None:
        """A finished trial with the same genotype; a twin still running in another worker
        is waited for, so no genotype is trained twice."""
        while True:
            twins = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                     if t.user_attrs.get("genotype_hash") == digest and t.number < trial.number]
            done = [t for t in twins if t.state == TrialState.COMPLETE]
            if done:
                return done[0]
            if not twins:
                return None
            time.sleep(1.0)

    def _write_genotype(self, trial: optuna.Trial, genotype: Genotype, note: str) -> None:
        header = f"bnas search: study {self.cfg.name!r}, trial {trial.number} ({note})"
        path = self.cfg.out / "genotypes" / f"trial-{trial.number}.yaml"
        genotype.to_yaml(path, header=header)
        # Also into the study's artifact store, shared by all workers (a folder on a shared path).
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        store_dir = self.cfg.artifacts or self.cfg.out / "artifacts"
        store_dir.mkdir(parents=True, exist_ok=True)
        artifact = upload_artifact(artifact_store=FileSystemArtifactStore(str(store_dir)), file_path=str(path), study_or_trial=trial)
        trial.set_user_attr("genotype_artifact", artifact)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        space = self.space
        genotype = sample_genotype(trial, space)
        digest = genotype.canonical_hash()
        trial.set_user_attr("genotype_hash", digest)
        try:
            metrics = _trial_metrics(genotype)
        except BnasError as exc:
            trial.set_user_attr("error", f"the sampled genotype does not build: {exc}")
            raise
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("epochs", 0)
        self._write_genotype(trial, genotype, "sampled")
        violations = _violations(metrics, dict(space.constraints))
        if violations:
            # Checked before any training: an over-budget genotype costs nothing.
            trial.set_user_attr("constraint", "; ".join(violations))
            raise optuna.TrialPruned("over budget: " + "; ".join(violations))
        duplicate = self._duplicate_of(trial, digest)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate.number)
            trial.set_user_attr("val_acc", duplicate.user_attrs.get("val_acc"))
            self._write_genotype(trial, genotype, f"same genotype as trial {duplicate.number}; not trained again")
            return tuple(duplicate.values) if space.multi_objective else duplicate.values[0]
        epochs = {"n": 0}

        def report(epoch: int, row: dict[str, float]) -> None:
            epochs["n"] = epoch
            trial.set_user_attr("epochs", epoch)
            if not space.multi_objective:
                trial.report(row["val_acc"], epoch)
                if trial.should_prune():
                    trial.set_user_attr("val_acc", row["val_acc"])
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (val acc {row['val_acc']:.4f})")

        start = time.perf_counter()
        result = evaluate(genotype, space.dataset, device=self.cfg.device, data=self.data, progress=False,
                          callbacks=[report], test=False, overrides={"seed": self.cfg.seed})
        trial.set_user_attr("train_time_s", time.perf_counter() - start)
        val_acc = float(result["best_val_acc"])
        trial.set_user_attr("val_acc", val_acc)
        values = [val_acc]
        for objective in space.objectives[1:]:
            values.append(metrics[objective] if objective != "latency" else _latency(genotype))
        if "latency" in space.objectives:
            trial.set_user_attr("latency_ms", values[space.objectives.index("latency")])
        return tuple(values) if space.multi_objective else val_acc


def _latency(genotype: Genotype) -> float:
    """Batch-1 latency (ms) of the network in eval mode on this CPU: median of repeats."""
    model = build(genotype).eval()
    x = torch.randn(1, *genotype.input)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
class _ProgressLine:
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
        print(
            f"[{finished}/{self.total}] done {n[TrialState.COMPLETE]}, pruned {n[TrialState.PRUNED]}, failed {n[TrialState.FAIL]}"
            f"{best} | ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def _retry_db(what: str, fn: Callable[[], Any], patience_s: float = 90.0) -> Any:
    """Run a storage operation, riding out transient database errors with back-off.

    A database that stays away longer than ``patience_s`` ends the worker with a clear
    message; everything the study committed before stays in the database.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    delay, waited = 0.5, 0.0
    while True:
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if waited >= patience_s:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SearchError(
                    f"lost the study database for {waited:.0f} s while trying to {what} ({first}); stopping this worker. "
                    "Every finished trial is kept in the database: rerun the same command when it is back"
                ) from None
            print(f"database unavailable ({type(exc).__name__}); retrying in {delay:.1f} s", file=sys.stderr, flush=True)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 8.0)


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


def _fail_dead_local_workers(study: optuna.Study) -> int:
    """RUNNING trials of a worker process on this host that no longer exists are failed and
    queued again once (storages without heartbeats, e.g. the journal file, need this)."""
    host = socket.gethostname()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", f"interrupted: worker {worker} was killed during this trial")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.user_attrs.get("retry_of") is None:
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


def run_search_study(cfg: SearchConfig) -> optuna.Study:
    """Run (or resume, or join) the study until it holds ``cfg.trials`` finished trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg.out.mkdir(parents=True, exist_ok=True)
    lock = _RunLock(cfg.out) if cfg.local_storage else None
    if lock is not None:
        lock.__enter__()
    try:
        study = _retry_db("open the study", lambda: open_study(cfg))
        if lock is not None:
            stale = _fail_stale_local(study)
            if stale:
                print(f"marked {stale} trial(s) left running by a killed search as failed", file=sys.stderr)
        data = load_dataset(cfg.space.dataset, cfg.data_root, val_fraction=float(cfg.space.budget.get("val_fraction", 0.1)),
                            seed=cfg.seed, shape=cfg.space.input, num_classes=cfg.space.num_classes)
        probe = sample_genotype(optuna.trial.FixedTrial(_first_choices(cfg.space)), cfg.space)
        check_input_shape(probe, data)
        if cfg.space.multi_objective and cfg.progress:
            print("note: Optuna cannot prune multi-objective studies; every trial trains its full budget. "
                  "For pruning, use objectives: [val_acc] with an OPs constraint (constraints: {max_ops: ...}).", file=sys.stderr)
        objective = _guard_total(_recording_errors(Objective(cfg, data, study)), cfg.trials)
        callbacks = [_ProgressLine(cfg.trials, cfg.progress), *cfg.extra_callbacks]
        deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        failures_in_a_row = 0
        while True:
            finished = _retry_db("count trials", lambda: finished_count(study))
            if finished >= cfg.trials or (deadline is not None and time.monotonic() > deadline):
                break
            running = _retry_db("count trials", lambda: len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))))
            if finished + running >= cfg.trials:
                # Other workers hold the remaining slots: wait, and take over a slot whose
                # worker died (heartbeats where the storage has them, PIDs on this host).
                _retry_db("check for dead workers", lambda: _fail_dead_local_workers(study))
                if cfg.heartbeat:
                    _retry_db("check for stale trials", lambda: optuna.storages.fail_stale_trials(study))
                time.sleep(1.0)
                continue
            # One trial per optimize() call: Optuna runs the heartbeat and stale-trial checks,
            # and a crashed trial is recorded as FAIL with its error while the study goes on.
            before = _retry_db("count trials", lambda: len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))))
            _retry_db("run a trial", lambda: study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(Exception,), gc_after_trial=False))
            after = _retry_db("count trials", lambda: len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))))
            failures_in_a_row = failures_in_a_row + 1 if after > before else 0
            if failures_in_a_row >= 10:
                raise SearchError("10 trials in a row failed; see the `error` column of trials.csv for why")
        return study
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _recording_errors(objective: Objective) -> Callable[[optuna.Trial], Any]:
    def run(trial: optuna.Trial) -> Any:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except _Surplus:
            raise
        except Exception as exc:
            if "error" not in trial.user_attrs:
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise

    return run


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


def epochs_saved(study: optuna.Study) -> tuple[int, int]:
    """(epochs trained, epochs that pruning and constraints saved) over finished trials."""
    per_trial = int(study.user_attrs.get("epochs_per_trial", 0))
    trained = saved = 0
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if "duplicate_of" in t.user_attrs:
            saved += per_trial
            continue
        e = int(t.user_attrs.get("epochs", 0))
        trained += e
        if t.state == TrialState.PRUNED:
            saved += max(0, per_trial - e)
    return trained, saved

