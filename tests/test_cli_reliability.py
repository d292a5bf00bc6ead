"""The CLI's own commands (``info``) on bad output locations: one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnas.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CELLS = ROOT / "search_spaces" / "genotypes" / "example_cells.yaml"


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_info_graph_into_a_read_only_folder_is_one_line(
    capsys: pytest.CaptureFixture[str], read_only_dir: Path
) -> None:
    target = read_only_dir / "cells.png"
    assert main(["info", str(EXAMPLE_CELLS), "--graph", str(target)]) == 2
    assert f"--graph {target} is not writable" in _one_line_error(capsys)


def test_info_graph_onto_an_existing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(EXAMPLE_CELLS), "--graph", str(tmp_path)]) == 2
    assert "is an existing folder" in _one_line_error(capsys)


DIGITS_SMALL = ROOT / "search_spaces" / "genotypes" / "digits_small.yaml"


@pytest.mark.parametrize("flags, epoch_lines", [([], True), (["-q"], False), (["-v"], True)])
def test_log_level_flags(
    flags: list[str], epoch_lines: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [*flags, "eval", str(DIGITS_SMALL), "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "run")]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert ("epoch 1/1" in err) is epoch_lines, err


def test_verbose_and_quiet_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["-v", "-q", "primitives"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_training_curves_have_whole_epoch_ticks() -> None:
    import matplotlib.pyplot as plt

    from bnas.report import curves_figure

    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.5 + e / 11}
        for e in (1, 2)
    ]
    fig = curves_figure(history, "two epochs")
    try:
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)
