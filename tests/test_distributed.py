"""Distributed search: several workers on one study (PostgreSQL, journal file), a worker
killed mid-trial, workers riding out a short database outage, and a worker stopping cleanly
when the database stays away past its limit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
from conftest import tiny_space, write_space

REPO = Path(__file__).resolve().parents[1]
SPACE = tiny_space(
    "dist", ops=["binary_conv_3x3", "skip_connect", "bireal_block", "binary_dil_conv_3x3"], epochs=3, pruner="none"
)


@pytest.fixture(autouse=True)
def short_orphan_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial created just before a database outage, whose worker never got to name itself,
    is failed after 15 s instead of 120: every worker here runs on this host, so there is no
    clock skew to allow for. (The outage test sometimes leaves one; it then took 141 s.)"""
    monkeypatch.setenv("BNAS_ORPHAN_GRACE_S", "15")


def _pg_url() -> str:
    url = os.environ.get("BNAS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set BNAS_TEST_POSTGRES_URL (scripts/pg_test_server.sh start prints one)")
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url).connect().close()
    except Exception as exc:  # any driver error means: not reachable
        if os.environ.get("CI"):
            raise AssertionError(f"CI must reach its PostgreSQL server at {url}: {exc}") from exc
        pytest.skip(f"PostgreSQL at {url} is not reachable: {exc}")
    return url


def _space(tmp_path: Path) -> Path:
    return write_space(tmp_path, SPACE)


def _cmd(space: Path, out: Path, *extra: str, quiet: bool = True) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bnas",
        "search",
        str(space),
        "--out",
        str(out),
        *(["--quiet"] if quiet else []),
        *extra,
    ]


