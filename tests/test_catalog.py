"""The registry and the named catalog: required names, presets and their binarizations,
user primitives, re-registration, unknown names, and catalog files with mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import bnas
from bnas import binarize, registry
from bnas.binarize import BinarizeConfig, binary_layers
from bnas.registry import (
    CatalogError,
    UnknownPrimitiveError,
    build_op,
    closest_primitives,
    get_primitive,
    get_spec,
    list_primitives,
    load_catalog,
    register_family,
    register_primitive,
)
from bnas.resources import resource_dir

REQUIRED = {
    "xnor_resnet_block",
    "bireal_resnet_block",
    "bireal_block",
    "xnor_vgg_block",
    "bireal_vgg_block",
    "xnor_conv_3x3_noskip",
    "xnor_conv_1x1_noskip",
    "xnor_conv_3x3_cond_skip",
    "xnor_conv_3x3_skip_connect",
    "skip_connect",
    "zero",
    "nin",
    "binary_conv_3x3",
    "binary_conv_5x5",
    "binary_dil_conv_3x3",
    "binary_dil_conv_5x5",
    "avg_pool_3x3",
    "max_pool_3x3",
    "avgpool_downsample",
    "factorized_reduce",
    "conv_downsample",
    "binary_conv_downsample",
    "binary_linear",
    "binary_conv_pool",
    "conv_bn",
    "global_avgpool",
    "flatten",
    "linear",
}
XNOR = BinarizeConfig(activation="ste", weight="xnor")
BIREAL = BinarizeConfig(activation="approx_sign", weight="bireal")
BINARYNET = BinarizeConfig(activation="ste", weight="sign")


def test_catalog_holds_every_required_name() -> None:
    names = {s.name for s in list_primitives()}
    assert not REQUIRED - names, f"missing from the catalog: {sorted(REQUIRED - names)}"
    assert [s.name for s in list_primitives()] == sorted(names)


def test_shipped_catalog_files_are_the_data_folder() -> None:
    folder = resource_dir("primitives")
    files = sorted(p.name for p in folder.glob("*.yaml"))
    assert files == ["binary.yaml", "real.yaml"]
    top = Path(__file__).resolve().parents[1] / "primitives"
    assert sorted(p.name for p in top.glob("*.yaml")) == files


def test_named_binarizations_are_those_of_the_design() -> None:
    data = yaml.safe_load((resource_dir("primitives") / "binary.yaml").read_text())
    named = {k: BinarizeConfig.from_dict(v) for k, v in data["binarize"].items()}
    assert named["xnor"] == XNOR and named["bireal"] == BIREAL and named["binarynet"] == BINARYNET
    assert named["reactnet"] == BinarizeConfig(activation="rsign", weight="bireal")
    for key, config in named.items():
        assert registry.BINARIZE_PRESETS[key] == config


@pytest.mark.parametrize(
    "name,configs",
    [
        ("xnor_resnet_block", {XNOR}),
        ("bireal_resnet_block", {BIREAL}),
        ("bireal_block", {BIREAL}),
        ("xnor_vgg_block", {XNOR}),
        ("bireal_vgg_block", {BIREAL}),
        ("nin", {XNOR}),
        ("xnor_conv_3x3_cond_skip", {XNOR}),
        ("binary_conv_5x5", {XNOR}),
        ("binary_conv_downsample", {XNOR}),
        ("binary_conv_pool", {XNOR}),
        ("binary_linear", {BINARYNET}),
        ("conv_unit", {XNOR}),
        ("resnet_block", {XNOR}),
    ],
)
def test_each_binary_entry_uses_its_binarization(name: str, configs: set[BinarizeConfig]) -> None:
    op = build_op(name, 16, 16, 1)
    assert {layer.config for layer in binary_layers(op)} == configs
    label = get_spec(name).binarize
    if label != "-":  # generic families have no label; the others name their default
        assert registry.BINARIZE_PRESETS[label] in configs


def test_presets_name_their_family_and_options_override_them() -> None:
    spec = get_spec("binary_dil_conv_5x5")
    assert spec.family == "conv_unit" and spec.binarize == "xnor"
    assert dict(spec.options)["kernel"] == 5 and dict(spec.options)["dilation"] == 2
    conv = next(binary_layers(build_op("binary_dil_conv_5x5", 8, 8, 1, kernel=3, binarize="bireal")))
    assert conv.kernel_size == (3, 3) and conv.dilation == (2, 2) and conv.config == BIREAL
    assert get_spec("avg_pool_3x3").family == "pool" and get_spec("avg_pool_3x3").binarize == "real"
    assert get_spec("conv_unit").binarize == "-"  # a family: its binarization is set per preset or use


def test_every_spec_is_described_and_builds_with_its_defaults() -> None:
    shipped = [s for s in list_primitives() if s.factory.__module__.startswith("bnas.ops.")]
    assert len(shipped) >= len(REQUIRED)
    for spec in shipped:  # not the user primitives other test files register
        assert spec.description, f"{spec.name} has no description for `bnas primitives`"
        keep_width = {"skip_connect", "pool", "avg_pool_3x3", "max_pool_3x3", "global_avgpool", "avgpool_shortcut"}
        keep_width |= {"avg_pool_3x3_bn", "max_pool_3x3_bn", "bn", "relu", "prelu"}
        c_in, c_out = (8, 8) if spec.name in keep_width else (8, 4)
        if spec.name.startswith("ebnas_"):  # 14 groups and a weightless shortcut, as EBNAS has
            c_in, c_out = 28, 28
        assert isinstance(get_primitive(spec.name)(c_in, c_out, 1), nn.Module)


def test_unknown_op_suggests_the_closest_names() -> None:
    with pytest.raises(UnknownPrimitiveError) as info:
        build_op("xnor_resnet_blok", 8, 8, 1)
    assert "unknown op 'xnor_resnet_blok'; did you mean xnor_resnet_block" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert "binary_conv_3x3" in closest_primitives("binary_conv_3x4")
    with pytest.raises(UnknownPrimitiveError, match="run `bnas primitives` for the list"):
        get_spec("qqqqqqqq")


def test_user_primitive_is_usable_at_once(isolated_registry: None) -> None:
    @bnas.register_primitive("my_op")
    def my_op(C_in: int, C_out: int, stride: int = 1, *, scale: float = 1.0) -> nn.Module:
        """A real 1x1 conv, scaled."""
        conv = nn.Conv2d(C_in, C_out, 1, stride)
        return nn.Sequential(conv, nn.Hardtanh(-scale, scale))

    op = build_op("my_op", 3, 5, 2, scale=0.5)
    assert op(torch.randn(1, 3, 5, 5)).shape == (1, 5, 3, 3)
    spec = get_spec("my_op")
    assert spec.factory is my_op and spec.description == "A real 1x1 conv, scaled."
    assert "my_op" in {s.name for s in bnas.list_primitives()}
    assert "my_op" in closest_primitives("my_opp")


def test_reregistering_is_an_error_unless_override(isolated_registry: None) -> None:
    register_primitive("twice", lambda c_in, c_out, stride=1: nn.Identity())
    with pytest.raises(ValueError, match="primitive 'twice' is already registered; pass override=True"):
        register_primitive("twice", lambda c_in, c_out, stride=1: nn.ReLU())
    assert isinstance(build_op("twice", 4, 4), nn.Identity)
    register_primitive("twice", lambda c_in, c_out, stride=1: nn.ReLU(), override=True)
    assert isinstance(build_op("twice", 4, 4), nn.ReLU)
    with pytest.raises(ValueError, match="already registered"):
        register_primitive("xnor_resnet_block", lambda c_in, c_out, stride=1: nn.Identity())
    with pytest.raises(ValueError, match="registered twice"):
        register_family("conv_unit")(lambda c_in, c_out, stride=1: nn.Identity())


def test_register_checks_names_and_factories(isolated_registry: None) -> None:
    with pytest.raises(ValueError, match="must be identifiers"):
        register_primitive("my-op", lambda c_in, c_out, stride=1: nn.Identity())
    with pytest.raises(TypeError, match="must be callable"):
        register_primitive("not_callable", 3)  # type: ignore[arg-type]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


def test_user_catalog_adds_presets(tmp_path: Path, isolated_registry: None) -> None:
    path = _write(
        tmp_path,
        """
