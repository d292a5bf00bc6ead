"""Numbers about a study: finished trials and the training epochs the search saved."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

__all__ = ["FINISHED", "epochs_saved", "finished_count", "saved_by_reason"]

# A trial that counts towards the requested total (a pruned or over-budget one included).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


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
