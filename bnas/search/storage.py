"""Where a study lives: Optuna storage URLs, heartbeats, and riding out database hiccups.

Every storage the search opens goes through ``open_storage``:

- ``sqlite:///RUN/study.db`` (the default): an embedded file in the run folder, one process;
- ``postgresql://user@host/db`` (or any SQLAlchemy URL): many workers on many hosts, with
  heartbeats so a dead worker's trial is failed and retried by another one;
- ``journal:PATH``: Optuna's journal file, several workers on one machine without a server.
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna

from ..errors import BnasError

__all__ = [
    "SearchError",
    "db_patience_s",
    "env_seconds",
    "first_line",
    "is_disk_full",
    "mask_url",
    "open_storage",
    "retry_db",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

# How long a worker waits for a database that went away before it stops (seconds). The
# environment variable shortens it for tests and lengthens it for flaky networks.
DB_PATIENCE_S = 90.0
DB_PATIENCE_ENV = "BNAS_DB_PATIENCE_S"


class SearchError(BnasError):
    """A search that cannot start or go on; the message says what to do."""


def mask_url(url: str) -> str:
    """The URL without its password (for messages and run.json)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_disk_full(exc: BaseException) -> bool:
    """A full disk or quota, raised directly, wrapped by bnas's atomic writer (its cause),
    or reported by SQLite ("database or disk is full")."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _heartbeat_kwargs(heartbeat: int, retries: int) -> dict[str, Any]:
    """Heartbeats, and a stale trial (its worker died) retried ``retries`` times.

    Optuna 4.9 renamed the retry hook (``failed_trial_callback`` ->
    ``heartbeat_stale_trial_callback``); use whichever this Optuna has.
    """
    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat, "grace_period": heartbeat * 3}
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    if "heartbeat_stale_trial_callback" in params and hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)
    else:
        kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=retries)
    return kwargs


def open_storage(url: str, heartbeat: int | None = None, retries: int = 1) -> optuna.storages.BaseStorage:
    """Open ``url`` (see the module doc); an unreachable or malformed one is a clear ``SearchError``."""
    if url.startswith("journal:"):
        from optuna.storages import journal

        path = Path(url.split(":", 1)[1])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                lock = journal.JournalFileOpenLock(str(path))
                return optuna.storages.JournalStorage(journal.JournalFileBackend(str(path), lock_obj=lock))
        except OSError as exc:
            raise SearchError(f"cannot open the journal file {path}: {first_line(exc)}") from None
    engine_kwargs = {"pool_pre_ping": True} if url.startswith("postgresql") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            kwargs = _heartbeat_kwargs(heartbeat, retries) if heartbeat else {}
            if heartbeat:
                quiet_database_errors_in_threads()
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ImportError as exc:  # optuna's "Please install appropriate one": name the extra
        if url.startswith("postgres"):
            raise SearchError(
                f"cannot open the study storage {mask_url(url)!r}: the PostgreSQL driver is not installed; "
                'install it with pip install -e ".[postgres]" (psycopg 3)'
            ) from None
        raise SearchError(
            f"cannot open the study storage {mask_url(url)!r}: {first_line(exc)} "
            f"({first_line(exc.__cause__) if exc.__cause__ else 'no driver'}); install the database "
            "driver this URL names"
        ) from None
    except Exception as exc:  # noqa: BLE001 (SQLAlchemy and every driver raise their own types here)
        raise SearchError(
            f"cannot open the study storage {mask_url(url)!r}: {first_line(exc)}. Check the URL "
            "(sqlite:///PATH, postgresql://USER@HOST/DB, journal:PATH), that the server is running and reachable, "
            "and the credentials"
        ) from None


def env_seconds(variable: str, default: float) -> float:
    """The number of seconds in the environment variable ``variable`` when it is set, else
    ``default``; SearchError naming the variable when it is not a number >= 0."""
    text = os.environ.get(variable)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise SearchError(f"{variable} must be a number of seconds >= 0, got {text!r}")
    return value


def db_patience_s() -> float:
    """``$BNAS_DB_PATIENCE_S`` when set, else ``DB_PATIENCE_S``."""
    return env_seconds(DB_PATIENCE_ENV, DB_PATIENCE_S)


def _database_error(exc: BaseException) -> BaseException | None:
    """The SQLAlchemy database error behind ``exc``, if any.

    Optuna 5.0 can hide one: when telling a trial's result fails and reading the trial back
    fails too, the cleanup of ``_run_trial`` raises UnboundLocalError with the database
    error as its context. A ``BnasError`` is a final verdict, and a context suppressed with
    ``from None`` is not followed.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and not isinstance(cur, BnasError):
        seen.add(id(cur))
        if isinstance(cur, (OperationalError, DBAPIError)):
            return cur
        cur = cur.__cause__ if cur.__cause__ is not None or cur.__suppress_context__ else cur.__context__
    return None


_previous_thread_hook: Callable[[threading.ExceptHookArgs], Any] | None = None


def _thread_database_error_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None and _database_error(args.exc_value) is not None:
        logger.warning("heartbeat not recorded: database unavailable (%s)", first_line(args.exc_value))
        return
    assert _previous_thread_hook is not None
    _previous_thread_hook(args)


def quiet_database_errors_in_threads() -> None:
    """Optuna records trial heartbeats in a background thread, which dies with a traceback on
    stderr when the database goes away. The worker's own loop already retries and reports an
    outage in one line, so a database error that ends such a thread becomes one warning; any
    other thread error still reaches the previous hook."""
    global _previous_thread_hook
    if _previous_thread_hook is None:
        _previous_thread_hook = threading.excepthook
        threading.excepthook = _thread_database_error_hook


def retry_db(what: str, fn: Callable[[], T], patience_s: float | None = None) -> T:
    """Run a storage operation, riding out transient database errors with back-off.

    A database that stays away longer than ``patience_s`` (default ``db_patience_s()``)
    ends the worker with a clear message; everything the study committed before stays in
    the database.
    """
    patience = db_patience_s() if patience_s is None else patience_s
    delay, waited = 0.5, 0.0
    while True:
        try:
            return fn()
        except Exception as caught:
            exc = _database_error(caught)
            if exc is None:
                raise
            if is_disk_full(exc):  # waiting does not free space
                raise SearchError(
                    f"the disk holding the study database is full while trying to {what} ({first_line(exc)}); every "
                    "finished trial is kept in the database; free some space and rerun the same command to resume"
                ) from None
            if waited >= patience:
                raise SearchError(
                    f"lost the study database for {waited:.0f} s while trying to {what} ({first_line(exc)}); stopping this "
                    "worker. Every finished trial is kept in the database: rerun the same command when it is back"
                ) from None
            logger.warning("database unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 8.0)
