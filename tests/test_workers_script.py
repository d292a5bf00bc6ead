"""benchmarks/workers.py: 1 and 2 workers timed in interleaved rounds, medians compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


def test_rounds_alternate_and_the_ratio_compares_median_walls(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_benchmark("workers")
    # Seconds each search "takes", by worker count, in the order they are asked for.
    walls = {1: [30.0, 36.0, 33.0], 2: [20.0, 28.0, 22.0]}
    calls: list[tuple[int, int, str]] = []

    def fake_run(workers: int, trials: int, tmp: Path) -> float:
        calls.append((workers, trials, tmp.name))
        return walls[workers].pop(0)

    monkeypatch.setattr(script, "run", fake_run)
    assert script.main(["--trials", "6", "--rounds", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    # Each round runs both configurations in its own folder, the first of the pair alternating.
    assert calls == [
        (1, 6, "round-0"),
        (2, 6, "round-0"),
        (2, 6, "round-1"),
        (1, 6, "round-1"),
        (1, 6, "round-2"),
        (2, 6, "round-2"),
    ]
    per_search = [line for line in lines if not line.get("summary")]
    assert [(line["round"], line["workers"], line["wall_s"]) for line in per_search] == [
        (0, 1, 30.0),
        (0, 2, 20.0),
        (1, 2, 28.0),
        (1, 1, 36.0),
        (2, 1, 33.0),
        (2, 2, 22.0),
    ]
    assert per_search[0]["trials_per_min"] == pytest.approx(6 / 0.5)
    (summary,) = [line for line in lines if line.get("summary")]
    # Medians: 33 s for one worker, 22 s for two; p90 is the slowest of three.
    assert summary["baseline_wall_s_median"] == 33.0 and summary["ours_wall_s_median"] == 22.0
    assert summary["baseline_wall_s_p90"] == 36.0 and summary["ours_wall_s_p90"] == 28.0
    assert summary["baseline_trials_per_min"] == pytest.approx(6 / (33 / 60), abs=0.01)
    assert summary["ours_trials_per_min"] == pytest.approx(6 / (22 / 60), abs=0.01)
    assert summary["ratio"] == 1.5


def test_rounds_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_benchmark("workers")
    with pytest.raises(SystemExit):
        script.main(["--rounds", "0"])
    assert "--trials and --rounds must be at least 1" in capsys.readouterr().err
