"""`bnas export` and `.bnas` files under bad inputs and faults (issue 11: defects 2, 5, 6, 8)."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bnas
from bnas.cli import main
from bnas.errors import BnasError
from bnas.export import ExportError, load_packed, pack_model, save_packed

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

ROOT = Path(__file__).resolve().parents[1]
GENOTYPE = ROOT / "search_spaces" / "genotypes" / "digits_small.yaml"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = bnas.build(GENOTYPE).eval()
    for m in net.modules():  # BN statistics that are not the identity, so a fold matters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def packed_file(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_packed(pack_model(model), tmp_path_factory.mktemp("packed") / "model.bnas")


@pytest.fixture
def checkpoint(model: torch.nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def rewrite(src: Path, dst: Path, tensors=None, metadata=None) -> Path:
    """A copy of the .bnas file ``src`` with some tensors and header entries changed."""
    with safe_open(str(src), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = dict(fh.metadata())
    state.update(tensors(state) if tensors else {})
    meta.update(metadata or {})
    save_file(state, str(dst), metadata=meta)
    return dst


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------
# Defect 6: the umask decides the mode, as for a plain open()
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_export_honours_umask(checkpoint: Path, tmp_path: Path, mask: int, expected: int, capsys) -> None:
    old = os.umask(mask)
    try:
        assert main(["export", str(GENOTYPE), str(checkpoint), "--out", str(tmp_path / "m.bnas")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.bnas").stat().st_mode) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bnas", "model.pt"]  # no temp file left


# --------------------------------------------------------------------------------------
# Defect 5: dtypes are checked, not only shapes
# --------------------------------------------------------------------------------------
def test_packed_weights_resaved_as_float32_are_refused(packed_file: Path, tmp_path: Path) -> None:
    bad = rewrite(
        packed_file,
        tmp_path / "float.bnas",
        tensors=lambda s: {k: v.float() for k, v in s.items() if k.endswith("weight_packed")},
    )
    # the silent conversion this guards against: float32 rounds the 32-bit words
    with safe_open(str(bad), framework="pt") as fh, safe_open(str(packed_file), framework="pt") as ok:
        k = next(k for k in ok.keys() if k.endswith("weight_packed"))
        assert not torch.equal(fh.get_tensor(k).to(torch.int32), ok.get_tensor(k))
    with pytest.raises(ExportError) as info:
        load_packed(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message
    assert "weight_packed is float32, expected int32 (packed sign bits)" in message


@pytest.mark.parametrize(
    "name, dtype", [("scale", torch.float64), ("bias", torch.float16), ("weight_packed", torch.int64)]
)
def test_any_wrong_dtype_is_refused(packed_file: Path, tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    bad = rewrite(
        packed_file,
        tmp_path / "bad.bnas",
        tensors=lambda s: {k: v.to(dtype) for k, v in s.items() if k.endswith("." + name)},
    )
    with pytest.raises(ExportError, match=rf"\.{name} is {str(dtype)[6:]}, expected (int32|float32)"):
        load_packed(bad)


def test_untouched_file_still_loads(packed_file: Path, model: torch.nn.Module) -> None:
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(load_packed(packed_file)(x), pack_model(model)(x))


# --------------------------------------------------------------------------------------
# Defect 8: hostile or damaged headers give one line that names the file
# --------------------------------------------------------------------------------------
def test_python_tag_in_header_genotype_is_one_line(packed_file: Path, tmp_path: Path) -> None:
    bad = rewrite(
        packed_file, tmp_path / "tag.bnas", metadata={"genotype": "!!python/object/apply:os.system ['echo pwned']\n"}
    )
    with pytest.raises(BnasError) as info:
        load_packed(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "tags" in message


def test_deeply_nested_layer_table_is_one_line(packed_file: Path, tmp_path: Path) -> None:
    bad = rewrite(packed_file, tmp_path / "deep.bnas", metadata={"layers": "[" * 200_000 + "]" * 200_000})
    with pytest.raises(ExportError, match="the layer table is not JSON: nested too deeply"):
        load_packed(bad)


def test_unknown_layer_kind_names_the_file(packed_file: Path, tmp_path: Path) -> None:
    with safe_open(str(packed_file), framework="pt") as fh:
        table = json.loads(fh.metadata()["layers"])
    table[0]["kind"] = "packed_conv3d"
    bad = rewrite(packed_file, tmp_path / "kind.bnas", metadata={"layers": json.dumps(table)})
    with pytest.raises(ExportError) as info:
        load_packed(bad)
    message = str(info.value)
    assert message.startswith(f'{bad}: unknown packed layer kind "packed_conv3d"')
    assert "packed_conv2d" in message and "upgrade bnas" in message


def test_layer_table_cannot_allocate_beyond_the_genotype(packed_file: Path, tmp_path: Path) -> None:
    with safe_open(str(packed_file), framework="pt") as fh:
        table = json.loads(fh.metadata()["layers"])
    entry = next(e for e in table if e["kind"] == "packed_conv2d")
    entry["kernel_size"] = [2**31, 2**31]  # torch.zeros would overflow (or try terabytes)
    bad = rewrite(packed_file, tmp_path / "huge.bnas", metadata={"layers": json.dumps(table)})
    with pytest.raises(
        ExportError,
        match=rf"layer {entry['path']} \(packed_conv2d\) has kernel_size=\[2147483648, "
        r"2147483648\], expected \[3, 3\]",
    ):
        load_packed(bad)


# --------------------------------------------------------------------------------------
# Defect 2: --out problems are one line, found before the work
# --------------------------------------------------------------------------------------
def test_export_out_existing_folder_is_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    assert main(["export", str(GENOTYPE), str(checkpoint), "--out", str(folder)]) == 2
    err = one_line_error(capsys)
    assert f"--out {folder} is an existing folder; --out takes a file path, e.g. {folder / 'model.bnas'}" in err
    assert list(folder.iterdir()) == []


def test_export_out_read_only_folder_is_one_line(tmp_path: Path, capsys, read_only_dir: Path) -> None:
    ro = read_only_dir
    # the checkpoint does not even exist: the write check comes before any work
    assert main(["export", str(GENOTYPE), str(tmp_path / "missing.pt"), "--out", str(ro / "m.bnas")]) == 2
    err = one_line_error(capsys)
    assert f"--out {ro / 'm.bnas'} is not writable" in err and "choose another folder" in err


def test_export_disk_full_is_one_line_and_keeps_the_old_file(
    checkpoint: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.bnas"
    out.write_bytes(b"the previous export")
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.startswith(".m.bnas."):
            real(self, data[:100])
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    assert main(["export", str(GENOTYPE), str(checkpoint), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"cannot write the packed model {out}: no space left on device; the previous file there is unchanged" in err
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bnas", "model.pt"]


@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(5000),  # torch: UnpicklingError
        random.Random(2).randbytes(5000),  # torch: IndexError
        b"",
    ],
    ids=["random-bytes", "random-bytes-indexerror", "empty"],
)
def test_export_bad_checkpoint_bytes_are_one_line(tmp_path: Path, capsys, content: bytes) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(content)
    assert main(["export", str(GENOTYPE), str(bad), "--out", str(tmp_path / "m.bnas")]) == 2
    err = one_line_error(capsys)
    assert str(bad) in err and "bnas eval" in err
    assert "weights_only" not in err  # torch's advice to load untrusted pickles must not be passed on
    assert not (tmp_path / "m.bnas").exists()


# --------------------------------------------------------------------------------------
# Defect 8: no CUDA notice from torch on a CPU machine
# --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is only printed where torch sees no GPU")
def test_export_and_load_print_no_cuda_notice(checkpoint: Path, tmp_path: Path) -> None:
    # torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." on import
    # wherever a CUDA toolkit is installed without a usable GPU; the CPU kernels import it.
    script = (
        "import sys, torch\n"
        "from bnas.cli import main\n"
        "from bnas.export import load_packed\n"
        "assert main(['export', sys.argv[1], sys.argv[2], '--out', sys.argv[3]]) == 0\n"
        "print(load_packed(sys.argv[3])(torch.randn(2, 1, 8, 8)).shape)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(GENOTYPE), str(checkpoint), str(tmp_path / "m.bnas")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([2, 10])" in proc.stdout
    assert "No CUDA runtime" not in proc.stderr and "CUDA_HOME" not in proc.stderr, proc.stderr
