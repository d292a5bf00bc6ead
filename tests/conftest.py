"""Fixtures shared by several test files."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in which no file can be created: chmod 555 for an ordinary user, or, as root
    (who ignores file modes), a sysfs folder, which is read-only for everyone."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except OSError:
        yield ro
        ro.chmod(0o755)
        return
    (ro / "probe").unlink()
    ro.chmod(0o755)
    for candidate in (Path("/sys/kernel"), Path("/proc/self")):
        try:
            (candidate / "bnas-probe").touch()
        except OSError:
            yield candidate
            return
    pytest.skip("no read-only folder on this machine")
