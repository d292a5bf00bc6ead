"""Atomic writes honour the umask (issue 11, defect 6); output locations are checked up front."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bnas.atomic import WriteError, atomic_path, check_writable_dir, check_writable_file, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_write_text_atomic_honours_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text_atomic(tmp_path / "g.yaml", "name: x\n")
    assert _mode(tmp_path / "g.yaml") == expected
    assert (tmp_path / "g.yaml").read_text() == "name: x\n"


def test_yaml_io_write_text_atomic_honours_umask(tmp_path, umask):
    # the genotype writer other modules import from yaml_io (it used mkstemp: always 0600)
    from bnas.yaml_io import write_text_atomic as yaml_write

    umask(0o002)
    yaml_write(tmp_path / "g.yaml", "name: x\n")
    assert _mode(tmp_path / "g.yaml") == 0o664
    assert list(tmp_path.iterdir()) == [tmp_path / "g.yaml"]  # no temp file left behind


def test_saved_genotype_honours_umask(tmp_path, umask):
    from bnas import load_genotype

    umask(0o022)
    genotype = load_genotype(Path(__file__).resolve().parents[1] / "search_spaces" / "genotypes" / "digits_small.yaml")
    genotype.to_yaml(tmp_path / "saved.yaml")
    assert _mode(tmp_path / "saved.yaml") == 0o644


def test_checkpoint_honours_umask(tmp_path, umask):
    import torch

    from bnas.train import save_checkpoint

    umask(0o002)
    save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.zeros(2)})
    assert _mode(tmp_path / "checkpoint.pt") == 0o664


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            _ = 1 / 0  # a bug in the writer keeps its own exception and traceback
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_disk_failure_is_one_line_and_says_what_is_kept(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_text("old")
    with pytest.raises(WriteError) as info:
        with atomic_path(target, "checkpoint") as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message and "no space left on device" in message
    assert "previous file there is unchanged" in message
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_torch_stream_failure_is_a_write_error(tmp_path):
    # torch.save on a full disk raises a RuntimeError, not an OSError
    with pytest.raises(WriteError, match="nothing was written there"):
        with atomic_path(tmp_path / "model.pt", "model"):
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\nbasic_ios::clear")


def test_check_writable_dir_makes_a_missing_folder(tmp_path):
    check_writable_dir(tmp_path / "a" / "b", "--out")
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone


def test_check_writable_dir_refuses_a_read_only_folder(read_only_dir):
    ro = read_only_dir
    with pytest.raises(WriteError) as info:
        check_writable_dir(ro, "--out")
    assert str(info.value).startswith(f"--out {ro} is not writable: ")
    assert str(info.value).endswith("; choose another folder")
    assert "\n" not in str(info.value)


def test_check_writable_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(WriteError, match="exists and is not a folder"):
        check_writable_dir(tmp_path / "f", "--out")
    with pytest.raises(WriteError, match="not writable"):
        check_writable_dir(tmp_path / "f" / "sub", "--out")


def test_check_writable_file(tmp_path, read_only_dir):
    check_writable_file(tmp_path / "new" / "model.bnas", "--out")
    assert (tmp_path / "new").is_dir()
    with pytest.raises(WriteError, match=r"is an existing folder; --out takes a file path, e\.g\. .*model\.bnas"):
        check_writable_file(tmp_path, "--out", example="model.bnas")
    ro = read_only_dir
    with pytest.raises(WriteError, match="is not writable: its folder"):
        check_writable_file(ro / "graph.png", "--graph")


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_writes_the_suffix_format_atomically(tmp_path, umask, suffix, magic):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnas.atomic import save_figure

    umask(0o002)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / f"picture{suffix}")
    plt.close(fig)
    assert path.read_bytes().startswith(magic)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
