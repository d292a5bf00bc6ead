"""Issue 11, the search's part: no replayed genotypes on resume, failures reported early and
in one line (bad flags, unwritable --out, full disk, unsatisfiable constraints, too many
crashed trials, a missing PostgreSQL driver), and the history picture."""

from __future__ import annotations

import errno
import math
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import tiny_space, write_space
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from torch import nn

import bnas
from bnas.cli import main
from bnas.search.outputs import history_figure
from bnas.search.runner import Objective, SearchConfig, run_search_study
from bnas.search.space import load_space
from bnas.search.storage import SearchError, retry_db

# Small and quick: one epoch on a 128-image proxy of digits.
SPACE = tiny_space("rel", epochs=1, train_subset=128, pruner="none")


def _space(tmp_path: Path, text: str = SPACE, name: str = "space.yaml") -> Path:
    return write_space(tmp_path, text, name)


def _hashes(study: optuna.Study) -> list[str]:
    return [t.user_attrs["genotype_hash"] for t in sorted(study.trials, key=lambda t: t.number)]


def _duplicates(hashes: list[str]) -> int:
    return len(hashes) - len(set(hashes))


# --------------------------------------------------------------------------------------
# Defect 1: replays
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_resumed_study_proposes_what_one_uninterrupted_run_would(tmp_path: Path, sampler: str) -> None:
    space = load_space(_space(tmp_path))

    def run(out: str, trials: int) -> optuna.Study:
        return run_search_study(
            SearchConfig(space=space, out=tmp_path / out, trials=trials, progress=False, sampler=sampler, seed=5)
        )

    whole = _hashes(run("whole", 4))
    run("resumed", 2)  # stopped after 2 trials, then the same command again with the full count
    resumed = _hashes(run("resumed", 4))
    # A sampler seeded once per process replayed trials 0-1 as 2-3 here.
    assert resumed == whole
    assert _duplicates(resumed) <= _duplicates(whole)


def test_a_second_process_on_a_shared_study_draws_fresh_proposals(tmp_path: Path) -> None:
    # Two "hosts" (two SearchConfigs, each with its own sampler, as two processes have) take
    # turns on one journal-file study with the same seed; together they propose what one
    # uninterrupted process does.
    space = load_space(_space(tmp_path))
    storage = f"journal:{tmp_path / 'shared.journal'}"

    def host(out: str, trials: int, storage: str | None = storage) -> optuna.Study:
        return run_search_study(
            SearchConfig(
                space=space,
                out=tmp_path / out,
                trials=trials,
                progress=False,
                sampler="random",
                storage=storage,
                study_name="s1",
            )
        )

    host("host-a", 2)
    shared = _hashes(host("host-b", 4))
    alone = _hashes(host("alone", 4, storage=None))
    assert shared == alone and _duplicates(shared) <= _duplicates(alone)


def test_same_seed_fresh_study_is_reproducible_and_seeds_differ(tmp_path: Path) -> None:
    from bnas.search.runner import PerTrialSeeded, trial_seed
    from bnas.search.space import sample_genotype

    space = load_space(_space(tmp_path))

    def proposals(seed: int) -> list[str]:
        study = optuna.create_study(sampler=PerTrialSeeded("tpe", seed), direction="maximize")
        out = []
        for i in range(6):
            trial = study.ask()
            out.append(sample_genotype(trial, space).canonical_hash())
            study.tell(trial, 0.1 * i)
        return out

    assert proposals(7) == proposals(7) != proposals(8)
    assert len({trial_seed(7, n) for n in range(1000)}) == 1000


# --------------------------------------------------------------------------------------
# Defect 4: failures reported late
# --------------------------------------------------------------------------------------
@bnas.register_primitive("test_always_crashing_op", override=True)
def _always_crashing_op(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    class Crash(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:  # builds (probe batch 2), crashes in training
                raise RuntimeError("deliberate crash in training")
            return x[:, :, ::stride, ::stride]

    return Crash()


CRASHING = """
name: crash
dataset: digits
input: [1, 8, 8]
num_classes: 10
train_subset: 64
stem: [{op: conv_bn, channels: 8}]
cells: {ops: [test_always_crashing_op], nodes: 1, inputs: 1, edges_per_node: 1, combine: sum}
macro: {stages: 1, channels: [8, 16], cells_per_stage: [1, 2, 3]}
head: [{op: global_avgpool}, {op: linear}]
budget: {epochs: 1, batch_size: 64, optimizer: {name: adam, lr: 0.01}}
"""


def test_ten_failures_in_a_row_write_trials_csv_before_stopping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path, CRASHING)), "--trials", "20", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "10 trials in a row failed" in err and str(out / "trials.csv") in err and "Traceback" not in err
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 11 and all(",FAIL," in r and "deliberate crash in training" in r for r in rows[1:])