def _check_study(study: optuna.Study, out: Path, total: int) -> None:
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == total
    trained = [t.user_attrs["genotype_hash"] for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(trained) == len(set(trained)), "a genotype was trained twice"
    for t in complete:
        assert (out / "genotypes" / f"trial-{t.number}.yaml").is_file()


def test_journal_file_workers_without_server(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        _cmd(_space(tmp_path), out, "--workers", "2", "--trials", "5"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name="dist", storage=storage)
    _check_study(study, out, 5)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2


def test_two_hosts_with_the_same_command_replay_nothing(tmp_path: Path) -> None:
    # The README's several-hosts recipe on one machine: the very same `bnas search` command
    # started twice on one shared storage. Each trial number is drawn once, so together they
    # propose what one uninterrupted process proposes (a sampler seeded once per process made
    # the second host repeat the first one's proposals).
    from bnas.search.runner import SearchConfig, run_search_study
    from bnas.search.space import load_space

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("epochs: 3", "epochs: 1").replace("name: dist", "name: dist\ntrain_subset: 128"))
    journal = tmp_path / "study.journal"
    cmd = _cmd(
        space,
        tmp_path / "run",
        "--trials",
        "6",
        "--storage",
        f"journal:{journal}",
        "--study",
        "s1",
        "--sampler",
        "random",
    )
    hosts = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for h in hosts:
        assert h.wait(timeout=600) == 0, h.stderr.read()[-2000:]
    study = optuna.load_study(
        study_name="s1",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    shared = {t.number: t.user_attrs["genotype_hash"] for t in study.trials if t.state.name == "COMPLETE"}
    assert len(shared) == 6 and len({t.user_attrs["worker"] for t in study.trials}) == 2
    alone_study = run_search_study(
        SearchConfig(
            space=load_space(space), out=tmp_path / "alone", trials=max(shared) + 1, sampler="random", progress=False
        )
    )
    alone = {t.number: t.user_attrs["genotype_hash"] for t in alone_study.trials}
    assert all(shared[n] == alone[n] for n in shared)
    assert len(shared) - len(set(shared.values())) <= len(alone) - len(set(alone.values()))


@pytest.mark.postgres
def test_three_workers_on_postgres(tmp_path: Path) -> None:
    url = _pg_url()
    name = f"three-{os.getpid()}-{time.time_ns()}"
    out = tmp_path / "run"
    proc = subprocess.run(
        _cmd(_space(tmp_path), out, "--workers", "3", "--trials", "6", "--storage", url, "--study", name),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = optuna.load_study(study_name=name, storage=url)
    _check_study(study, out, 6)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 3


def _trials(name: str, storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=storage).trials
    except KeyError:  # the workers have not created the study yet
        return []


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _freeze_a_worker_mid_trial(name: str, storage: optuna.storages.BaseStorage) -> tuple[optuna.trial.FrozenTrial, int]:
    """Stop (SIGSTOP) a worker and return the trial it is running and its PID.

    A trial seen RUNNING may finish before a kill lands; a stopped worker cannot write, so a
    trial still RUNNING after the stop is certain to be cut off by the kill."""
    deadline = time.time() + 300
    while time.time() < deadline:
        running = [t for t in _trials(name, storage) if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        for candidate in running:
            pid = int(candidate.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGSTOP)
            now = next(t for t in _trials(name, storage) if t.number == candidate.number)
            if now.state.name == "RUNNING":
                return now, pid
            os.kill(pid, signal.SIGCONT)  # it finished in between: let it go on
        time.sleep(0.2)
    raise AssertionError("no worker could be stopped in the middle of a trial")


@pytest.mark.postgres
def test_sigkill_one_worker_mid_trial(tmp_path: Path) -> None:
    url = _pg_url()
    name = f"kill-{os.getpid()}-{time.time_ns()}"
    out = tmp_path / "run"
    space = _space(tmp_path)
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    cmd = _cmd(space, out, "--trials", "6", "--storage", url, "--study", name, "--heartbeat", "2")
    workers = [
        subprocess.Popen(cmd + ["--seed", str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(3)
    ]
    storage = optuna.storages.RDBStorage(url)

    def running_after_a_completion() -> bool:
        trials = optuna.load_study(study_name=name, storage=storage).trials
        return any(t.state.name == "COMPLETE" for t in trials) and any(
            t.state.name == "RUNNING" and "worker" in t.user_attrs for t in trials
        )

    _wait_for(running_after_a_completion, 300, "a running trial after a completed one")
    victim, pid = _freeze_a_worker_mid_trial(name, storage)
    completed_before = {t.number: t.values for t in _trials(name, storage) if t.state.name == "COMPLETE"}
    os.kill(pid, signal.SIGKILL)
    for w in workers:
        w.wait(timeout=600)
    study = optuna.load_study(study_name=name, storage=storage)
    by_number = {t.number: t for t in study.trials}
    assert by_number[victim.number].state.name == "FAIL"
    retried = [
        t
        for t in study.trials
        if t.user_attrs.get("retry_of") == victim.number or t.system_attrs.get("failed_trial") == victim.number
    ]
    assert retried, "the killed trial was not retried"
    for number, values in completed_before.items():
        assert by_number[number].state.name == "COMPLETE" and by_number[number].values == values
    _check_study(study, out, 6)


def _server(action: str, data_dir: str, url: str) -> None:
    """Stop or start the test server where it was (its data folder and port)."""
    env = {**os.environ, "BNAS_PG_PORT": str(urlsplit(url).port or 5432)}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "pg_test_server.sh"), action, data_dir],
        check=True,
        capture_output=True,
        env=env,
    )


def _restartable_server() -> tuple[str, str]:
    url = _pg_url()
    data_dir = os.environ.get("BNAS_TEST_POSTGRES_DIR")
    if not data_dir:
        pytest.skip("set BNAS_TEST_POSTGRES_DIR (the server's data folder) to stop and start the server")
    return url, data_dir


def _completed_before_outage(name: str, url: str) -> dict[int, list[float] | None]:
    """Wait for a completed trial, then let go of this process's connections (the server is
    about to stop); returns the completed trials' values."""
    storage = optuna.storages.RDBStorage(url)
    _wait_for(lambda: any(t.state.name == "COMPLETE" for t in _trials(name, storage)), 300, "a completed trial")
    before = {t.number: t.values for t in _trials(name, storage) if t.state.name == "COMPLETE"}
    storage.remove_session()
    storage.engine.dispose()
    return before


def _assert_kept(name: str, url: str, before: dict[int, list[float] | None]) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))
    by_number = {t.number: t for t in study.trials}
    for number, values in before.items():
        assert by_number[number].state.name == "COMPLETE" and by_number[number].values == values
    return study


RETRY = re.compile(r"database unavailable \((\w+)\); retrying in ([0-9.]+) s")


@pytest.mark.postgres
def test_workers_ride_out_a_short_database_outage(tmp_path: Path) -> None:
    url, data_dir = _restartable_server()
    name = f"outage-{os.getpid()}-{time.time_ns()}"
    out = tmp_path / "run"
    # Not --quiet: whatever --quiet hides, the retries this test counts must be shown.
    cmd = _cmd(
        _space(tmp_path),
        out,
        "--workers",
        "2",
        "--trials",
        "6",
        "--storage",
        url,
        "--study",
        name,
        "--heartbeat",
        "2",
        quiet=False,
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    before = _completed_before_outage(name, url)
    _server("stop", data_dir, url)
    try:
        # Longer than the first back-off steps (0.5 + 1 + 2 s): a worker that meets the
        # outage must wait more than once; far shorter than the 90 s it waits at most.
        time.sleep(6)
    finally:
        _server("start", data_dir, url)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    delays = [float(d) for _, d in RETRY.findall(err)]
    assert delays, f"no worker retried while the database was down:\n{err[-3000:]}"
    assert max(delays) > min(delays) == 0.5, f"no back-off in the retries: {delays}"
    assert "lost the study database" not in err
    _check_study(_assert_kept(name, url, before), out, 6)


@pytest.mark.postgres
def test_worker_stops_cleanly_after_the_outage_limit(tmp_path: Path) -> None:
    url, data_dir = _restartable_server()
    name = f"lost-{os.getpid()}-{time.time_ns()}"
    out = tmp_path / "run"
    space = _space(tmp_path)
    cmd = _cmd(space, out, "--trials", "6", "--storage", url, "--study", name, "--heartbeat", "2", quiet=False)
    env = {**os.environ, "BNAS_DB_PATIENCE_S": "2"}  # 90 s in use; the limit is what is tested
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    before = _completed_before_outage(name, url)
    _server("stop", data_dir, url)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        _server("start", data_dir, url)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err[-3000:]
    assert errors[0].startswith("error: lost the study database for ")
    assert "stopping this worker" in errors[0] and "rerun the same command when it is back" in errors[0]
    waited = [float(d) for _, d in RETRY.findall(err)]
    assert waited and sum(waited) >= 2, f"stopped before the limit: {waited}"
    _assert_kept(name, url, before)
    # What it said: the same command, rerun with the database back, finishes the study.
    assert subprocess.run(cmd, capture_output=True, timeout=900).returncode == 0
    _check_study(_assert_kept(name, url, before), out, 6)
