"""The CUDA XNOR kernel, proven on the CPU: the host warp emulator runs the kernel's own
__host__ __device__ code for every thread of every block, with an exact software model of
mma.m16n8k256 .b1 .and.popc.  Everything is checked bit-exactly against float references."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from bnas.kernels import cpu_backend
from bnas.kernels import emulator as emu

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")


def _compiler_or_skip() -> None:
    try:
        emu.load_emulator()
    except RuntimeError as exc:  # no C++ compiler on this machine
        if cpu_backend.extension_required():  # CI: no kernel coverage is a failure, not a skip
            pytest.fail(f"cannot build the CUDA kernel emulator with {cpu_backend.REQUIRE_ENV} set: {exc}")
        pytest.skip(f"cannot build the CUDA kernel emulator: {exc}")


@pytest.fixture(scope="module", autouse=True)
def emulator():
    _compiler_or_skip()


def sign(t: torch.Tensor) -> torch.Tensor:
    """The contract's sign: +1 for x >= 0 (so sign(0) = +1), else -1."""
    return torch.where(t >= 0, 1.0, -1.0)


def words_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 32*w) 0/1 -> (..., w) int32 words, bit j of word i = element 32*i + j."""
    shape = bits.shape[:-1] + (bits.shape[-1] // 32, 32)
    weights = 1 << torch.arange(32, dtype=torch.int64)
    words = (bits.reshape(shape).to(torch.int64) * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def reference_pack(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Independent packing of the contract: NCHW float -> NHWC words, per group, zero pad bits."""
    n, c, h, w = x.shape
    cg = c // groups
    wg = (cg + 31) // 32
    bits = (x >= 0).permute(0, 2, 3, 1).reshape(n, h, w, groups, cg)
    padded = torch.zeros(n, h, w, groups, wg * 32, dtype=torch.bool)
    padded[..., :cg] = bits
    return words_from_bits(padded).reshape(n, h, w, groups * wg)


def random_input(shape, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < 0.05] = 0.0  # exact zeros must count as +1
    return x