def _unsatisfiable_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], constraints: str
) -> tuple[str, list[str]]:
    """A 6-trial search whose ``constraints`` no genotype meets: its one-line error (checked to
    be one line, naming the 6 draws) and the rows of its ``trials.csv``."""
    text = SPACE.replace("name: rel", f"name: rel\nconstraints: {constraints}")
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path, text)), "--trials", "6", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: none of the 6 sampled genotypes meets the constraints") and "\n" not in err
    return err, (out / "trials.csv").read_text().splitlines()


def test_unsatisfiable_constraint_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err, rows = _unsatisfiable_search(tmp_path, capsys, "{max_ops: 10}")
    assert "max_ops 10 (smallest sampled:" in err and "Loosen `constraints:`" in err
    assert len(rows) == 7


def test_a_floor_above_every_genotype_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err, rows = _unsatisfiable_search(tmp_path, capsys, "{min_ops: 1.0e+12}")
    assert "min_ops 1e+12 (largest sampled:" in err and "Lower min_ops or offer larger choices" in err
    assert "Loosen" not in err  # no ceiling was broken, so no advice to loosen one
    assert len(rows) == 7 and all("< min_ops 1e+12" in r for r in rows[1:])


def test_many_over_budget_draws_stop_before_the_trial_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnas.search.constraints as constraints

    monkeypatch.setattr(constraints, "UNSATISFIABLE_AFTER", 5)  # 25 in use; fewer draws keep the test quick
    text = SPACE.replace("name: rel", "name: rel\nconstraints: {max_ops: 10}")
    space = load_space(_space(tmp_path, text))
    with pytest.raises(SearchError, match="none of the 5 sampled genotypes"):
        run_search_study(SearchConfig(space=space, out=tmp_path / "run", trials=1000, progress=False))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--timeout", "nan"], "--timeout must be a positive, finite number"),
        (["--timeout", "inf"], "--timeout must be a positive, finite number"),
        (["--timeout", "-1"], "--timeout must be a positive, finite number"),
        (["--devices", "0,1"], "but this run uses --device cpu"),
        (["--devices", "0,x", "--workers", "2"], "--devices takes comma-separated GPU numbers"),
        (["--workers", "2", "--storage", "sqlite:///x.db"], "SQLite locks the file against several writing processes"),
        (["--device", "tpu"], "tpu"),
        (["--device", "cuda:abc"], "cuda:abc"),
        (["--device", "meta"], "meta"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path)), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path)), "--out", str(out), "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not out.exists()  # no study, no trial burnt