binarize:
  mine: {activation: swish_sign, weight: xnor_tensor, swish_beta: 3.0}
ops:
  my_swish_conv: {family: conv_unit, kernel: 5, binarize: mine, description: "5x5 BNN+ conv"}
  my_inline: {family: resnet_block, binarize: {activation: identity_ste, weight: sign}}
  my_avg_5: {family: pool, mode: avg, kernel: 5}
""",
    )
    assert load_catalog(path) == ["my_swish_conv", "my_inline", "my_avg_5"]
    conv = next(binary_layers(build_op("my_swish_conv", 4, 4, 1)))
    assert conv.kernel_size == (5, 5) and conv.config.swish_beta == 3.0 and conv.config.weight == "xnor_tensor"
    assert get_spec("my_swish_conv").binarize == "mine" and get_spec("my_swish_conv").description == "5x5 BNN+ conv"
    assert get_spec("my_inline").binarize == "identity_ste/sign"
    assert build_op("my_avg_5", 4, 4, 2)(torch.randn(1, 4, 5, 5)).shape == (1, 4, 3, 3)
    assert build_op("binary_conv_3x3", 4, 4, 1, binarize="mine")  # the new name works on any op


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("ops:\n  a: {family: conv_unitt}\n", "ops.a.family: unknown op family 'conv_unitt'"),
        ("ops:\n  a: {family: conv_unit, binarize: xnorr}\n", "ops.a.binarize: unknown binarization 'xnorr'"),
        ("ops:\n  a: {kernel: 3}\n", "ops.a: expected a mapping with a 'family' key"),
        (
            "ops:\n  xnor_resnet_block: {family: resnet_block}\n",
            "ops.xnor_resnet_block: the name is already registered",
        ),
        ("binarize:\n  b: {activation: sgn}\n", "binarize.b: unknown activation quantizer 'sgn'"),
        ("ops: [a, b\n", "invalid YAML"),
        ("- just a list\n", "expected a mapping with 'binarize' and 'ops' sections"),
    ],
)
def test_catalog_mistakes_name_the_file_and_key(
    tmp_path: Path, isolated_registry: None, text: str, fragment: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_catalog_cannot_silently_redefine_a_binarization(tmp_path: Path, isolated_registry: None) -> None:
    before = registry.BINARIZE_PRESETS["xnor"]
    path = _write(tmp_path, "binarize:\n  xnor: {activation: ste, weight: sign}\n")
    with pytest.raises(CatalogError, match=r"binarize\.xnor: the name is already defined differently.*override=True"):
        load_catalog(path)
    assert registry.BINARIZE_PRESETS["xnor"] == before
    load_catalog(path, override=True)
    assert registry.BINARIZE_PRESETS["xnor"] == BinarizeConfig(activation="ste", weight="sign")
    same = _write(
        tmp_path, "binarize:\n  again: {activation: ste, weight: sign}\n  xnor: {activation: ste, weight: sign}\n"
    )
    assert load_catalog(same) == []  # an identical definition is no conflict


def test_user_catalog_can_be_the_first_thing_loaded(tmp_path: Path) -> None:
    path = _write(tmp_path, "ops:\n  first_conv: {family: conv_unit, kernel: 5, binarize: xnor}\n")
    code = (
        f"import bnas; print(bnas.load_catalog({str(path)!r})); "
        "print(bnas.get_primitive('first_conv') is not None, 'xnor_resnet_block' in [s.name for s in bnas.list_primitives()])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["['first_conv']", "True True"]


def test_missing_catalog_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"nope\.yaml: cannot read the catalog \(No such file or directory\)"):
        load_catalog(tmp_path / "nope.yaml")


def test_catalog_with_a_mistake_registers_nothing(tmp_path: Path, isolated_registry: None) -> None:
    path = _write(
        tmp_path,
        """
