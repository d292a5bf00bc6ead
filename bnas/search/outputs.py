"""What a search leaves behind: trials.csv, best.yaml or pareto/*.yaml, summary.md, plots.

Everything is derived from the study in storage, so ``bnas search --show RUN`` (and a
resumed search) rewrites the same files from the same source of truth.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..genotype import load_genotype
from ..yaml_io import write_text_atomic
from .runner import epochs_saved

__all__ = ["write_outputs", "summary_text"]

_COLUMNS = ["number", "state", "values", "val_acc", "ops", "size_bytes", "params", "epochs", "duration_s",
            "genotype_hash", "duplicate_of", "constraint", "error"]


def _row(t: FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
    return {
        "number": t.number, "state": t.state.name, "values": json.dumps(t.values) if t.values else "",
        "val_acc": a.get("val_acc", ""), "ops": a.get("ops", ""), "size_bytes": a.get("size", ""),
        "params": a.get("params", ""), "epochs": a.get("epochs", ""), "duration_s": round(duration, 3) if duration != "" else "",
        "genotype_hash": a.get("genotype_hash", ""), "duplicate_of": a.get("duplicate_of", ""),
        "constraint": a.get("constraint", ""), "error": a.get("error", ""),
    }


def _best_trials(study: optuna.Study) -> list[FrozenTrial]:
    try:
        return study.best_trials
    except ValueError:
        return []


def summary_text(study: optuna.Study, out: Path) -> str:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    trained, saved = epochs_saved(study)
    objectives = study.user_attrs.get("objectives", ["val_acc"])
    lines = [
        f"# Search {study.study_name!r}",
        "",
        f"- objectives: {', '.join(objectives)} ({', '.join(d.name.lower() for d in study.directions)})",
        f"- trials: {count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned or over budget, "
        f"{count[TrialState.FAIL]} failed, {count[TrialState.RUNNING]} running",
        f"- training epochs: {trained} trained; {saved} saved by pruning, budget constraints and duplicate detection "
        f"(of {trained + saved} that full training of every finished trial would take)",
    ]
    if len(study.directions) > 1:
        lines.append("- multi-objective: Optuna cannot prune multi-objective studies, so every trial trained its full budget")
    best = _best_trials(study)
    if best and len(study.directions) == 1:
        b = best[0]
        lines += ["", f"## Best: trial {b.number}", "",
                  f"validation accuracy {b.values[0]:.4f}, OPs {b.user_attrs.get('ops', 0):,.0f}, "
                  f"size {b.user_attrs.get('size', 0) / 1024:,.1f} KiB; genotype: `{out / 'best.yaml'}`"]
    elif best:
        lines += ["", f"## Pareto front ({len(best)} genotypes, in `{out / 'pareto'}`)", "",
                  "| trial | " + " | ".join(objectives) + " |", "|---" * (len(objectives) + 1) + "|"]
        for t in sorted(best, key=lambda t: -t.values[0]):
            lines.append(f"| {t.number} | " + " | ".join(f"{v:.4g}" for v in t.values) + " |")
    lines += ["", "Plots: `history.png`, `pareto.png`, `importances.png`; all trials: `trials.csv`.", ""]
    return "\n".join(lines)


def _plots(study: optuna.Study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "val_acc" in t.user_attrs and t.user_attrs["val_acc"] is not None]
    # Optimisation history: every trial's validation accuracy and the running best.
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [t.number for t in finished]
    ys = [t.user_attrs["val_acc"] for t in finished]
    colors = ["tab:blue" if t.state == TrialState.COMPLETE else "tab:gray" for t in finished]
    ax.scatter(xs, ys, c=colors, s=20, label="trials (gray: pruned)")
    best, run = [], -1.0
    for t in sorted(complete, key=lambda t: t.number):
        run = max(run, t.values[0])
        best.append((t.number, run))
    if best:
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=100)
    plt.close(fig)
    # Accuracy vs OPs, with the Pareto-optimal trials marked.
    fig, ax = plt.subplots(figsize=(7, 4))
    pts = [(t.user_attrs.get("ops", 0), t.user_attrs["val_acc"], t.number) for t in finished]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=20, color="tab:blue", label="trials")
        front, best_acc = [], -1.0
        for ops, acc, num in sorted(pts):
            if acc > best_acc:
                front.append((ops, acc))
                best_acc = acc
        ax.plot([f[0] for f in front], [f[1] for f in front], "o-", color="tab:red", label="Pareto front (accuracy vs OPs)")
        ax.set_xscale("log")
    ax.set_xlabel("OPs (BOPs/64 + FLOPs)")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)
    # Parameter importances (fANOVA) need a few completed trials with varying parameters.
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        importances = optuna.importance.get_param_importances(study, target=(lambda t: t.values[0]) if len(study.directions) > 1 else None)
    except (RuntimeError, ValueError, ZeroDivisionError):
        importances = {}
    if importances:
        names = list(importances)[:15][::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:green")
        ax.set_xlabel("importance for validation accuracy (fANOVA)")
    else:
        ax.text(0.5, 0.5, "not enough completed trials for importances", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "importances.png", dpi=100)
    plt.close(fig)


def write_outputs(study: optuna.Study, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_COLUMNS)
    writer.writeheader()
    for t in study.get_trials(deepcopy=False):
        writer.writerow(_row(t))
    write_text_atomic(out / "trials.csv", buf.getvalue())
    best = _best_trials(study)
    genotypes = out / "genotypes"
    if len(study.directions) == 1 and best:
        source = genotypes / f"trial-{best[0].number}.yaml"
        if source.is_file():
            g = load_genotype(source)
            g.to_yaml(out / "best.yaml", header=f"best of study {study.study_name!r}: trial {best[0].number}, val acc {best[0].values[0]:.4f}")
    elif best:
        for t in best:
            source = genotypes / f"trial-{t.number}.yaml"
            if source.is_file():
                values = ", ".join(f"{o}={v:.4g}" for o, v in zip(study.user_attrs.get("objectives", []), t.values))
                load_genotype(source).to_yaml(out / "pareto" / f"trial-{t.number}.yaml", header=f"Pareto-optimal in study {study.study_name!r}: {values}")
    write_text_atomic(out / "summary.md", summary_text(study, out))
    _plots(study, out)