def test_postgres_url_without_the_driver_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for driver in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, driver, None)  # as if not installed
    code = main(
        [
            "search",
            str(_space(tmp_path)),
            "--out",
            str(tmp_path / "run"),
            "--quiet",
            "--storage",
            "postgresql://bnas:secret@127.0.0.1:1/none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and 'pip install -e ".[postgres]"' in err and "appropriate" not in err and "secret" not in err


# --------------------------------------------------------------------------------------
# Defect 2: unwritable --out, full disk
# --------------------------------------------------------------------------------------
def test_out_under_a_file_is_one_line_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["search", str(_space(tmp_path)), "--out", str(blocker / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'run'} is not writable" in err and "Traceback" not in err


def test_read_only_out_is_one_line_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only_dir: Path
) -> None:
    assert main(["search", str(_space(tmp_path)), "--out", str(read_only_dir / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_disk_full_during_a_trial_stops_at_once_and_keeps_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    space = _space(tmp_path)
    assert main(["search", str(space), "--trials", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()

    def full(self: Objective, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "genotypes"))

    monkeypatch.setattr(Objective, "_write_genotype", full)
    assert main(["search", str(space), "--trials", "5", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the disk is full") and "\n" not in err
    assert "keeps every trial finished so far" in err and "rerun the same command to resume" in err
    study = optuna.load_study(study_name="rel", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    # Stopped at the first full-disk trial, not after 10 failures; the two finished trials stay.
    assert states[:2] == [TrialState.COMPLETE] * 2 and states[2:] == [TrialState.FAIL]
    assert study.trials[2].user_attrs["error"].startswith("disk full")


def test_disk_full_while_writing_outputs_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bnas.search.outputs as outputs

    def full(path: object, text: str, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "write_text_atomic", full)
    assert main(["search", str(_space(tmp_path)), "--trials", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full while writing the search's outputs" in err and "--show" in err and "Traceback" not in err


def test_full_study_database_is_not_retried(tmp_path: Path) -> None:
    from sqlalchemy.exc import OperationalError

    calls = []

    def insert() -> None:
        calls.append(1)
        raise OperationalError("INSERT INTO trials", {}, Exception("database or disk is full"))

    with pytest.raises(SearchError, match="free some space and rerun the same command"):
        retry_db("record a trial", insert, patience_s=60.0)
    assert calls == [1]  # waiting does not free space


def test_retry_db_sees_the_database_error_behind_another_and_stops_at_its_patience(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr("bnas.search.storage.time.sleep", lambda s: None)
    calls: list[int] = []

    def tell_failed() -> None:
        # As Optuna 5.0's _run_trial raises when the tell and the read-back both fail.
        calls.append(1)
        try:
            raise OperationalError("UPDATE trials", {}, Exception("server closed the connection"))
        except OperationalError:
            raise UnboundLocalError("cannot access local variable 'updated_state'")  # noqa: B904 (as Optuna does)

    monkeypatch.setenv("BNAS_DB_PATIENCE_S", "3")
    with pytest.raises(SearchError, match="lost the study database for 4 s while trying to run a trial"):
        retry_db("run a trial", tell_failed)
    assert len(calls) == 4  # back-off 0.5 + 1 + 2 s, then past the 3 s limit
    delays = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert [d.rsplit(" ", 2)[1] for d in delays] == ["0.5", "1.0", "2.0"]

    def own_error() -> None:  # a bnas error is final, whatever it was raised from
        try:
            raise OperationalError("SELECT", {}, Exception("gone"))
        except OperationalError:
            raise SearchError("cannot open the study storage") from None

    calls.clear()
    with pytest.raises(SearchError, match="cannot open the study storage"):
        retry_db("open the study", own_error)
    monkeypatch.setenv("BNAS_DB_PATIENCE_S", "soon")
    with pytest.raises(SearchError, match="BNAS_DB_PATIENCE_S must be a number of seconds"):
        retry_db("open the study", lambda: None)


# --------------------------------------------------------------------------------------
# Defect 10: history.png
# --------------------------------------------------------------------------------------
def test_history_picture_best_line_to_the_last_trial_integer_ticks_legend_clear() -> None:
    study = optuna.create_study(direction="maximize")
    dist = {"x": CategoricalDistribution([0, 1])}
    for number, (state, acc) in enumerate(
        [
            (TrialState.COMPLETE, 0.6),
            (TrialState.COMPLETE, 0.9),
            (TrialState.PRUNED, 0.12),
            (TrialState.PRUNED, 0.1),
            (TrialState.PRUNED, 0.11),
        ]
    ):
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                params={"x": number % 2},
                distributions=dist,
                user_attrs={"val_acc": acc},
                value=acc if state == TrialState.COMPLETE else None,
                intermediate_values={1: acc},
            )
        )
    fig = history_figure(study)
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        best = ax.lines[0]
        assert list(best.get_xdata())[-1] == 4 and list(best.get_ydata())[-1] == 0.9
        # No trial's point lies under the legend.
        legend_box = ax.get_legend().get_window_extent()
        points = ax.transData.transform([(t.number, t.user_attrs["val_acc"]) for t in study.trials])
        assert not any(legend_box.contains(x, y) for x, y in points)
        assert not any(math.isnan(v) for v in points.ravel())
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_workers_parent_exits_2_when_a_worker_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --workers parent writes the outputs of what finished, then says which worker stopped
    early and exits 2: a worker's failure is not hidden behind exit code 0."""
    import bnas.cli.search as search_command

    def one_worker_fails(args: object, cfg: SearchConfig) -> tuple[optuna.Study, list[int]]:
        return run_search_study(cfg), [0, 2]

    monkeypatch.setattr(search_command, "_run_workers", one_worker_fails)
    out = tmp_path / "run"
    assert main(["search", str(_space(tmp_path)), "--trials", "1", "--workers", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: worker(s) 1 (exit 2) stopped early" in err and "Traceback" not in err
    assert (out / "trials.csv").is_file()


def test_database_error_in_a_heartbeat_thread_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Optuna's heartbeat thread dies with a traceback when the database goes away; the worker
    reports the outage itself, so that thread's death is one warning line. Other thread errors
    still reach the previous hook."""
    import threading

    import sqlalchemy.exc

    import bnas.search.storage as storage

    seen: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    monkeypatch.setattr(storage, "_previous_thread_hook", None)
    storage.quiet_database_errors_in_threads()

    def lost_database() -> None:
        try:
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("terminating connection"))
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc

    def a_bug() -> None:
        raise ValueError("not a database error")

    with caplog.at_level("WARNING", logger="bnas.search.storage"):
        for target in (lost_database, a_bug):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
    assert [r.getMessage() for r in caplog.records] == [
        "heartbeat not recorded: database unavailable (An exception is raised during the commit.)"
    ]
    assert len(seen) == 1 and isinstance(seen[0], ValueError)
