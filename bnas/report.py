"""Run reports: ``report.json`` (everything), ``report.md`` (for people), ``curves.png``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import save_figure
from .yaml_io import write_text_atomic


def curves_figure(
    history: Sequence[Mapping[str, float]], title: str, labels: tuple[str, str] = ("train", "validation")
) -> Any:
    """Loss and accuracy per epoch, two panels (a matplotlib figure; the caller closes it);
    ``labels`` name the training and the validation series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label=labels[0])
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label=labels[1])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label=labels[0])
    ax_acc.plot(epochs, [r["val_acc"] for r in history], "s-", label=labels[1])
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    history: Sequence[Mapping[str, float]], path: Path, title: str, labels: tuple[str, str] = ("train", "validation")
) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(history, title, labels)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _markdown(report: Mapping[str, Any]) -> str:
    m = report["metrics"]
    lines = [
        f"# {report['genotype_name']} on {report['dataset']}",
        "",
        "| | |",
        "|---|---|",
        f"| test accuracy (final weights) | {report.get('test_acc', float('nan')):.4f} |",
        f"| test accuracy (best-validation weights) | {report.get('test_acc_best_val_checkpoint', float('nan')):.4f} |",
        f"| best validation accuracy | {report['best_val_acc']:.4f} (epoch {report['best_epoch']}) |",
        f"| epochs | {report['epochs_run']}{' (stopped early)' if report['stopped_early'] else ''} |",
        f"| wall time | {report['wall_time_s']:.1f} s ({report['samples_per_s']:.0f} samples/s) |",
        f"| device | {report['device']}, {report['threads']} threads |",
        f"| binary / real parameters | {m['params_binary']:,} / {m['params_real']:,} |",
        f"| BOPs / FLOPs / OPs | {m['bops']:,} / {m['flops']:,} / {m['ops']:,.0f} |",
        f"| model size | {m['size_bytes'] / 1024:,.1f} KiB ({m['compression']:.1f}x smaller than float32) |",
        "",
        "## Per epoch",
        "",
        "| epoch | train loss | train acc | val loss | val acc | lr | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["history"]:
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | {r['val_loss']:.4f} | {r['val_acc']:.4f} | {r['lr']:.2e} | {r['epoch_time_s']:.1f} |"
        )
    lines += [
        "",
        "![curves](curves.png)",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(report["recipe"], indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_report(out_dir: Path, report: Mapping[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out_dir / "report.md", _markdown(report))
    if report["history"]:
        plot_curves(report["history"], out_dir / "curves.png", f"{report['genotype_name']} on {report['dataset']}")
