"""Workers sharing a study: who runs a trial, taking over the trials of dead workers, the
study-wide trial total, and the lock that keeps the run folder's SQLite file to one process.

Storages with heartbeats (PostgreSQL and other databases) fail a dead worker's trial through
Optuna's stale-trial check; the journal file has none, so a worker whose process is gone
from this host, or that never registered on its trial, is found here.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .stats import FINISHED
from .storage import SearchError, env_seconds

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11 on

__all__ = [
    "ORPHAN_GRACE_ENV",
    "ORPHAN_GRACE_S",
    "RunLock",
    "Surplus",
    "fail_dead_local_workers",
    "fail_stale_local",
    "guard_total",
    "orphan_grace_s",
    "reclaim_dead_trials",
    "worker_id",
]

# A worker names itself on its trial the moment the trial exists. A RUNNING trial still
# without a name this long after it started lost its worker in between (for example the
# database went away right after the trial was created): nobody will ever finish it, and
# without a heartbeat row Optuna's stale-trial check never sees it either. The start time is
# the creating host's clock, so the grace must exceed the clock skew between hosts; on one
# host the environment variable can shorten it.
ORPHAN_GRACE_S = 120.0
ORPHAN_GRACE_ENV = "BNAS_ORPHAN_GRACE_S"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(t: FrozenTrial, grace_s: float) -> bool:
    started = t.datetime_start
    return "worker" not in t.user_attrs and started is not None and (datetime.now() - started).total_seconds() > grace_s


def orphan_grace_s() -> float:
    """``$BNAS_ORPHAN_GRACE_S`` when set, else ``ORPHAN_GRACE_S``."""
    return env_seconds(ORPHAN_GRACE_ENV, ORPHAN_GRACE_S)


def fail_dead_local_workers(study: optuna.Study) -> int:
    """RUNNING trials of a worker process on this host that no longer exists (storages
    without heartbeats, e.g. the journal file, need this), and orphaned trials (see
    ``ORPHAN_GRACE_S`` and :func:`orphan_grace_s`) are failed and queued again once."""
    grace_s = orphan_grace_s()
    host = socket.gethostname()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if _orphaned(t, grace_s):
            why = f"interrupted: its worker never registered ({grace_s:.0f} s after the trial started)"
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


def reclaim_dead_trials(study: optuna.Study, heartbeat: bool) -> None:
    """Free the slots of dead workers: by PID on this host, and by missed heartbeats where
    the storage has them."""
    fail_dead_local_workers(study)
    if heartbeat:
        optuna.storages.fail_stale_trials(study)


def fail_stale_local(study: optuna.Study) -> int:
    """With the run folder's own SQLite file and its lock held, a RUNNING trial can only be
    left over from a killed process: mark it failed so the study can go on."""
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(
            t._trial_id, "error", "interrupted: the search process was killed during this trial"
        )
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        count += 1
    return count


class RunLock:
    """An exclusive lock on the run folder, so two processes never share the embedded SQLite file."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.fh = open(folder / ".lock", "w")  # noqa: SIM115 (held until __exit__)

    def __enter__(self) -> Self:
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


class Surplus(Exception):
    """This trial would take the study past its requested total (a race between workers)."""


def guard_total(objective: Callable[[optuna.Trial], Any], total: int) -> Callable[[optuna.Trial], Any]:
    """The requested count is study-wide: two workers racing for the last slot are ordered
    by trial number, and the later one steps back. Each trial also names its worker here,
    the moment it exists (see ``ORPHAN_GRACE_S``)."""

    def run(trial: optuna.Trial) -> Any:
        trial.set_user_attr("worker", worker_id())
        trials = trial.study.get_trials(deepcopy=False)
        ahead = sum(t.state in FINISHED or (t.state == TrialState.RUNNING and t.number < trial.number) for t in trials)
        if ahead >= total:
            trial.set_user_attr("error", f"surplus: the study already had {total} trials finished or running")
            raise Surplus()
        return objective(trial)

    return run
