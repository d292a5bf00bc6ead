"""``bnas search ... --retrain-top K``: the best trials of a finished study retrained from
scratch, stand-alone, with the space's budget or a recipe of the user's
(``--retrain-recipe FILE.yaml``, ``load_retrain_recipe``).

Which trials: complete, within the constraints, not a duplicate of an earlier trial; for one
objective the K best by value, for several the Pareto front (best val_acc first, at most K).
Each trains with ``bnas.evaluate.evaluate`` (seed = the search's, test accuracy measured) in
``RUN/retrain/trial-N/``. A finished retrain (its ``report.json``) is never redone and an
interrupted one resumes from its checkpoint, so rerunning the command finishes the job.

Results go into the study (``RETRAINED_ATTR``: {trial number: {val_acc, test_acc, epochs,
time_s}}), a study attribute because a finished trial takes no new attributes; ``trials.csv``
and ``summary.md`` (``outputs.py``) show them beside the search's score.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..data import DataSplits
from ..errors import BnasError, LocatedError
from ..evaluate import evaluate
from ..genotype import Genotype, load_genotype
from ..train.recipe import Recipe, TrainingError, recipe_changes
from ..yaml_io import read_yaml_mapping
from .config import SearchConfig
from .objective import search_data
from .space import SearchSpace, sample_genotype

__all__ = [
    "RETRAINED_ATTR",
    "load_retrain_recipe",
    "retrain_candidates",
    "retrain_overrides",
    "retrain_top",
    "retrained",
]

log = logging.getLogger(__name__)

RETRAINED_ATTR = "retrained"


def load_retrain_recipe(path: str | os.PathLike[str], space: SearchSpace) -> dict[str, Any]:
    """The training keys of ``path`` for ``--retrain-recipe``: a YAML mapping of recipe keys
    (``epochs``, ``optimizer``, ``schedule``, ...), or a genotype file, whose ``training:``
    section is taken. Each key replaces the space's budget value of that key whole (an
    ``optimizer`` mapping replaces the budget's optimizer); keys left out keep the budget's.
    The merged recipe is validated here, so a bad key fails before the search starts, with
    the file and the key in the message. ``val_fraction`` cannot change: retrainings
    validate on the search's split."""
    data = read_yaml_mapping(path, "recipe")
    if "training" in data or "body" in data:  # a genotype file
        if not isinstance(data.get("training"), dict):
            raise TrainingError(
                "a genotype file whose training: section is missing or not a mapping; give one, or a recipe file "
                "(a YAML mapping of training keys)",
                "training",
                str(path),
            )
        where, keys = "training", dict(data["training"])
    else:
        where, keys = "", data
    try:
        recipe = Recipe.from_dict({**dict(space.budget), **keys}, where)
    except LocatedError as exc:
        exc.in_file(str(path))
        raise
    search_split = Recipe.from_dict(dict(space.budget)).val_fraction
    if recipe.val_fraction != search_split:
        raise TrainingError(
            f"val_fraction {recipe.val_fraction} differs from the search's {search_split}: a retraining validates on "
            "the search's split, so that its accuracy compares with the trials'; drop the key",
            f"{where}.val_fraction" if where else "val_fraction",
            str(path),
        )
    return keys


def retrain_overrides(cfg: SearchConfig) -> dict[str, Any]:
    """What a retraining changes in a trial's recipe (the space's budget): the
    ``--retrain-recipe`` keys, the search's seed unless the recipe sets one, and
    ``--retrain-epochs``, which wins over the recipe's epochs."""
    overrides: dict[str, Any] = {"seed": cfg.seed, **(cfg.retrain_recipe or {})}
    if cfg.retrain_epochs is not None:
        overrides["epochs"] = cfg.retrain_epochs
    return overrides


def retrained(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """The study's retrained trials: {trial number: {val_acc, test_acc, epochs, time_s}}."""
    stored = study.user_attrs.get(RETRAINED_ATTR) or {}
    return {int(number): dict(result) for number, result in stored.items()}


def retrain_candidates(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The trials ``--retrain-top k`` retrains, best first (see the module doc)."""
    eligible = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "duplicate_of" not in t.user_attrs and "constraint" not in t.user_attrs and t.values
    ]
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        eligible = [t for t in eligible if t.number in front]
    # val_acc is the first objective and is maximised; ties go to the earlier trial.
    eligible.sort(key=lambda t: (-t.values[0], t.number))
    return eligible[:k]


def _genotype(cfg: SearchConfig, trial: FrozenTrial) -> Genotype:
    """The trial's genotype file, else (another host wrote it) the genotype its choices give."""
    path = cfg.out / "genotypes" / f"trial-{trial.number}.yaml"
    if path.is_file():
        return load_genotype(path)
    genotype = sample_genotype(optuna.trial.FixedTrial(trial.params), cfg.space, training={"seed": cfg.seed})
    if genotype.canonical_hash() != trial.user_attrs.get("genotype_hash"):
        raise BnasError(
            f"{path} is missing and trial {trial.number}'s choices no longer give its genotype; "
            "retrain it by hand with bnas eval"
        )
    return genotype


def _result(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "val_acc": float(report["best_val_acc"]),
        "test_acc": float(report["test_acc"]),
        "epochs": int(report["epochs_run"]),
        "time_s": round(float(report["wall_time_s"]), 3),
    }


def retrain_top(study: optuna.Study, cfg: SearchConfig, data: DataSplits | None = None) -> dict[int, dict[str, Any]]:
    """Retrain the ``cfg.retrain_top`` best trials (module doc); returns every retrained
    trial's result, as stored in the study."""
    k = cfg.retrain_top or 0
    picks = retrain_candidates(study, k)
    if len(study.directions) > 1:
        log.info("--retrain-top %d: retraining the %d trial(s) of the Pareto front, best val_acc first", k, len(picks))
    elif len(picks) < k:
        log.warning("--retrain-top %d: the study has %d eligible trial(s); retraining those", k, len(picks))
    results = retrained(study)
    overrides = retrain_overrides(cfg)
    # A trial's genotype trains with the space's budget (and the search's seed, which the
    # overrides carry), so every retraining's recipe is this one.
    wanted = Recipe.from_dict(dict(cfg.space.budget)).merged(overrides)
    wanted_dict = wanted.to_dict()
    for t in picks:
        folder = cfg.out / "retrain" / f"trial-{t.number}"
        report_path = folder / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            done = report.get("recipe") or {}  # a report without one is taken as it is
            changed = recipe_changes(done or None, wanted)  # all but epochs and patience
            if done.get("epochs", wanted.epochs) != wanted.epochs:
                changed = sorted({*changed, "epochs"})
            if changed:
                log.warning(
                    "%s was retrained with another recipe (%s); kept (delete %s to retrain it)",
                    report_path,
                    "; ".join(f"{key}: {done.get(key)!r}, now {wanted_dict.get(key)!r}" for key in changed),
                    folder,
                )
        else:
            if data is None:
                data = search_data(cfg.space, cfg.seed, cfg.data_root)
            resume = (folder / "checkpoint.pt").is_file()
            log.info("retraining trial %d in %s%s", t.number, folder, " (resuming)" if resume else "")
            report = evaluate(
                _genotype(cfg, t),
                cfg.space.dataset,
                overrides=overrides,
                device=cfg.device,
                out=folder,
                resume=resume,
                progress=cfg.progress,
                data=data,
                test=True,
            )
        result = _result(report)
        if results.get(t.number) != result:
            results[t.number] = result
            study.set_user_attr(RETRAINED_ATTR, {str(n): r for n, r in sorted(results.items())})
    return results