# ------------------------------------------------------------------------------------------
# (1) the mma model alone against a naive popcount matrix product
def fragments_from_matrices(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Distribute A (16x256 bits), B (256x8 bits), C (16x8) into per-lane registers following
    the PTX ISA fragment tables for m16n8k256 .b1 (written here independently of the C++)."""
    a = torch.zeros(32, 4, dtype=torch.int32)
    b = torch.zeros(32, 2, dtype=torch.int32)
    c = torch.zeros(32, 4, dtype=torch.int32)
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for i in range(4):
            row = gid if i in (0, 2) else gid + 8  # a0..a31, a64..a95 -> groupID
            k0 = tig * 32 + (128 if i >= 2 else 0)
            a[lane, i] = words_from_bits(A[row, k0 : k0 + 32])[0]
            c[lane, i] = C[gid + (8 if i >= 2 else 0), tig * 2 + (i & 1)]
        for i in range(2):
            k0 = tig * 32 + 128 * i
            b[lane, i] = words_from_bits(B[k0 : k0 + 32, gid])[0]
    return a, b, c


@pytest.mark.parametrize("density", [0.5, 0.1, 0.9])
def test_mma_model_matches_naive_popcount_product(density):
    gen = torch.Generator().manual_seed(int(density * 100))
    for _ in range(4):
        A = (torch.rand(16, 256, generator=gen) < density).to(torch.int64)
        B = (torch.rand(256, 8, generator=gen) < density).to(torch.int64)
        C = torch.randint(-1000, 1000, (16, 8), generator=gen)
        a, b, c = fragments_from_matrices(A, B, C)
        d = emu.emulated_mma(a, b, c)
        expected = C + A @ B  # AND then popcount of 0/1 entries = the integer product
        for lane in range(32):
            gid, tig = lane // 4, lane % 4
            for i in range(4):
                assert d[lane, i].item() == expected[gid + (8 if i >= 2 else 0), tig * 2 + (i & 1)].item()


def test_mma_model_single_bits_land_in_one_output():
    # one set bit per operand: the only nonzero output is at (row of A bit, column of B bit)
    for r, k, n in [(0, 0, 0), (9, 200, 5), (15, 255, 7), (3, 127, 2), (12, 128, 1)]:
        A = torch.zeros(16, 256, dtype=torch.int64)
        B = torch.zeros(256, 8, dtype=torch.int64)
        A[r, k] = 1
        B[k, n] = 1
        a, b, c = fragments_from_matrices(A, B, torch.zeros(16, 8, dtype=torch.int64))
        d = emu.emulated_mma(a, b, c)
        assert d.sum().item() == 1
        lane_i = (d == 1).nonzero()[0].tolist()
        lane, i = lane_i
        assert (lane // 4 + (8 if i >= 2 else 0), (lane % 4) * 2 + (i & 1)) == (r, n)


# ------------------------------------------------------------------------------------------
# the fused bit-packing kernel
@pytest.mark.parametrize(
    "n,c,h,w,groups",
    [(1, 1, 1, 1, 1), (2, 3, 5, 4, 1), (1, 33, 3, 7, 1), (2, 100, 2, 3, 2), (1, 64, 4, 4, 4), (3, 65, 1, 1, 5)],
)
def test_pack_kernel_matches_contract_packing(n, c, h, w, groups):
    gen = torch.Generator().manual_seed(n * 1000 + c)
    x = random_input((n, c, h, w), gen)
    x[0, 0, 0, 0] = -0.0  # -0.0 >= 0: +1
    got = emu.emulated_pack_signs(x, groups)
    assert got.dtype == torch.int32 and got.shape == (n, h, w, groups * ((c // groups + 31) // 32))
    assert torch.equal(got, reference_pack(x, groups))
    # any strides: channels_last and a transposed view give the same words
    assert torch.equal(emu.emulated_pack_signs(x.contiguous(memory_format=torch.channels_last), groups), got)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(emu.emulated_pack_signs(xt, groups), got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_kernel_reads_16bit_types(dtype):
    # the kernel tests the sign on the raw 16 bits (the GPU path); torch's own comparison on the
    # 16-bit tensor is the reference: -0 and +0 -> +1, NaN -> -1, infinities and subnormals
    gen = torch.Generator().manual_seed(5)
    x = random_input((2, 70, 3, 5), gen).to(dtype)
    flat = x.view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = [
        0.0,
        -0.0,
        float("nan"),
        -float("nan"),
        float("inf"),
        -float("inf"),
        tiny / 4,
        -tiny / 4,
        torch.finfo(dtype).max,
        -torch.finfo(dtype).max,
    ]
    flat[: len(specials)] = torch.tensor(specials, dtype=dtype)
    got = emu.emulated_pack_signs(x, groups=2)
    assert torch.equal(got, reference_pack(x, groups=2))
    assert torch.equal(emu.emulated_pack_signs(x.contiguous(memory_format=torch.channels_last), 2), got)
    assert not torch.equal(got, reference_pack(x.float().abs(), groups=2))  # the signs do matter


def test_pack_kernel_linear_and_nan():
    x = torch.tensor([[1.0, -1.0, 0.0, float("nan"), -0.0] + [2.0] * 30])
    got = emu.emulated_pack_signs(x)
    assert got.shape == (1, 2)
    bits = [(int(got[0, i // 32]) >> (i % 32)) & 1 for i in range(35)]
    assert bits[:5] == [1, 0, 1, 0, 1]  # NaN -> -1, like torch.where(x >= 0, 1, -1)
    assert all(bits[5:]) and int(got[0, 1]) >> 3 == 0  # padding bits are 0


# ------------------------------------------------------------------------------------------
# (2) the emulated convolution, bit-exact against conv2d(sign(x), sign(w))
# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 1, 5, 5, 3, 3, 1, 1, 1, 1),
    (2, 3, 7, 6, 5, 3, 1, 0, 1, 1),
    (1, 31, 9, 7, 8, 3, 2, 1, 1, 1),
    (2, 33, 7, 9, 20, 3, 1, 2, 1, 1),
    (1, 65, 6, 5, 17, 3, 2, 2, 1, 1),
    (2, 100, 9, 8, 70, 3, 1, 2, 2, 1),
    (1, 33, 11, 9, 9, 3, 1, 2, 2, 1),
    (3, 64, 5, 5, 24, 3, 1, 1, 1, 2),
    (1, 96, 5, 7, 12, 3, 2, 1, 1, 3),
    (1, 16, 6, 6, 16, 3, 1, 1, 1, 16),  # depthwise
    (2, 40, 5, 5, 30, 1, 1, 0, 1, 1),  # 1x1
    (1, 24, 9, 9, 10, 5, 1, 2, 1, 1),  # 5x5
    (1, 7, 8, 13, 6, (1, 3), (1, 2), (0, 1), 1, 1),  # rectangular kernel, anisotropic stride
    (1, 256, 4, 3, 8, 3, 1, 1, 1, 1),  # Q = 72 words: several pipeline stages, a half-full last stage
    (1, 40, 9, 9, 12, 7, 1, 3, 1, 1),  # 7x7: 49 taps, padded taps above bit 31 of the mask
    (1, 33, 8, 8, 9, 8, 1, 4, 1, 1),  # 8x8: 64 taps, the most the kernel takes
    (2, 64, 7, 6, 16, (5, 9), 1, (2, 4), 1, 1),  # 45 taps, rectangular
]


def _conv_case(case, seed: int):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    kh, kw = (ks, ks) if isinstance(ks, int) else ks
    gen = torch.Generator().manual_seed(seed)
    x = random_input((n, c, h, w), gen)
    wt = random_input((k, c // groups, kh, kw), gen)
    ref = F.conv2d(sign(x), sign(wt), None, stride, pad, dil, groups)
    return x, wt, ref, (stride, pad, dil, groups)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("tile", ["small", "large"])
def test_emulated_conv_is_bit_exact(case, tile):
    x, wt, ref, (stride, pad, dil, groups) = _conv_case(case, seed=CONV_CASES.index(case) * 2 + (tile == "large"))
    xp, wp = emu.emulated_pack_signs(x, groups), emu.emulated_pack_weights(wt)
    assert torch.equal(xp, reference_pack(x, groups))
    out = emu.emulated_xnor_conv2d_packed(xp, wp, x.shape[1], wt.shape[2:], stride, pad, dil, groups, tile=tile)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("c,vw", [(128, 4), (128, 2), (128, 1), (64, 2), (64, 1), (320, 2)])
def test_emulated_conv_every_copy_width(c, vw):
    # vectorized 16/8-byte cp.async paths need Wg % vw == 0
    x, wt, ref, (stride, pad, dil, groups) = _conv_case((2, c, 5, 4, 12, 3, 1, 1, 1, 1), seed=c + vw)
    out = emu.emulated_xnor_conv2d_packed(
        emu.emulated_pack_signs(x), emu.emulated_pack_weights(wt), c, 3, stride, pad, dil, groups, tile="small", vw=vw
    )
    assert torch.equal(out, ref)


def test_emulated_conv_many_blocks_both_directions():
    # M = 2*9*9 = 162 pixels -> 3 row blocks of 64; K = 150 -> 3 channel blocks of 64
    x, wt, ref, (stride, pad, dil, groups) = _conv_case((2, 40, 9, 9, 150, 3, 1, 1, 1, 1), seed=7)
    out = emu.emulated_xnor_conv2d_packed(
        emu.emulated_pack_signs(x), emu.emulated_pack_weights(wt), 40, 3, stride, pad, dil, groups, tile="small"
    )
    assert torch.equal(out, ref)


def test_randomized_conv_shapes():
    rnd = random.Random(2024)
    for trial in range(10):
        groups = rnd.choice([1, 1, 2, 3])
        c = groups * rnd.choice([1, 3, 31, 33, 65, 100]) // (1 if groups == 1 else rnd.choice([1, groups]))
        c = max(groups, c - c % groups)
        k = groups * rnd.randint(1, 12)
        ks = rnd.choice([1, 3, 3, 5])
        dil = rnd.choice([1, 2])
        pad = rnd.choice([0, 1, 2])
        h = rnd.randint(max(1, dil * (ks - 1) + 1 - 2 * pad), 9)
        w = rnd.randint(max(1, dil * (ks - 1) + 1 - 2 * pad), 9)
        case = (rnd.choice([1, 2]), c, h, w, k, ks, rnd.choice([1, 2]), pad, dil, groups)
        x, wt, ref, (stride, pad, dil, groups) = _conv_case(case, seed=trial)
        out = emu.emulated_xnor_conv2d_packed(
            emu.emulated_pack_signs(x, groups),
            emu.emulated_pack_weights(wt),
            c,
            ks,
            stride,
            pad,
            dil,
            groups,
            tile=rnd.choice(["small", "large"]),
        )
        assert torch.equal(out, ref), case


# ------------------------------------------------------------------------------------------
# fused epilogue: scale (alpha / folded BN), bias, sign -> packed output
def test_emulated_epilogue_scale_and_bias():
    x, wt, ref, (stride, pad, dil, groups) = _conv_case((2, 33, 6, 5, 20, 3, 1, 1, 1, 1), seed=11)
    gen = torch.Generator().manual_seed(3)
    scale = torch.randn(20, generator=gen)
    bias = torch.randn(20, generator=gen)
    xp, wp = emu.emulated_pack_signs(x), emu.emulated_pack_weights(wt)
    out = emu.emulated_xnor_conv2d_packed(xp, wp, 33, 3, stride, pad, dil, groups, scale=scale, bias=bias)
    assert torch.equal(out, ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    only_scale = emu.emulated_xnor_conv2d_packed(xp, wp, 33, 3, stride, pad, dil, groups, scale=scale)
    assert torch.equal(only_scale, ref * scale.view(1, -1, 1, 1))


@pytest.mark.parametrize(
    "case,out_groups",
    [
        ((2, 33, 6, 5, 20, 3, 1, 1, 1, 1), 1),
        ((1, 40, 7, 7, 100, 3, 2, 1, 1, 1), 1),  # 2 channel blocks, 4 output words
        ((2, 24, 5, 5, 40, 3, 1, 1, 1, 2), 1),  # group boundary inside an output word: OR-ed
        ((2, 24, 5, 5, 40, 3, 1, 1, 1, 2), 2),  # packed for a next layer with 2 groups
        ((1, 30, 5, 6, 90, 3, 1, 0, 1, 3), 3),
    ],
)
def test_emulated_packed_output(case, out_groups):
    x, wt, ref, (stride, pad, dil, groups) = _conv_case(case, seed=5)
    k = case[4]
    gen = torch.Generator().manual_seed(9)
    scale = torch.randn(k, generator=gen)
    bias = torch.randint(-3, 4, (k,), generator=gen).float()  # exact zeros happen: sign(0) = +1
    xp, wp = emu.emulated_pack_signs(x, groups), emu.emulated_pack_weights(wt)
    for tile in ("small", "large"):
        got = emu.emulated_xnor_conv2d_packed(
            xp,
            wp,
            x.shape[1],
            3,
            stride,
            pad,
            dil,
            groups,
            scale=scale,
            bias=bias,
            pack_output=True,
            out_groups=out_groups,
            tile=tile,
        )
        y = ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        assert torch.equal(got, reference_pack(y, out_groups))
        plain = emu.emulated_xnor_conv2d_packed(
            xp, wp, x.shape[1], 3, stride, pad, dil, groups, pack_output=True, out_groups=out_groups, tile=tile
        )
        assert torch.equal(plain, reference_pack(ref, out_groups))


def test_emulated_chained_binary_layers():
    # layer 1 writes packed output that layer 2 consumes directly
    gen = torch.Generator().manual_seed(21)
    x = random_input((1, 20, 6, 6), gen)
    w1, w2 = random_input((36, 20, 3, 3), gen), random_input((12, 36, 3, 3), gen)
    bias1 = torch.randint(-2, 3, (36,), generator=gen).float()
    h = emu.emulated_xnor_conv2d_packed(
        emu.emulated_pack_signs(x), emu.emulated_pack_weights(w1), 20, 3, padding=1, bias=bias1, pack_output=True
    )
    out = emu.emulated_xnor_conv2d_packed(h, emu.emulated_pack_weights(w2), 36, 3, stride=2, padding=1)
    y1 = F.conv2d(sign(x), sign(w1), None, 1, 1) + bias1.view(1, -1, 1, 1)
    assert torch.equal(out, F.conv2d(sign(y1), sign(w2), None, 2, 1))


# ------------------------------------------------------------------------------------------
# xnor_linear on the same kernel
@pytest.mark.parametrize("n,f,k", [(1, 1, 1), (3, 31, 5), (2, 33, 70), (5, 100, 9), (1, 300, 130)])
def test_emulated_linear(n, f, k):
    gen = torch.Generator().manual_seed(f)
    x, w = random_input((n, f), gen), random_input((k, f), gen)
    ref = F.linear(sign(x), sign(w))
    xp, wp = emu.emulated_pack_signs(x), emu.emulated_pack_weights(w)
    assert xp.shape == (n, (f + 31) // 32) and wp.shape == (k, (f + 31) // 32)
    assert torch.equal(emu.emulated_xnor_linear_packed(xp, wp, f), ref)
    scale, bias = torch.randn(k, generator=gen), torch.randint(-2, 3, (k,), generator=gen).float()
    y = ref * scale + bias
    assert torch.equal(emu.emulated_xnor_linear_packed(xp, wp, f, scale=scale, bias=bias), y)
    packed = emu.emulated_xnor_linear_packed(xp, wp, f, scale=scale, bias=bias, pack_output=True)
    assert torch.equal(packed, reference_pack(y[:, :, None, None]).reshape(n, -1))


# ------------------------------------------------------------------------------------------
# properties of the kernel beyond the values
@pytest.mark.parametrize("tile", [0, 1])
def test_fragment_loads_are_bank_conflict_free(tile):
    assert emu.load_emulator().bnas_emu_fragment_bank_ways(tile) == 1


def test_launcher_rule_picks_tiles_and_copy_width():
    # auto mode (the GPU launcher's rule) is exact whichever tile and width it picks
    for case in [(2, 128, 6, 6, 12, 3, 1, 1, 1, 1), (1, 33, 5, 5, 7, 3, 1, 1, 1, 1)]:
        x, wt, ref, (stride, pad, dil, groups) = _conv_case(case, seed=1)
        for sms in (1, 1000):
            out = emu.emulated_xnor_conv2d_packed(
                emu.emulated_pack_signs(x),
                emu.emulated_pack_weights(wt),
                case[1],
                3,
                stride,
                pad,
                dil,
                groups,
                sm_count=sms,
            )
            assert torch.equal(out, ref)


def test_argument_errors_say_what_is_wrong():
    xp = torch.zeros(1, 5, 5, 2, dtype=torch.int32)
    wp = torch.zeros(4, 3, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="words per pixel"):
        emu.emulated_xnor_conv2d_packed(xp, wp, 100, 3)
    with pytest.raises(ValueError, match="does not fit"):
        emu.emulated_xnor_conv2d_packed(torch.zeros(1, 1, 1, 2, dtype=torch.int32), wp, 64, 3)
    with pytest.raises(ValueError, match="taps"):
        emu.emulated_xnor_conv2d_packed(
            torch.zeros(1, 9, 9, 1, dtype=torch.int32), torch.zeros(1, 9, 9, 1, dtype=torch.int32), 3, 9
        )
    with pytest.raises(ValueError, match="int32"):
        emu.emulated_xnor_conv2d_packed(xp.float(), wp, 64, 3)
    with pytest.raises(ValueError, match="out_groups"):
        emu.emulated_xnor_conv2d_packed(xp, wp, 64, 3, out_groups=3)
    with pytest.raises(ValueError, match="one value per output channel"):
        emu.emulated_xnor_conv2d_packed(xp, wp, 64, 3, scale=torch.ones(3))
    with pytest.raises(RuntimeError, match="vw must divide"):
        emu.emulated_xnor_conv2d_packed(
            torch.zeros(1, 5, 5, 1, dtype=torch.int32), torch.zeros(4, 3, 3, 1, dtype=torch.int32), 32, 3, vw=2
        )
    with pytest.raises(ValueError, match="3x3 kernel"):
        emu.emulated_xnor_conv2d_packed(xp, wp, 64, (1, 3))


# ------------------------------------------------------------------------------------------
# agreement with the project's shared format and packed-API reference (bnas.kernels)
def test_matches_project_packing_and_packed_reference():
    from bnas.kernels import packing, reference

    gen = torch.Generator().manual_seed(33)
    x, wt = random_input((2, 50, 6, 7), gen), random_input((36, 25, 3, 3), gen)
    scale, bias = torch.randn(36, generator=gen), torch.randint(-2, 3, (36,), generator=gen).float()
    xp = emu.emulated_pack_signs(x, 2)
    wp = emu.emulated_pack_weights(wt)
    assert torch.equal(xp, packing.pack_signs_reference(x, 2))
    assert torch.equal(wp, packing.pack_weights_reference(wt, 2))
    args = (xp, wp, 50, (3, 3), (2, 1), (1, 2), (1, 1), 2, scale, bias)
    assert torch.equal(emu.emulated_xnor_conv2d_packed(*args), reference.xnor_conv2d_packed(*args))
    assert torch.equal(emu.emulated_xnor_conv2d_packed(*args, True), reference.xnor_conv2d_packed(*args, True))
    xl, wl = random_input((3, 70), gen), random_input((40, 70), gen)
    largs = (
        packing.pack_signs_reference(xl),
        packing.pack_weights_reference(wl),
        70,
        scale[:1].expand(40).clone(),
        None,
    )
    assert torch.equal(emu.emulated_xnor_linear_packed(*largs), reference.xnor_linear_packed(*largs))
    assert torch.equal(emu.emulated_xnor_linear_packed(*largs, True), reference.xnor_linear_packed(*largs, True))


# ------------------------------------------------------------------------------------------
# tap sums (computed once per weight tensor) and stray bits past the channel count
def test_tap_sums_are_the_per_tap_weight_sums():
    gen = torch.Generator().manual_seed(8)
    for c, groups, ks in [(33, 1, 3), (70, 2, 3), (64, 1, 5), (3, 1, 7)]:
        wt = random_input((12, c // groups, ks, ks), gen)
        got = emu.emulated_tap_sums(emu.emulated_pack_weights(wt), c, ks, groups)
        assert got.dtype == torch.int32 and got.shape == (12, ks * ks)
        assert torch.equal(got, sign(wt).sum(1).flatten(1).to(torch.int32))


def test_precomputed_tap_sums_give_the_same_conv():
    x, wt, ref, (stride, pad, dil, groups) = _conv_case((2, 50, 6, 5, 20, 3, 1, 1, 1, 2), seed=12)
    xp, wp = emu.emulated_pack_signs(x, groups), emu.emulated_pack_weights(wt)
    sums = emu.emulated_tap_sums(wp, 50, 3, groups)
    out = emu.emulated_xnor_conv2d_packed(xp, wp, 50, 3, stride, pad, dil, groups, tap_sums=sums)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="tap_sums must be int32"):
        emu.emulated_xnor_conv2d_packed(xp, wp, 50, 3, stride, pad, dil, groups, tap_sums=sums[:, :4])
    # the kernel really reads them: wrong sums give a wrong result
    wrong = emu.emulated_xnor_conv2d_packed(xp, wp, 50, 3, stride, pad, dil, groups, tap_sums=sums + 1)
    assert not torch.equal(wrong, ref)


def _with_stray_tail_bits(packed: torch.Tensor, cg: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    """Sets random bits past the channel count in the last word of every group."""
    wg = (cg + 31) // 32
    junk = torch.randint(0, 2**31, packed.shape[:-1] + (groups,), generator=gen, dtype=torch.int64)
    keep = (1 << (cg % 32)) - 1
    dirty = packed.clone().reshape(*packed.shape[:-1], groups, wg)
    dirty[..., -1] = (dirty[..., -1].to(torch.int64) | (junk & ~keep)).to(torch.int32)
    return dirty.reshape(packed.shape)


@pytest.mark.parametrize(
    "case",
    [(2, 33, 6, 5, 20, 3, 1, 1, 1, 1), (1, 70, 5, 5, 12, 3, 1, 1, 1, 2), (1, 3, 7, 7, 40, 7, 2, 3, 1, 1)],
    ids=["cg33", "cg35x2", "rgb7x7"],
)
def test_stray_tail_bits_are_masked(case):
    x, wt, ref, (stride, pad, dil, groups) = _conv_case(case, seed=4)
    c, k = case[1], case[4]
    cg = c // groups
    gen = torch.Generator().manual_seed(99)
    xp, wp = emu.emulated_pack_signs(x, groups), emu.emulated_pack_weights(wt)
    xd, wd = _with_stray_tail_bits(xp, cg, groups, gen), _with_stray_tail_bits(wp, cg, 1, gen)
    assert not torch.equal(xd, xp) and not torch.equal(wd, wp)
    scale, bias = torch.randn(k, generator=gen), torch.randint(-2, 3, (k,), generator=gen).float()
    for tile in ("small", "large"):
        got = emu.emulated_xnor_conv2d_packed(xd, wd, c, wt.shape[2:], stride, pad, dil, groups, tile=tile)
        assert torch.equal(got, ref)
        packed = emu.emulated_xnor_conv2d_packed(
            xd, wd, c, wt.shape[2:], stride, pad, dil, groups, scale=scale, bias=bias, pack_output=True, tile=tile
        )
        assert torch.equal(packed, reference_pack(ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)))
    assert torch.equal(
        emu.emulated_tap_sums(wd, c, wt.shape[2:], groups), emu.emulated_tap_sums(wp, c, wt.shape[2:], groups)
    )


# ------------------------------------------------------------------------------------------
# split-K: depth slices whose partial sums meet in a workspace; the last block runs the epilogue
@pytest.mark.parametrize(
    "case,splits",
    [
        ((1, 256, 5, 5, 64, 3, 1, 1, 1, 1), 2),  # Q = 72 words: 5 stages in 2 slices
        ((1, 256, 4, 3, 40, 3, 1, 1, 1, 1), 5),  # one stage per slice, a half-full last stage
        ((2, 100, 7, 6, 70, 3, 2, 1, 1, 1), 3),  # 2 channel blocks, partial columns
        ((1, 96, 5, 5, 48, 3, 1, 1, 1, 3), 2),  # groups: a boundary inside an output word
        ((1, 40, 9, 9, 12, 7, 1, 3, 1, 1), 8),  # 49 taps, 8 slices
    ],
)
def test_split_k_is_bit_exact(case, splits):
    x, wt, ref, (stride, pad, dil, groups) = _conv_case(case, seed=splits)
    c, k = case[1], case[4]
    gen = torch.Generator().manual_seed(splits)
    scale, bias = torch.randn(k, generator=gen), torch.randint(-2, 3, (k,), generator=gen).float()
    xp, wp = emu.emulated_pack_signs(x, groups), emu.emulated_pack_weights(wt)
    args = (xp, wp, c, wt.shape[2:], stride, pad, dil, groups)
    assert torch.equal(emu.emulated_xnor_conv2d_packed(*args, splits=splits), ref)
    y = ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    both = emu.emulated_xnor_conv2d_packed(*args, scale=scale, bias=bias, splits=splits)
    assert torch.equal(both, y)
    packed = emu.emulated_xnor_conv2d_packed(*args, scale=scale, bias=bias, pack_output=True, splits=splits)
    assert torch.equal(packed, reference_pack(y))


def _plan_3x3(n, c, h, w, k, groups=1):
    """The conv plan of a 3x3, stride 1, padding 1 conv on zero packed tensors (the launcher's
    rules read only its dims)."""
    from bnas.kernels.conv_plan import plan_conv

    words = (c // groups + 31) // 32
    return plan_conv(
        torch.zeros(n, h, w, groups * words, dtype=torch.int32),
        torch.zeros(k, 3, 3, words, dtype=torch.int32),
        c,
        3,
        1,
        1,
        1,
        groups,
    )


def test_launcher_splits_only_grids_that_leave_sms_idle():
    plan = _plan_3x3
    # batch 1, 7x7x512 -> 512: 8 blocks of 64x64 on 132 SMs, 9 stages -> 4 slices of >= 2 stages
    assert emu.launcher_splits(plan(1, 512, 7, 7, 512), 132) == 4
    assert emu.launcher_splits(plan(1, 256, 14, 14, 256), 132) == 2  # 16 blocks, 5 stages
    assert emu.launcher_splits(plan(64, 512, 7, 7, 512), 132) == 1  # 392 blocks: no split
    assert emu.launcher_splits(plan(1, 32, 7, 7, 32), 132) == 1  # one stage: nothing to split
    assert emu.launcher_splits(plan(1, 512, 7, 7, 512), 8) == 1  # the 8 blocks fill 8 SMs
    # the launcher's own choice (here 2 slices) is exact
    x, wt, ref, _ = _conv_case((1, 256, 5, 5, 64, 3, 1, 1, 1, 1), seed=3)
    assert emu.launcher_splits(plan(1, 256, 5, 5, 64), 132) == 2
    out = emu.emulated_xnor_conv2d_packed(emu.emulated_pack_signs(x), emu.emulated_pack_weights(wt), 256, 3, 1, 1)
    assert torch.equal(out, ref)


def test_launcher_takes_the_large_tile_only_for_groups_that_fill_it():
    plan = _plan_3x3
    assert emu.launcher_tile(plan(256, 256, 8, 8, 256), 132) == "large"  # 256 blocks of 128x128
    # 64 channels would leave half of every 128-column block idle: 4,096 small blocks instead
    assert emu.launcher_tile(plan(256, 64, 32, 32, 64), 132) == "small"
    assert emu.launcher_tile(plan(256, 256, 32, 32, 256, groups=4), 132) == "small"  # 64 per group
    assert emu.launcher_tile(plan(64, 512, 7, 7, 512), 132) == "small"  # 100 large blocks < 132 SMs
    assert emu.launcher_tile(plan(64, 512, 7, 7, 512), 100) == "large"


def test_cuda_backend_keeps_tap_sums_per_weight_tensor(monkeypatch):
    # the GPU entry point computes a packed weight tensor's tap sums once and reuses them until
    # the tensor changes in place or is freed (here with the emulator standing in for the device)
    import gc

    from bnas.kernels import cuda_backend as cb
    from bnas.kernels.conv_plan import plan_conv

    calls = []

    def fake_tap_sums(w_packed, in_channels, kernel_size, groups=1):
        calls.append((in_channels, kernel_size, groups))
        return emu.emulated_tap_sums(w_packed, in_channels, kernel_size, groups)

    monkeypatch.setattr(cb, "tap_sums", fake_tap_sums)
    gen = torch.Generator().manual_seed(2)
    wt = random_input((16, 40, 3, 3), gen)
    wp = emu.emulated_pack_weights(wt)
    plan = plan_conv(torch.zeros(1, 5, 5, 2, dtype=torch.int32), wp, 40, 3, 1, 1)
    first = cb._cached_tap_sums(wp, plan)
    assert cb._cached_tap_sums(wp, plan) is first and len(calls) == 1
    assert torch.equal(first, sign(wt).sum(1).flatten(1).to(torch.int32))
    wp[0, 0, 0, 0] ^= 1  # in place: the version counter moves
    again = cb._cached_tap_sums(wp, plan)
    assert len(calls) == 2 and not torch.equal(again, first)
    other_plan = plan_conv(torch.zeros(1, 5, 5, 4, dtype=torch.int32), wp, 80, 3, 1, 1, groups=2)
    cb._cached_tap_sums(wp, other_plan)  # the same words read as another conv
    assert len(calls) == 3 and calls[-1] == (80, (3, 3), 2)
    # a new tensor with the same words computes its own; nothing is stored on the tensor (a
    # saved model would carry it), and the entry goes when the tensor does
    assert cb._cached_tap_sums(wp.clone(), plan) is not None and len(calls) == 4
    assert not [k for k in vars(wp) if "tap" in k]
    key = id(wp)
    assert key in cb._tap_sum_cache
    del wp
    gc.collect()
    assert key not in cb._tap_sum_cache
