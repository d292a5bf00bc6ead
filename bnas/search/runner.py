"""The study runner: run (or resume, or join) a study until it holds its requested trials.

This module is the loop only; each job it calls lives in its own module:

- ``config.py``: ``SearchConfig``, what the search was asked to do;
- ``study.py``: samplers, pruners, per-trial seeding, opening and checking the study;
- ``objective.py``: one trial (sample, measure, constraints, duplicates, training);
- ``oneshot.py``: a one-shot search's supernet and the scorer that replaces training;
- ``retrain.py``: ``--retrain-top K``, the best trials retrained from scratch;
- ``constraints.py``: bounds checked before training, and unsatisfiable spaces;
- ``workers.py``: several workers on one study, dead-worker takeover, the study-wide total;
- ``failures.py``: crashed trials, a full disk, crashes in a row;
- ``stats.py``: finished trials and epochs saved; ``progress.py``: the progress line;
- ``storage.py``: storage URLs and riding out database hiccups.

A trial that raises is recorded as FAIL with its error and the study goes on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..atomic import check_writable_dir
from ..errors import BnasError
from ..evaluate import check_input_shape, resolve_device
from .config import SearchConfig
from .constraints import UNSATISFIABLE_AFTER, unsatisfiable
from .failures import FAILURES_IN_A_ROW, disk_full_error, recording_errors
from .objective import Objective, packed_latency_ms, probe_genotype, search_data
from .oneshot import SupernetScorer, load_oneshot
from .outputs import write_outputs
from .progress import ProgressLine
from .stats import FINISHED, epochs_saved, finished_count, saved_by_reason
from .storage import SearchError, first_line, is_disk_full, retry_db
from .study import PerTrialSeeded, make_pruner, make_sampler, open_study, trial_seed, write_run_meta
from .workers import RunLock, fail_stale_local, guard_total, reclaim_dead_trials

# The names this module has always offered stay importable from here.
__all__ = [
    "FAILURES_IN_A_ROW",
    "FINISHED",
    "UNSATISFIABLE_AFTER",
    "Objective",
    "PerTrialSeeded",
    "SearchConfig",
    "SearchError",
    "epochs_saved",
    "finished_count",
    "make_pruner",
    "make_sampler",
    "open_study",
    "packed_latency_ms",
    "run_search_study",
    "saved_by_reason",
    "search_data",
    "set_threads",
    "trial_seed",
]

logger = logging.getLogger(__name__)


def set_threads(cfg: SearchConfig) -> None:
    """One intra-op thread per worker by default: trials are small networks whose per-op
    cost is dominated by overheads that more threads do not reduce, and on a shared CPU
    oversubscribed threads spin against each other (a 10x slowdown measured here). Use
    ``--workers`` to spread trials over cores, or ``--threads`` for big per-trial models."""
    if torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads or 1)


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


def _write_outputs_before_stopping(study: optuna.Study, cfg: SearchConfig) -> None:
    """The files an abort message points to (trials.csv, summary.md) exist when it is read."""
    try:
        write_outputs(study, cfg.out)
    except (OSError, BnasError) as exc:
        logger.warning("could not write the search's outputs to %s: %s", cfg.out, first_line(exc))


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def run_search_study(cfg: SearchConfig) -> optuna.Study:
    """Run (or resume, or join) the study until it holds ``cfg.trials`` finished trials."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # bnas reports its own progress and failures
    # Up front, before any storage, data or training: a wrong device or an unwritable run
    # folder would otherwise show up trial after trial.
    resolve_device(cfg.device)
    check_writable_dir(cfg.out, "--out")
    set_threads(cfg)
    lock = RunLock(cfg.out) if cfg.local_storage else None
    if lock is not None:
        lock.__enter__()
    try:
        study = retry_db("open the study", lambda: open_study(cfg))
        write_run_meta(cfg)
        if lock is not None:
            stale = fail_stale_local(study)
            if stale:
                logger.warning("marked %d trial(s) left running by a killed search as failed", stale)
        data = search_data(cfg.space, cfg.seed, cfg.data_root)
        check_input_shape(probe_genotype(cfg.space), data)
        if cfg.space.multi_objective and cfg.progress and cfg.supernet is None:
            logger.warning(
                "note: Optuna cannot prune multi-objective studies; every trial trains its full budget. "
                "For pruning, use objectives: [val_acc] with a constraint (constraints: {max_ops: ...})."
            )
        disk_full: list[BaseException] = []
        scorer = SupernetScorer(load_oneshot(cfg), data, cfg) if cfg.supernet is not None else None
        objective = guard_total(recording_errors(Objective(cfg, data, study, scorer), cfg.out, disk_full), cfg.trials)
        callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
            ProgressLine(cfg.trials, cfg.progress),
            *cfg.extra_callbacks,
        ]
        deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        failures_in_a_row = 0
        with _sigterm_as_interrupt():
            while True:
                why = retry_db("check the constraints", lambda: unsatisfiable(study, cfg))
                if why:
                    _write_outputs_before_stopping(study, cfg)
                    raise SearchError(why)
                finished = retry_db("count trials", lambda: finished_count(study))
                if finished >= cfg.trials or (deadline is not None and time.monotonic() > deadline):
                    break
                running = retry_db("count trials", lambda: _count(study, TrialState.RUNNING))
                if finished + running >= cfg.trials:
                    # Other workers hold the remaining slots: wait, and take over a slot whose
                    # worker died (heartbeats where the storage has them, PIDs on this host).
                    retry_db(
                        "check for dead workers", lambda: reclaim_dead_trials(study, heartbeat=bool(cfg.heartbeat))
                    )
                    time.sleep(1.0)
                    continue
                # One trial per optimize() call: Optuna runs the heartbeat and stale-trial checks,
                # and a crashed trial is recorded as FAIL with its error while the study goes on.
                before = retry_db("count trials", lambda: _count(study, TrialState.FAIL))
                retry_db(
                    "run a trial",
                    lambda: study.optimize(
                        objective, n_trials=1, callbacks=callbacks, catch=(Exception,), gc_after_trial=False
                    ),
                )
                if disk_full:
                    raise disk_full_error(cfg, disk_full[0]) from disk_full[0]
                after = retry_db("count trials", lambda: _count(study, TrialState.FAIL))
                failures_in_a_row = failures_in_a_row + 1 if after > before else 0
                if failures_in_a_row >= FAILURES_IN_A_ROW:
                    _write_outputs_before_stopping(study, cfg)
                    raise SearchError(
                        f"{FAILURES_IN_A_ROW} trials in a row failed; see the `error` column of "
                        f"{cfg.out / 'trials.csv'} and the tracebacks in {cfg.out / 'errors'}"
                    )
        return study
    except (OSError, BnasError) as exc:
        if is_disk_full(exc) and not isinstance(exc, SearchError):
            raise disk_full_error(cfg, exc) from exc
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
