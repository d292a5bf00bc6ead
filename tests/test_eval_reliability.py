"""bnas eval under bad input and faults: one line and exit code 2, never a traceback, and
what was saved stays usable (issue 11: devices, damaged checkpoints, unwritable --out, full
disk, Ctrl-C)."""

from __future__ import annotations

import errno
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bnas
from bnas.cli import main
from bnas.data import load_dataset
from bnas.errors import BnasError
from bnas.evaluate import resolve_device
from bnas.genotype import loads_genotype
from bnas.train import Recipe, Trainer, load_checkpoint

MLP = """
name: digits_mlp
input: [1, 8, 8]
num_classes: 10
stem:
  - {op: flatten}
body:
  - {op: binary_linear, channels: 64, binarize: {activation: none, weight: sign, latent_clip: glorot}}
  - {op: binary_linear, channels: 64}
head:
  - {op: linear}
training:
  optimizer: {name: adam, lr: 0.01}
  batch_size: 64
  epochs: 1
"""
# torch.save's error on a full disk (the stream cannot be written to the end).
DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _genotype(tmp_path: Path, text: str = MLP, name: str = "mlp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------
# --device
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["tpu", "cuda:abc", "meta", "garbage", "", "cuda:-1", "cpu:1"])
def test_bad_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str) -> None:
    genotype = _genotype(tmp_path)
    assert main(["eval", str(genotype), "--device", device, "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert "--device" in err and ("cpu, cuda, cuda:N" in err or "use --device cpu" in err)
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_meta_device_says_it_cannot_train() -> None:
    with pytest.raises(BnasError, match="--device meta holds no data.*nothing can train"):
        resolve_device("meta")


def test_accepted_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device(None).type in ("cpu", "cuda")


def test_gpu_index_past_the_visible_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine with two GPUs, as far as resolve_device can tell.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(BnasError, match=r"--device cuda:7: torch sees 2 CUDA device\(s\) here \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:7")
    # And on a machine without one, every cuda form is refused the same way.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(BnasError, match="torch sees no CUDA device here; use --device cpu"):
            resolve_device(name)


# --------------------------------------------------------------------------------------
# --resume with a damaged or foreign checkpoint.pt
# --------------------------------------------------------------------------------------
class _Foreign:
    """A class that a hostile or foreign checkpoint might pickle."""


def _trainer_checkpoint(out: Path, genotype_text: str = MLP) -> Path:
    """A real trainer checkpoint for ``genotype_text``, written without training."""
    genotype = loads_genotype(genotype_text)
    trainer = Trainer(
        bnas.build(genotype), load_dataset("digits"), Recipe.from_dict(genotype.training), out_dir=out, progress=False
    )
    trainer._save()
    return out / "checkpoint.pt"


def _damage(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(b"\x00" + os.urandom(4095))  # not torch's zip or pickle magic
    elif kind == "truncated":
        _trainer_checkpoint(path.parent)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickled_object":
        torch.save({"model": _Foreign()}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"epoch": 1}))
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "state_dict":
        torch.save(bnas.build(loads_genotype(MLP)).state_dict(), path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["empty", "random", "truncated", "pickled_object", "plain_pickle", "tensor", "state_dict"]
)
def test_resume_from_a_bad_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "run"
    _damage(kind, out / "checkpoint.pt")
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(out), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert str(out / "checkpoint.pt") in err
    assert "without --resume" in err and "delete it" in err
    # Never torch's advice to unpickle a possibly hostile file.
    assert "weights_only" not in err and "weights only" not in err.lower()


def test_bad_checkpoint_messages_say_what_is_wrong(tmp_path: Path) -> None:
    for kind, expected in [
        ("empty", "is empty (0 bytes)"),
        ("random", "not a PyTorch checkpoint"),
        ("truncated", "truncated or damaged"),
        ("pickled_object", "Python objects other than tensors"),
        ("tensor", "holds a Tensor, not a bnas checkpoint"),
    ]:
        path = tmp_path / kind / "checkpoint.pt"
        _damage(kind, path)
        with pytest.raises(BnasError, match=re.escape(expected)):
            load_checkpoint(path)


def test_resume_with_another_width_names_the_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # The run was started with a 32-wide second layer; the genotype now says 64.
    _trainer_checkpoint(out, MLP.replace("{op: binary_linear, channels: 64}", "{op: binary_linear, channels: 32}"))
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(out), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert "tensor body.1.op.0.weight has shape [32, 64] in the checkpoint but [64, 64] in this network" in err
    assert "another genotype or width" in err


def test_resume_with_another_genotype_names_the_missing_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _trainer_checkpoint(out, MLP.replace("  - {op: binary_linear, channels: 64}\n", ""))  # one binary layer fewer
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(out), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert "this network's tensor body.1.op.0.weight [64, 64] is missing from the checkpoint" in err


def test_teacher_checkpoint_of_another_width_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = _genotype(tmp_path, name="teacher.yaml")
    narrow = tmp_path / "narrow"
    _trainer_checkpoint(narrow, MLP.replace("{op: binary_linear, channels: 64}", "{op: binary_linear, channels: 32}"))
    assert (
        main(
            [
                "eval",
                str(_genotype(tmp_path)),
                "--quiet",
                "--teacher",
                str(teacher),
                "--teacher-checkpoint",
                str(narrow / "checkpoint.pt"),
            ]
        )
        == 2
    )
    err = _one_line_error(capsys)
    assert f"teacher checkpoint {narrow / 'checkpoint.pt'} does not fit the teacher {teacher}" in err
    assert "[32, 64] in the checkpoint but [64, 64]" in err


def test_a_run_that_cannot_start_leaves_no_empty_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after --out was made but before anything was written in it (here a teacher
    checkpoint that does not fit) removes the folder it made, the default runs/eval-... too;
    a folder that existed before stays, with what it held."""
    teacher = _genotype(tmp_path, name="teacher.yaml")
    narrow = tmp_path / "narrow"
    _trainer_checkpoint(narrow, MLP.replace("{op: binary_linear, channels: 64}", "{op: binary_linear, channels: 32}"))
    bad_teacher = ["--teacher", str(teacher), "--teacher-checkpoint", str(narrow / "checkpoint.pt")]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", *bad_teacher]) == 2
    assert "does not fit the teacher" in _one_line_error(capsys)
    assert not (work / "runs").exists() or list((work / "runs").iterdir()) == []
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", "new/run", *bad_teacher]) == 2
    assert (work / "new").is_dir() and not (work / "new" / "run").exists()
    kept = work / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(kept), *bad_teacher]) == 2
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    empty = work / "empty"
    empty.mkdir()
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(empty), *bad_teacher]) == 2
    assert empty.is_dir()  # it was there before the run


# --------------------------------------------------------------------------------------
# An unwritable --out is refused before training
# --------------------------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Trainer) -> None:
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(Trainer, "fit", refuse)


def test_out_that_cannot_be_a_folder_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(blocker / "run")]) == 2
    err = _one_line_error(capsys)
    assert f"--out {blocker / 'run'} is not writable" in err


def test_read_only_out_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None, read_only_dir: Path
) -> None:
    out = read_only_dir
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(out)]) == 2
    assert f"--out {out} is not writable" in _one_line_error(capsys)


# --------------------------------------------------------------------------------------
# A full disk during eval
# --------------------------------------------------------------------------------------
def _fail_save_call(monkeypatch: pytest.MonkeyPatch, failing_call: int, exc: BaseException) -> None:
    """Make the ``failing_call``-th torch.save (1-based) fail like a full disk."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == failing_call:
            with open(f, "wb") as half:  # type: ignore[arg-type]
                half.write(b"PK\x03\x04 half a file")
            raise exc
        real_save(obj, f, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_mid_run_keeps_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    genotype, out = _genotype(tmp_path), tmp_path / "run"
    _fail_save_call(monkeypatch, 2, RuntimeError(DISK_FULL))  # the checkpoint after epoch 2
    assert main(["eval", str(genotype), "--epochs", "2", "--quiet", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"cannot write the checkpoint {out / 'checkpoint.pt'}" in err and "the disk may be full" in err
    assert "the last good checkpoint (after epoch 1) is intact" in err and "--resume" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert main(["eval", str(genotype), "--epochs", "2", "--quiet", "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2 and (out / "model.pt").is_file()


def test_disk_full_at_the_first_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _fail_save_call(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert main(["eval", str(_genotype(tmp_path)), "--quiet", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "no space left on device" in err and "no checkpoint was saved yet" in err
    assert not out.exists()  # nothing was saved, and the run folder the run made is gone too


def test_disk_full_writing_model_pt_says_resume_finishes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    genotype, out = _genotype(tmp_path), tmp_path / "run"
    _fail_save_call(monkeypatch, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))  # checkpoint, then model.pt
    assert main(["eval", str(genotype), "--quiet", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(out / "model.pt") in err and "training finished" in err and "--resume" in err
    monkeypatch.undo()
    assert main(["eval", str(genotype), "--quiet", "--out", str(out), "--resume"]) == 0
    assert (out / "model.pt").is_file() and (out / "report.json").is_file()


# --------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------
@pytest.mark.slow  # two fresh processes that import torch
def test_ctrl_c_says_interrupted_once_and_resume_continues(tmp_path: Path) -> None:
    genotype, out = _genotype(tmp_path, MLP.replace("epochs: 1", "epochs: 400")), tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bnas", "eval", str(genotype), "--out", str(out)]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err_file:
        proc = subprocess.Popen(cmd, stderr=err_file, stdout=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 120
            # One progress line per epoch: interrupt once training is under way.
            while "epoch 1/400" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err
    assert err.replace(str(tmp_path), "TMP").count("interrupted") == 1, err
    assert "checkpoint saved at" in err and "--resume" in err and "Traceback" not in err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["epoch"] >= 1
    # Resume, now only to the end of the epoch the saved position is in.
    stop_at = saved["epoch"] + 1
    done = subprocess.run(
        cmd + ["--resume", "--quiet", "--epochs", str(stop_at)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == stop_at
