"""Grouped binary convs with small groups on float maps (``cpu_backend.grouped_conv_call``;
depthwise convs are groups of one channel): the packed path's outputs bit for bit, float and
packed, for every group size, geometry, channel count, epilogue and code path."""

from __future__ import annotations

import pytest
import torch
from conftest import run_benchmark

from bnas.kernels import cpu_backend, pack_signs
from bnas.kernels.packing import pack_weights_reference
from bnas.ops.common import rprelu

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = [
    pytest.mark.usefixtures("kernel_threads"),
    pytest.mark.skipif(not cpu_backend.supported_backends(), reason="no CPU kernel extension"),
]

ROUTES = cpu_backend.supported_backends()


def signed_map(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random values with exact zeros, negative zeros and NaNs (x >= 0 decides the sign, as
    pack_signs takes it), channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    pick = torch.rand(n, c, h, w, generator=g)
    x[pick < 0.05] = 0.0
    x[(pick >= 0.05) & (pick < 0.1)] = -0.0
    x[(pick >= 0.1) & (pick < 0.12)] = float("nan")
    return x.contiguous(memory_format=torch.channels_last)


def both_paths(
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: tuple[int, ...],
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    flags: tuple[bool, bool, bool],
    route: str,
    pack_threshold: torch.Tensor | None = None,
    rprelu: tuple[torch.Tensor, ...] = (),
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    channels, per_group = x.shape[1], weight.shape[1]
    groups = channels // per_group
    wp = pack_weights_reference(weight, groups)
    call, head, tail = cpu_backend.grouped_conv_call(
        wp, per_group, geometry, scale, bias, route, pack_threshold, rprelu
    )
    float_output, pack_output, into_residual = flags
    ours = call(x, *head, None if residual is None else residual.clone(), *flags, *tail, 2)
    lanes = cpu_backend.lane_weights(wp, groups, route)
    packed = cpu_backend.conv2d_fused_on_lanes(
        pack_signs(x, groups), lanes, channels, channels, geometry, groups, scale, bias,
        None if residual is None else residual.clone(), float_output, pack_output, into_residual, route,
        pack_threshold, rprelu,
    )  # fmt: skip
    return list(ours), list(packed)


def assert_same(ours: list[torch.Tensor | None], packed: list[torch.Tensor | None]) -> None:
    assert [o is None for o in ours] == [p is None for p in packed]
    for o, p in zip(ours, packed, strict=True):
        if o is not None and p is not None:
            assert o.shape == p.shape and o.stride() == p.stride()
            assert torch.equal(o.view(torch.int32), p.view(torch.int32))  # bit for bit, NaNs too


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("channels", [4, 16, 17, 36, 64, 65, 70])
@pytest.mark.parametrize(
    "geometry",
    [
        (3, 3, 1, 1, 1, 1, 1, 1),  # DARTS's sep_conv_3x3
        (3, 3, 2, 2, 1, 1, 1, 1),  # at stride 2 (a reduction cell)
        (5, 5, 1, 1, 2, 2, 1, 1),  # sep_conv_5x5
        (3, 3, 1, 1, 2, 2, 2, 2),  # dil_conv_3x3
        (5, 3, 2, 1, 0, 1, 1, 2),  # uneven, without padding on one side
    ],
)
def test_the_depthwise_conv_is_the_packed_paths_bit_for_bit(
    route: str, channels: int, geometry: tuple[int, ...]
) -> None:
    x = signed_map(2, channels, 9, 11, seed=channels)
    weight = torch.randn(channels, 1, geometry[0], geometry[1], generator=torch.Generator().manual_seed(1))
    scale, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    ours, packed = both_paths(x, weight, geometry, scale, bias, None, (True, True, False), route)
    assert_same(ours, packed)
    assert ours[0] is not None and ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "channels,per_group",
    # more than one group, each of 2, 4, 8 or 16 of the channels
    [(c, g) for c in (16, 48, 56, 80) for g in (2, 4, 8, 16) if c % g == 0 and c > g],
)
@pytest.mark.parametrize("geometry", [(3, 3, 1, 1, 1, 1, 1, 1), (5, 5, 2, 2, 2, 2, 1, 1), (3, 3, 1, 1, 2, 2, 2, 2)])
def test_small_groups_are_the_packed_paths_bit_for_bit(
    route: str, channels: int, per_group: int, geometry: tuple[int, ...]
) -> None:
    x = signed_map(2, channels, 9, 10, seed=per_group)
    weight = torch.randn(channels, per_group, *geometry[:2], generator=torch.Generator().manual_seed(channels))
    scale, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    ours, packed = both_paths(x, weight, geometry, scale, bias, None, (True, True, False), route)
    assert_same(ours, packed)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("per_group", [1, 4])
def test_the_packed_output_against_a_threshold_is_the_packed_paths(route: str, per_group: int) -> None:
    """A grouped conv whose reader binarises against a threshold per channel (RSign) packs
    ``y >= threshold``: the packed path's bits, and the signs of ``y - threshold``."""
    channels, geometry = 40, (3, 3, 1, 1, 1, 1, 1, 1)
    x = signed_map(2, channels, 7, 6, seed=per_group)
    weight = torch.randn(channels, per_group, 3, 3, generator=torch.Generator().manual_seed(2))
    scale, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    threshold = torch.randn(channels, generator=torch.Generator().manual_seed(3))
    ours, packed = both_paths(x, weight, geometry, scale, bias, None, (True, True, False), route, threshold)
    assert_same(ours, packed)
    out, bits = ours
    assert out is not None and bits is not None
    assert torch.equal(bits, pack_signs(out - threshold.view(1, -1, 1, 1)))
    assert not torch.equal(bits, pack_signs(out))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("per_group", [1, 4])
def test_rprelu_in_the_epilogue_is_the_packed_paths(route: str, per_group: int) -> None:
    channels, geometry = 40, (3, 3, 1, 1, 1, 1, 1, 1)
    x = signed_map(2, channels, 7, 6, seed=per_group)
    weight = torch.randn(channels, per_group, 3, 3, generator=torch.Generator().manual_seed(2))
    residual = signed_map(2, channels, 7, 6, seed=9).nan_to_num(0.0)
    g = torch.Generator().manual_seed(4)
    params = (torch.randn(channels, generator=g), torch.rand(channels, generator=g), torch.randn(channels, generator=g))
    plain, _ = both_paths(x, weight, geometry, None, None, residual, (True, False, False), route)
    ours, packed = both_paths(x, weight, geometry, None, None, residual, (True, True, False), route, None, params)
    assert_same(ours, packed)
    assert plain[0] is not None and ours[0] is not None
    assert torch.equal(ours[0], rprelu(plain[0], *params))


def test_which_groups_run_on_the_float_map() -> None:
    assert cpu_backend.grouped_on_float_map(36, 36, 36)  # depthwise
    assert cpu_backend.grouped_on_float_map(56, 56, 14)  # EBNAS's 4 channels a group
    assert cpu_backend.grouped_on_float_map(32, 32, 16)  # 2 channels a group
    assert not cpu_backend.grouped_on_float_map(32, 32, 2)  # 16 channels a group: the packed path
    assert not cpu_backend.grouped_on_float_map(36, 36, 12)  # 3 channels a group
    assert not cpu_backend.grouped_on_float_map(36, 72, 36)  # a channel multiplier
    assert not cpu_backend.grouped_on_float_map(36, 36, 1)  # one group
    assert cpu_backend.grouped_on_float_map(64, 64, 8)  # 8 channels a group
    assert not cpu_backend.grouped_on_float_map(64, 64, 4)  # 16: the packed path
    assert cpu_backend.grouped_on_float_map(36, 36, 36, "cpu-avx2")  # 8 lanes: depthwise convs only
    assert not cpu_backend.grouped_on_float_map(56, 56, 14, "cpu-avx2")
    assert not cpu_backend.grouped_on_float_map(36, 36, 36, "cpu-popcnt")  # a scalar loop: packed is faster


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "epilogue",
    ["none", "scale", "bias", "residual", "packed only", "into residual", "nchw input"],
)
def test_the_depthwise_epilogues_are_the_packed_paths(route: str, epilogue: str) -> None:
    channels, geometry = 36, (3, 3, 1, 1, 1, 1, 1, 1)
    x = signed_map(1, channels, 8, 8, seed=3)
    if epilogue == "nchw input":
        x = x.contiguous()  # made channels_last first
    weight = torch.randn(channels, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    scale = torch.rand(channels) + 0.5 if epilogue in ("scale", "residual", "into residual") else None
    bias = torch.randn(channels) if epilogue in ("bias", "residual", "into residual") else None
    residual = signed_map(1, channels, 8, 8, seed=5) if "residual" in epilogue else None
    flags = {
        "packed only": (False, True, False),
        "into residual": (True, False, True),
    }.get(epilogue, (True, True, False))
    ours, packed = both_paths(x, weight, geometry, scale, bias, residual, flags, route)
    assert_same(ours, packed)


def test_the_grouped_conv_checks_its_input() -> None:
    route = ROUTES[0]
    wp = pack_weights_reference(torch.randn(6, 3, 3, 3), 2)
    call, head, tail = cpu_backend.grouped_conv_call(wp, 3, (3, 3, 1, 1, 1, 1, 1, 1), None, None, route)
    with pytest.raises(RuntimeError, match="the conv takes 6 channels, got 5"):
        call(torch.randn(1, 5, 4, 4), *head, None, True, False, False, *tail, 1)
    with pytest.raises(RuntimeError, match=r"weight words must be contiguous int32 \(3, 3, 16\)"):
        call(torch.randn(1, 6, 4, 4), head[0][:, :, :8], *head[1:], None, True, False, False, *tail, 1)
    with pytest.raises(RuntimeError, match="groups of 1, 2, 4, 8 or 16 channels that divide the 6, got 3"):
        call(torch.randn(1, 6, 4, 4), *head, None, True, False, False, *tail, 1)
    wp = pack_weights_reference(torch.randn(4, 1, 3, 3), 4)
    call, head, tail = cpu_backend.grouped_conv_call(wp, 1, (3, 3, 1, 1, 0, 0, 1, 1), None, None, route)
    with pytest.raises(RuntimeError, match="input must be a float32"):
        call(torch.randn(1, 4, 4, 4, dtype=torch.float64), *head, None, True, False, False, *tail, 1)
    with pytest.raises(RuntimeError, match="the kernel does not fit in the padded input"):
        call(torch.randn(1, 4, 2, 2), *head, None, True, False, False, *tail, 1)


def test_the_grouped_conv_benchmark_prints_its_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    bench, records = run_benchmark("grouped_conv", ["--no-network", "--repeats", "2", "--threads", "1"], capsys)
    assert len(records) == len(bench.SHAPES)
    for record, (network, channels, groups, _, _) in zip(records, bench.SHAPES, strict=True):
        assert record["benchmark"] == "grouped_conv" and record["threads"] == 1
        assert record["network"] == network and record["channels_per_group"] == channels // groups
        assert record["outputs_identical"] is True  # ms are rounded to 0.1 us: the ratio to 2 %
        assert record["ratio"] == pytest.approx(record["baseline_ms"] / record["ours_ms"], rel=0.02)


@pytest.mark.skipif("cpu-avx2" not in ROUTES, reason="no AVX2 code path here")
def test_the_grouped_conv_benchmark_times_another_code_path(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--no-network", "--repeats", "2", "--threads", "1", "--backend", "cpu-avx2"]
    bench, records = run_benchmark("grouped_conv", argv, capsys)
    assert len(records) == len(bench.SHAPES)
    assert all(r["route"] == "cpu-avx2" and r["outputs_identical"] is True for r in records)
