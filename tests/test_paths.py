"""One cache-folder rule for everything bnas rebuilds (kernels, emulator, decoded data, the
default data root): ``$BNAS_CACHE/<kind>``, else ``$XDG_CACHE_HOME/bnas/<kind>``, else
``~/.cache/bnas/<kind>``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from bnas import data, paths
from bnas.kernels import cpu_backend


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cache variable set and a private home folder."""
    monkeypatch.delenv("BNAS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_default_is_the_user_cache(home: Path) -> None:
    assert paths.cache_root() == home / ".cache" / "bnas"
    assert paths.cache_dir("kernels") == home / ".cache" / "bnas" / "kernels"


def test_xdg_cache_home_is_honoured_and_empty_means_unset(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir("decoded") == tmp_path / "xdg" / "bnas" / "decoded"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert paths.cache_dir("decoded") == home / ".cache" / "bnas" / "decoded"


def test_bnas_cache_wins_over_xdg(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BNAS_CACHE", str(tmp_path / "mine"))
    assert paths.cache_dir("extensions") == tmp_path / "mine" / "extensions"
    monkeypatch.setenv("BNAS_CACHE", "~/elsewhere")
    assert paths.cache_root() == home / "elsewhere"


def test_asking_creates_nothing(home: Path) -> None:
    paths.cache_dir("kernels")
    assert not home.exists()


@pytest.mark.parametrize("kind", ["", ".", "..", "a/b"])
def test_a_kind_is_one_folder_name(kind: str) -> None:
    with pytest.raises(ValueError, match="one folder name"):
        paths.cache_dir(kind)


def test_every_cache_follows_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNAS_CACHE", str(tmp_path))
    monkeypatch.delenv("BNAS_DATA", raising=False)
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    assert cpu_backend.cache_dir().parent == tmp_path / "extensions" / tag
    assert data.data_root() == tmp_path / "data"
    # $BNAS_DATA stays the data root's own variable, and --data-root beats both.
    monkeypatch.setenv("BNAS_DATA", str(tmp_path / "datasets"))
    assert data.data_root() == tmp_path / "datasets"
    assert data.data_root(tmp_path / "given") == tmp_path / "given"


def test_the_emulator_builds_into_the_kernels_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its own variable is gone: $BNAS_CACHE/kernels holds the emulator. A "compiler" that
    # fails (``false``) stops the build after the folder is made, so none is needed here.
    from bnas.kernels import emulator

    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` command to stand in for a failing compiler")
    monkeypatch.setenv("BNAS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", failing)
    monkeypatch.setattr(emulator, "_emulator", None)
    with pytest.raises(RuntimeError, match="building the CUDA kernel emulator failed"):
        emulator.load_emulator()
    assert (tmp_path / "kernels").is_dir()
    assert not list((tmp_path / "kernels").iterdir())


def test_each_checkout_builds_the_cpu_kernels_in_a_folder_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's build names the source by its absolute path: two checkouts sharing one folder
    # rebuilt the kernels whenever the other one had built them last.
    monkeypatch.setenv("BNAS_CACHE", str(tmp_path))
    here = cpu_backend.cache_dir()
    assert cpu_backend.cache_dir() == here
    monkeypatch.setattr(cpu_backend, "SOURCE", tmp_path / "clone" / "bnas" / "kernels" / "csrc" / "xnor_cpu.cpp")
    there = cpu_backend.cache_dir()
    assert there != here and there.parent == here.parent
