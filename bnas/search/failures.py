"""Trials that raise: what a failed trial leaves behind, and the failures that stop a search
(a full disk at once, a run of crashes after ``FAILURES_IN_A_ROW``)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ..yaml_io import write_text_atomic
from .config import SearchConfig
from .storage import SearchError, first_line, is_disk_full, mask_url
from .workers import Surplus

__all__ = ["FAILURES_IN_A_ROW", "disk_full_error", "recording_errors"]

# A study whose trials crash this many times in a row is stopped: something is wrong with
# every trial (an op, the data, the device), not with one genotype.
FAILURES_IN_A_ROW = 10


def recording_errors(
    objective: Callable[[optuna.Trial], Any], out: Path, disk_full: list[BaseException] | None = None
) -> Callable[[optuna.Trial], Any]:
    """A crashed trial keeps its error (one line in the study, the traceback in
    RUN/errors/trial-N.txt); Optuna then records it as FAIL and the study goes on.

    A full disk is not the trial's fault and every next trial would meet it too: it is
    appended to ``disk_full`` so the runner stops with one line instead of failing on."""

    def run(trial: optuna.Trial) -> Any:
        try:
            return objective(trial)
        except (optuna.TrialPruned, Surplus):
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


def disk_full_error(cfg: SearchConfig, exc: BaseException) -> SearchError:
    return SearchError(
        f"the disk is full ({first_line(exc)}); the study in {mask_url(cfg.storage_url)} keeps every trial finished so far "
        f"and the files already in {cfg.out} are intact; free some space and rerun the same command to resume"
    )