binarize:
  fresh: {activation: ste, weight: sign}
ops:
  fine_op: {family: conv_unit, binarize: fresh}
  broken_op: {family: conv_unitt}
""",
    )
    with pytest.raises(CatalogError, match="ops.broken_op.family"):
        load_catalog(path)
    assert "fresh" not in registry.BINARIZE_PRESETS
    assert "fine_op" not in [spec.name for spec in list_primitives()]


def test_catalog_yaml_cannot_construct_python_objects(tmp_path: Path, isolated_registry: None) -> None:
    path = _write(tmp_path, "ops:\n  a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(CatalogError, match="invalid YAML"):
        load_catalog(path)


def test_registry_errors_are_bnas_errors_and_keep_their_builtin_bases() -> None:
    assert issubclass(CatalogError, bnas.BnasError) and issubclass(CatalogError, ValueError)
    assert issubclass(UnknownPrimitiveError, bnas.BnasError) and issubclass(UnknownPrimitiveError, KeyError)
    with pytest.raises(bnas.BnasError, match="unknown op 'xnor_resnet_blok'"):
        get_spec("xnor_resnet_blok")


def test_list_primitives_filters_by_shell_pattern() -> None:
    names = [s.name for s in list_primitives("xnor_*")]
    assert names == sorted(names) and "xnor_resnet_block" in names and "xnor_vgg_block" in names
    assert all(n.startswith("xnor_") for n in names)
    assert [s.name for s in list_primitives("*_block")] == sorted(
        n for n in (s.name for s in list_primitives()) if n.endswith("_block")
    )
    assert list_primitives("no_such_*") == []
    assert len(list_primitives(None)) == len(list_primitives())


def test_primitives_command_filter(capsys: pytest.CaptureFixture[str]) -> None:
    from bnas.cli import main

    assert main(["primitives", "--filter", "xnor_*"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [s.name for s in list_primitives("xnor_*")]
    assert main(["primitives", "--filter", "qqq*"]) == 2
    assert "no primitive matches 'qqq*'" in capsys.readouterr().err


def test_named_binarizations_live_in_binarize() -> None:
    list_primitives()  # the shipped catalog is loaded on first use
    assert binarize.named_binarization("xnor") == XNOR
    assert registry.BINARIZE_PRESETS is binarize.BINARIZE_PRESETS  # the old name reads the same table
    with pytest.raises(ValueError, match="unknown binarization 'xnr'; the catalog defines .*xnor"):
        binarize.named_binarization("xnr")


def test_a_user_catalog_binarization_is_usable_by_name(isolated_registry: None, tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("binarize:\n  mysign: {activation: ste, weight: sign}\nops: {}\n")
    assert load_catalog(path) == []
    conv = next(binary_layers(build_op("conv_unit", 8, 8, 1, binarize="mysign")))
    assert conv.config == BinarizeConfig(activation="ste", weight="sign")
