"""What a search leaves behind: trials.csv, best.yaml or pareto/*.yaml, summary.md, plots
(and, for a one-shot search or ``--retrain-top``, the supernet score beside the stand-alone
retrained accuracy).

Everything is derived from the study in storage, so ``bnas search --show RUN`` (and a
resumed search) rewrites the same files from the same source of truth.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..atomic import save_figure
from ..genotype import load_genotype
from ..yaml_io import write_text_atomic
from .oneshot import SUPERNET_ATTR
from .retrain import retrained
from .stats import FINISHED, epochs_saved, saved_by_reason

__all__ = ["COLUMNS", "history_figure", "saved_line", "summary_text", "write_outputs"]

COLUMNS = [
    "number",
    "state",
    "values",
    "val_acc",
    "ops",
    "size_bytes",
    "params",
    "latency_ms",
    "epochs",
    "duration_s",
    "genotype_hash",
    "duplicate_of",
    "constraint",
    "error",
    "choices",
    "supernet_acc",
    "supernet_loss",
    "supernet_angle",
    "retrain_val_acc",
    "retrain_test_acc",
]
MULTI_OBJECTIVE_NOTE = (
    "Optuna cannot prune multi-objective studies, so every trial trained its full budget; "
    "for pruning use objectives: [val_acc] with a constraint such as {max_ops: ...}"
)


def _row(t: FrozenTrial, again: dict[int, dict[str, Any]]) -> dict[str, Any]:
    a = t.user_attrs
    retrain = again.get(t.number, {})
    duration = (
        (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    )
    return {
        "number": t.number,
        "state": t.state.name,
        "values": json.dumps(t.values) if t.values else "",
        "val_acc": a.get("val_acc", ""),
        "ops": a.get("ops", ""),
        "size_bytes": a.get("size", ""),
        "params": a.get("params", ""),
        "latency_ms": a.get("latency_ms", ""),
        "epochs": a.get("epochs", ""),
        "duration_s": round(duration, 3) if duration is not None else "",
        "genotype_hash": a.get("genotype_hash", ""),
        "duplicate_of": a.get("duplicate_of", ""),
        "constraint": a.get("constraint", ""),
        "error": a.get("error", ""),
        "choices": json.dumps(t.params, sort_keys=True),
        "supernet_acc": a.get("supernet_acc", ""),
        "supernet_loss": a.get("supernet_loss", ""),
        "supernet_angle": a.get("supernet_angle", ""),
        "retrain_val_acc": retrain.get("val_acc", ""),
        "retrain_test_acc": retrain.get("test_acc", ""),
    }


def _best_trials(study: optuna.Study) -> list[FrozenTrial]:
    try:
        return study.best_trials
    except ValueError:
        return []


def saved_line(study: optuna.Study) -> str:
    supernet = study.user_attrs.get(SUPERNET_ATTR)
    if supernet:
        scored = study.get_trials(deepcopy=False, states=FINISHED)
        seconds = sum(float(t.user_attrs.get("score_time_s", 0.0)) for t in scored)
        return (
            f"no epochs trained (one-shot): {sum('score_time_s' in t.user_attrs for t in scored)} trials scored "
            f"with the supernet's weights in {seconds:.1f} s"
        )
    trained, saved = epochs_saved(study)
    why = saved_by_reason(study)
    return (
        f"{trained} training epochs run; {saved} of {trained + saved} saved ({why['pruning']} by pruning, "
        f"{why['constraints']} by constraints checked before training, {why['duplicates']} by duplicate genotypes)"
    )


def _threads_hint(trials: list[FrozenTrial]) -> str:
    """How to repeat a trial's training bit for bit: with the CPU threads it trained on
    (float sums round differently with another count)."""
    threads = {t.user_attrs["threads"] for t in trials if "threads" in t.user_attrs}
    if len(threads) != 1:
        return ""
    return (
        f", and `--threads {threads.pop()}` (the CPU threads its trials trained on) repeats a trial's training exactly"
    )


def summary_text(study: optuna.Study, out: Path) -> str:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    over = sum("constraint" in t.user_attrs for t in trials)
    dups = sum("duplicate_of" in t.user_attrs for t in trials)
    objectives = study.user_attrs.get("objectives", ["val_acc"])
    supernet = study.user_attrs.get(SUPERNET_ATTR)
    acc_name = "supernet score" if supernet else "validation accuracy"
    lines = [
        f"# Search {study.study_name!r}",
        "",
        f"- objectives: {', '.join(objectives)} ({', '.join(d.name.lower() for d in study.directions)})",
        (
            f"- trials: {count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned "
            f"({over} of them rejected by constraints, never trained), {count[TrialState.FAIL]} failed, {count[TrialState.RUNNING]} running; "
            f"{dups} duplicate genotypes reused an earlier result"
        ),
        f"- training epochs: {saved_line(study)}",
    ]
    if supernet and supernet.get("score") == "angle":
        lines.append(
            f"- one-shot: every trial scored by ABS's angle between its weights in the supernet `{supernet['path']}` "
            f"(trained {supernet.get('epochs')} epoch(s)) and in the same supernet untrained (radians, larger ranks "
            "higher; no data read); no trial was trained from scratch"
        )
    elif supernet:
        lines.append(
            f"- one-shot: every trial scored with the weights it inherits from the supernet `{supernet['path']}` "
            f"(trained {supernet.get('epochs')} epoch(s); "
            + (
                f"a copy of them fine-tuned for {supernet['finetune_steps']} steps, then "
                if supernet.get("finetune_steps")
                else ""
            )
            + f"BatchNorm recalibrated on {supernet.get('calibration_batches')} training batches"
            + (
                f"; accuracy of a linear probe refitted on its features for {supernet['probe_samples']} training images"
                if supernet.get("probe_samples")
                else ""
            )
            + "); no trial was trained from scratch"
        )
    if len(study.directions) > 1 and not supernet:
        lines.append(f"- multi-objective: {MULTI_OBJECTIVE_NOTE}")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed[:5]:
        lines.append(f"- trial {t.number} failed: {t.user_attrs.get('error', 'no error recorded')}")
    best = _best_trials(study)
    if best and len(study.directions) == 1:
        b = best[0]
        lines += [
            "",
            f"## Best: trial {b.number}",
            "",
            (
                f"{acc_name} {b.values[0]:.4f}, OPs {b.user_attrs.get('ops', 0):,.0f} (BOPs/64 + FLOPs), "
                f"size {b.user_attrs.get('size', 0) / 1024:,.1f} KiB; genotype: `{out / 'best.yaml'}`"
            ),
        ]
        top = sorted(
            (t for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs),
            key=lambda t: -t.values[0],
        )[:5]
        score_head = "supernet score" if supernet else "val acc"
        lines += ["", f"| trial | {score_head} | OPs | size (KiB) | epochs |", "|---|---|---|---|---|"]
        lines += [
            f"| {t.number} | {t.values[0]:.4f} | {t.user_attrs.get('ops', 0):,.0f} | "
            f"{t.user_attrs.get('size', 0) / 1024:,.1f} | {t.user_attrs.get('epochs', '')} |"
            for t in top
        ]
    elif best:
        lines += [
            "",
            f"## Pareto front ({len(best)} genotypes, in `{out / 'pareto'}`)",
            "",
            "| trial | " + " | ".join(objectives) + " |",
            "|---" * (len(objectives) + 1) + "|",
        ]
        for t in sorted(best, key=lambda t: -t.values[0]):
            lines.append(f"| {t.number} | " + " | ".join(f"{v:.4g}" for v in t.values) + " |")
    lines += _retrained_lines(study, out, supernet is not None)
    lines += [
        "",
        (
            "Plots: `history.png`, `pareto.png`, `importances.png`; every trial: `trials.csv` and "
            "`genotypes/trial-N.yaml`. Retrain a genotype with `bnas eval GENOTYPE.yaml --dataset D`; its `training:` "
            "holds the search's recipe and seed" + _threads_hint(trials) + "."
        ),
        "",
    ]
    return "\n".join(lines)


def _retrained_lines(study: optuna.Study, out: Path, oneshot: bool) -> list[str]:
    """The retrained trials (``--retrain-top``): the search's score beside the stand-alone
    accuracies, and how well the one ranks the other (Kendall tau, from 3 trials)."""
    again = retrained(study)
    if not again:
        return []
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = sorted(
        ((n, trials[n], r) for n, r in again.items() if n in trials and trials[n].values),
        key=lambda row: (-row[1].values[0], row[0]),
    )
    head = "supernet score" if oneshot else "search val acc"
    lines = [
        "",
        f"## Retrained from scratch ({len(rows)} trials, in `{out / 'retrain'}`)",
        "",
        f"| trial | {head} | retrained val acc | retrained test acc | epochs | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {t.values[0]:.4f} | {r['val_acc']:.4f} | {r['test_acc']:.4f} | {r['epochs']} | {r['time_s']:.1f} |"
        for n, t, r in rows
    ]
    if len(rows) >= 3:
        from scipy.stats import kendalltau

        tau = float(kendalltau([t.values[0] for _, t, _ in rows], [r["val_acc"] for _, _, r in rows]).statistic)
        shown = "undefined (one of the two is constant)" if tau != tau else f"{tau:.3f}"
        lines += [
            "",
            f"Kendall tau between the {head} and the retrained val acc over these {len(rows)} trials: {shown}",
        ]
    return lines


def _importances(study: optuna.Study) -> dict[str, float]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 3:
        return {}
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target
            )
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}  # e.g. every completed trial made the same choices


def history_figure(study: optuna.Study) -> Any:
    """The optimisation history (a matplotlib Figure): every scored trial's validation
    accuracy (a one-shot search by angle: its angle) and the best so far, drawn to the last
    trial of the study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    by_angle = (study.user_attrs.get(SUPERNET_ATTR) or {}).get("score") == "angle"
    key = "supernet_angle" if by_angle else "val_acc"
    scored = [
        t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.user_attrs.get(key) is not None
    ]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    ax.scatter(
        [t.number for t in scored],
        [t.user_attrs[key] for t in scored],
        s=20,
        c=["tab:blue" if t.state == TrialState.COMPLETE else "tab:gray" for t in scored],
        label="trials (gray: pruned, at the epoch it stopped)",
    )
    best, running = [], -1.0
    for t in sorted(complete, key=lambda t: t.number):
        running = max(running, t.values[0])
        best.append((t.number, running))
    if best:
        # The best so far holds until the study's last trial, not only its last completed one.
        last = max(t.number for t in trials if t.state.is_finished())
        best.append((max(last, best[-1][0]), running))
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are whole
    ax.set_xlabel("trial")
    ax.set_ylabel("supernet angle (radians)" if by_angle else "validation accuracy")
    ax.set_title(f"optimisation history: {study.study_name}", pad=28)
    # Above the axes, between the title and the plot: it can never hide a point.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def _plots(study: optuna.Study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    fig = history_figure(study)
    save_figure(fig, out / "history.png")
    plt.close(fig)
    # Accuracy vs OPs, with the non-dominated trained trials joined.
    fig, ax = plt.subplots(figsize=(7, 4))
    pts = [(t.user_attrs.get("ops", 0.0), t.values[0]) for t in complete]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=20, color="tab:blue", label="trained trials")
        front, top = [], -1.0
        for ops, acc in sorted(pts, key=lambda p: (p[0], -p[1])):
            if acc > top:
                front.append((ops, acc))
                top = acc
        ax.plot(
            [f[0] for f in front], [f[1] for f in front], "o-", color="tab:red", label="Pareto front (accuracy vs OPs)"
        )
        ax.set_xscale("log")
    bounds = study.user_attrs.get("constraints") or {}
    if bounds.get("max_ops"):
        ax.axvline(bounds["max_ops"], color="tab:gray", linestyle="--", label=f"OPs budget {bounds['max_ops']:,.0f}")
    if bounds.get("min_ops"):
        ax.axvline(bounds["min_ops"], color="tab:gray", linestyle=":", label=f"OPs floor {bounds['min_ops']:,.0f}")
    ax.set_xlabel("OPs (BOPs/64 + FLOPs)")
    ax.set_ylabel("validation accuracy")
    if ax.get_legend_handles_labels()[0]:  # nothing trained and no budget: no legend to draw
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "pareto.png")
    plt.close(fig)
    # Parameter importances (fANOVA over the completed trials).
    fig, ax = plt.subplots(figsize=(7, 4))
    importances = _importances(study)
    if importances:
        names = list(importances)[:15][::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:green")
        ax.set_xlabel("importance for validation accuracy (fANOVA)")
    else:
        ax.text(0.5, 0.5, "not enough completed trials for importances", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out / "importances.png")
    plt.close(fig)


def write_outputs(study: optuna.Study, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    again = retrained(study)
    for t in study.get_trials(deepcopy=False):
        writer.writerow(_row(t, again))
    write_text_atomic(out / "trials.csv", buf.getvalue())
    best = _best_trials(study)
    genotypes = out / "genotypes"
    objectives = study.user_attrs.get("objectives", ["val_acc"])
    if len(study.directions) == 1 and best:
        source = genotypes / f"trial-{best[0].number}.yaml"
        if source.is_file():
            load_genotype(source).to_yaml(
                out / "best.yaml",
                header=(
                    f"best of study {study.study_name!r}: trial {best[0].number}, validation accuracy {best[0].values[0]:.4f}"
                ),
            )
    elif best:
        front = {f"trial-{t.number}.yaml" for t in best}
        for old in (out / "pareto").glob("trial-*.yaml"):
            if old.name not in front:  # dominated since the last write (a resumed study)
                old.unlink()
        for t in best:
            source = genotypes / f"trial-{t.number}.yaml"
            if source.is_file():
                values = ", ".join(f"{o}={v:.4g}" for o, v in zip(objectives, t.values, strict=False))
                load_genotype(source).to_yaml(
                    out / "pareto" / f"trial-{t.number}.yaml",
                    header=f"Pareto-optimal in study {study.study_name!r}: {values}",
                )
    write_text_atomic(out / "summary.md", summary_text(study, out))
    _plots(study, out)
