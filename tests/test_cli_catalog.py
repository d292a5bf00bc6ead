"""User catalogs without Python: ``--catalog FILE`` on info, eval, export and search, and
``catalog: [FILE, ...]`` in a search space (relative to the space file)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from conftest import tiny_space, write_space

from bnas import registry
from bnas.cli import main
from bnas.errors import BnasError
from bnas.registry import get_spec
from bnas.search.space import load_space

pytestmark = pytest.mark.usefixtures("isolated_registry")

CATALOG = "ops:\n  my_conv: {family: conv_unit, kernel: 3, binarize: xnor, order: conv_bn_act}\n"
# Real stem, one user preset, real head: the preset is the network's only binary layer.
GENOTYPE = """\
name: tiny_user
input: [1, 8, 8]
num_classes: 10
stem:
  - {op: conv_bn, channels: 8}
body:
  - {op: my_conv, channels: 8}
head:
  - {op: global_avgpool}
  - {op: linear}
training:
  epochs: 1
  batch_size: 128
"""
UNKNOWN = "body[0].op: unknown op 'my_conv'; did you mean"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    catalog, genotype = tmp_path / "my.yaml", tmp_path / "tiny_user.yaml"
    catalog.write_text(CATALOG)
    genotype.write_text(GENOTYPE)
    return catalog, genotype


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_info_builds_a_genotype_with_a_user_preset(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, genotype = files
    assert main(["info", str(genotype), "--catalog", str(catalog), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # The preset is a binary 3x3 conv 8 -> 8 on 8x8: 8*8*9 = 576 binary weights, 576 * 8*8 BOPs.
    assert summary["params_binary"] == 576 and summary["bops"] == 576 * 64
    assert get_spec("my_conv").source == str(catalog.resolve())


def test_info_without_the_catalog_is_the_unknown_op_error(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, genotype = files
    assert main(["info", str(genotype)]) == 2
    err = _one_line_error(capsys)
    assert str(genotype) in err and UNKNOWN in err


def test_catalog_flag_is_repeatable_and_a_repeated_file_is_one_catalog(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, genotype = files
    other = tmp_path / "other.yaml"
    other.write_text("ops:\n  my_wide: {family: conv_unit, kernel: 5, binarize: xnor}\n")
    genotype.write_text(GENOTYPE.replace("{op: my_conv, channels: 8}", "{op: my_conv, channels: 8}\n  - {op: my_wide}"))
    args = ["info", str(genotype), "--json", "--catalog", str(catalog), "--catalog", str(other)]
    assert main([*args, "--catalog", str(catalog)]) == 0
    # 576 binary weights of my_conv, then my_wide's 8*8*25 = 1600.
    assert json.loads(capsys.readouterr().out)["params_binary"] == 576 + 1600
    assert main(args) == 0  # the same files again in this process: no name clash


def test_missing_catalog_is_one_line_naming_it(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, genotype = files
    missing = genotype.parent / "missing.yaml"
    for command in (["info", str(genotype)], ["export", str(genotype), "ckpt.pt", "--out", str(genotype.parent / "m")]):
        assert main([*command, "--catalog", str(missing)]) == 2
        err = _one_line_error(capsys)
        assert f"{missing}: cannot read the catalog" in err


def test_bad_catalog_is_one_line_naming_it(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    catalog, genotype = files
    catalog.write_text("ops:\n  my_conv: {family: conv_unitt, kernel: 3}\n")
    assert main(["info", str(genotype), "--catalog", str(catalog)]) == 2
    assert f"{catalog}: ops.my_conv.family: unknown op family 'conv_unitt'" in _one_line_error(capsys)


def test_eval_and_export_with_a_user_preset(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog, genotype = files
    run = tmp_path / "run"
    common = ["--dataset", "digits", "--epochs", "1", "--quiet"]
    assert main(["eval", str(genotype), *common, "--out", str(tmp_path / "no")]) == 2
    assert UNKNOWN in _one_line_error(capsys)
    assert main(["eval", str(genotype), *common, "--out", str(run), "--catalog", str(catalog)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["epochs_run"] == 1 and 0.0 <= report["test_acc"] <= 1.0
    capsys.readouterr()

    model = run / "model.pt"
    assert model.is_file()
    monkeypatch.delitem(registry._REGISTRY, "my_conv")  # as in a new process: the shipped names only
    assert main(["export", str(genotype), str(model), "--out", str(tmp_path / "no.bnas")]) == 2
    assert UNKNOWN in _one_line_error(capsys)
    packed = tmp_path / "m.bnas"
    assert main(["export", str(genotype), str(model), "--out", str(packed), "--catalog", str(catalog)]) == 0
    assert packed.is_file() and packed.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def _catalog_space(folder: Path, catalog: list[str]) -> Path:
    text = tiny_space(ops=["my_conv", "skip_connect"], catalog=catalog)
    return write_space(folder, text)


def test_space_catalog_is_relative_to_the_space_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "spaces"
    folder.mkdir()
    (folder / "my.yaml").write_text(CATALOG)
    monkeypatch.chdir(tmp_path)  # not the space's folder: the path is the space file's, not the cwd's
    space = load_space(_catalog_space(folder, ["my.yaml"]))
    assert space.cells is not None and space.cells.ops == ("my_conv", "skip_connect")
    assert space.catalog == ("my.yaml",) and space.catalog_files == (str((folder / "my.yaml").resolve()),)
    assert get_spec("my_conv").family == "conv_unit"


def test_space_without_its_catalog_names_the_unknown_op(tmp_path: Path) -> None:
    with pytest.raises(BnasError, match=r"cells\.ops\[0\]: unknown op 'my_conv'"):
        load_space(write_space(tmp_path, tiny_space(ops=["my_conv", "skip_connect"])))


def test_space_with_a_missing_catalog_names_it(tmp_path: Path) -> None:
    space = _catalog_space(tmp_path, ["nope.yaml"])
    with pytest.raises(BnasError) as info:
        load_space(space)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{space}: catalog[0]: {tmp_path.resolve() / 'nope.yaml'}: cannot read the catalog")


def test_space_catalog_must_be_a_list_of_paths(tmp_path: Path) -> None:
    with pytest.raises(BnasError, match=r"catalog: expected a list of catalog file paths"):
        load_space(write_space(tmp_path, tiny_space(catalog="my.yaml")))


def test_fingerprint_follows_the_catalog_list_and_its_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my.yaml").write_text(CATALOG)
    (tmp_path / "other.yaml").write_text("ops:\n  my_wide: {family: conv_unit, kernel: 5, binarize: xnor}\n")
    one = load_space(_catalog_space(tmp_path, ["my.yaml"]))
    again = load_space(_catalog_space(tmp_path, ["my.yaml"]))  # same file, same process: no clash
    two = load_space(_catalog_space(tmp_path, ["my.yaml", "other.yaml"]))
    assert one.fingerprint() == again.fingerprint() != two.fingerprint()
    # The same space and catalog in another folder: the same trials, the same fingerprint.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "my.yaml").write_text(CATALOG)
    monkeypatch.delitem(registry._REGISTRY, "my_conv")  # as in a new process (another file may not redefine it)
    assert load_space(_catalog_space(moved, ["my.yaml"])).fingerprint() == one.fingerprint()
    # The preset edited (kernel 3 -> 5): other trials, another fingerprint.
    (moved / "my.yaml").write_text(CATALOG.replace("kernel: 3", "kernel: 5"))
    monkeypatch.delitem(registry._REGISTRY, "my_conv")
    assert load_space(_catalog_space(moved, ["my.yaml"])).fingerprint() != one.fingerprint()


def test_space_without_catalogs_keeps_its_old_fingerprint(tmp_path: Path) -> None:
    plain = load_space(write_space(tmp_path))
    # The formula from before `catalog:` and `cells.preprocess` existed: studies made then still resume.
    data = dataclasses.asdict(plain)
    for key in ("source", "sampler", "pruner", "catalog", "catalog_files", "catalog_sha"):
        data.pop(key)
    data["cells"].pop("preprocess")
    old = hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert plain.catalog == () and plain.fingerprint() == old


def test_search_records_its_catalogs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "my.yaml").write_text(CATALOG)
    text = tiny_space(ops=["my_conv"], catalog=["my.yaml"], epochs=1, cells_per_stage=[1], train_subset=256)
    space = write_space(tmp_path, text)
    out = tmp_path / "run"
    assert main(["search", str(space), "--trials", "1", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["catalogs"] == [str((tmp_path / "my.yaml").resolve())]
    best = sorted(out.rglob("*.yaml"))
    assert any("my_conv" in p.read_text() for p in best), [str(p) for p in best]


@pytest.mark.slow
def test_search_workers_see_the_catalogs(tmp_path: Path) -> None:
    """--workers children re-read the space file (its `catalog:`) and get the --catalog flags."""
    (tmp_path / "my.yaml").write_text(CATALOG)
    flag = tmp_path / "flag.yaml"
    flag.write_text("ops:\n  my_flag_conv: {family: conv_unit, kernel: 1, binarize: xnor}\n")
    text = tiny_space(ops=["my_conv", "my_flag_conv"], catalog=["my.yaml"], epochs=1, cells_per_stage=[1])
    space = write_space(tmp_path, text)
    out = tmp_path / "run"
    args = ["search", str(space), "--trials", "2", "--workers", "2", "--out", str(out), "--quiet"]
    assert main([*args, "--catalog", str(flag)]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["catalogs"] == [str((tmp_path / "my.yaml").resolve()), str(flag.resolve())]
