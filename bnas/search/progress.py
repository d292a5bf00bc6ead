"""The progress display of a search: one line on stderr per finished trial."""

from __future__ import annotations

import sys
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from .stats import epochs_saved

__all__ = ["ProgressLine", "trial_note"]


def trial_note(t: FrozenTrial) -> str:
    """What became of a trial, in a few words."""
    a = t.user_attrs
    if t.state == TrialState.FAIL:
        return f"failed ({a.get('error', 'unknown error')})"
    if "constraint" in a:
        return f"not trained ({a['constraint']})"
    if "duplicate_of" in a:
        return f"same genotype as trial {a['duplicate_of']}"
    if t.state == TrialState.PRUNED:
        return f"pruned after epoch {a.get('epochs', 0)} (val acc {a.get('val_acc') or 0:.4f})"
    if "supernet_acc" in a:
        return f"supernet score {t.values[0]:.4f} in {a.get('score_time_s', 0.0):.1f} s"
    return f"val acc {t.values[0]:.4f} in {a.get('epochs', 0)} epochs"


class ProgressLine:
    """One line per finished trial: done / pruned / failed, best so far, epochs saved, ETA.

    A display, like a progress bar, so it is written to stderr directly rather than logged."""

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
        print(
            f"[{finished}/{self.total}] trial {trial.number} {trial_note(trial)} | done {n[TrialState.COMPLETE]}, "
            f"pruned {n[TrialState.PRUNED]}, failed {n[TrialState.FAIL]}{best} | epochs {trained} trained, "
            f"{saved} saved | ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )
