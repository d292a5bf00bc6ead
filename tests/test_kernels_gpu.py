"""The CUDA XNOR kernel on a real GPU: bit-exact against the float reference.  Skipped
cleanly without a CUDA device of compute capability 8.0+ (the emulator tests in
test_cuda_emulated.py cover the same code on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnas.kernels import cuda_backend as cb
from bnas.kernels import emulator as emu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def extension():
    if torch.cuda.get_device_capability() < cb.MIN_CAPABILITY:
        pytest.skip("1-bit mma.sync .and.popc needs compute capability 8.0+")
    return cb.load_extension()


def sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


def random_input(shape, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < 0.05] = 0.0
    return x


def test_hardware_mma_matches_the_emulator_model(extension):
    # the one hardware instruction against the software model the emulator uses
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        a = torch.randint(-(2**31), 2**31, (32, 4), generator=gen, dtype=torch.int64).to(torch.int32)
        b = torch.randint(-(2**31), 2**31, (32, 2), generator=gen, dtype=torch.int64).to(torch.int32)
        c = torch.randint(-(10**6), 10**6, (32, 4), generator=gen, dtype=torch.int32)
        d = torch.empty(32, 4, dtype=torch.int32, device=DEV)
        extension.mma_single(a.to(DEV), b.to(DEV), c.to(DEV), d)
        assert torch.equal(d.cpu(), emu.emulated_mma(a, b, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_signs_on_device(dtype):
    gen = torch.Generator().manual_seed(1)
    x = random_input((3, 70, 5, 7), gen)
    got = cb.pack_signs(x.to(DEV, dtype), groups=2)
    assert torch.equal(got.cpu(), emu.emulated_pack_signs(x, groups=2))
    got_cl = cb.pack_signs(x.to(DEV, dtype).contiguous(memory_format=torch.channels_last), groups=2)
    assert torch.equal(got_cl, got)


CASES = [
    # (N, C, H, W, K, k, stride, padding, dilation, groups)
    (1, 1, 5, 5, 3, 3, 1, 1, 1, 1),
    (2, 3, 7, 6, 5, 3, 1, 0, 1, 1),
    (1, 31, 9, 7, 8, 3, 2, 1, 1, 1),
    (2, 33, 7, 9, 20, 3, 1, 2, 1, 1),
    (1, 65, 6, 5, 17, 3, 2, 2, 1, 1),
    (2, 100, 9, 8, 70, 3, 1, 2, 2, 1),
    (3, 64, 5, 5, 24, 3, 1, 1, 1, 2),
    (1, 16, 6, 6, 16, 3, 1, 1, 1, 16),
    (2, 40, 5, 5, 30, 1, 1, 0, 1, 1),
    (1, 24, 9, 9, 10, 5, 1, 2, 1, 1),
    (1, 7, 8, 13, 6, (1, 3), (1, 2), (0, 1), 1, 1),
    (2, 40, 9, 9, 12, 7, 1, 3, 1, 1),  # 49 taps
    (1, 33, 8, 8, 9, 8, 1, 4, 1, 1),  # 64 taps
    (1, 256, 4, 3, 8, 3, 1, 1, 1, 1),  # Q = 72 words: a half-full last stage
    # large enough for the 128x128 tile and every copy width
    (32, 128, 16, 16, 128, 3, 1, 1, 1, 1),
    (16, 256, 8, 8, 256, 3, 1, 1, 1, 1),
    (8, 96, 14, 14, 192, 3, 2, 1, 1, 1),
    (4, 512, 7, 7, 512, 3, 1, 1, 1, 1),
    (1, 512, 7, 7, 512, 3, 1, 1, 1, 1),
    # >= 256 blocks of 128x128: the launcher takes the large tile (copy widths 4, 2, 1)
    (64, 128, 16, 16, 256, 3, 1, 1, 1, 1),
    (128, 64, 16, 16, 128, 3, 1, 1, 1, 1),
    (128, 31, 16, 16, 128, 3, 1, 1, 1, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_conv_is_bit_exact_on_device(case):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    kh, kw = (ks, ks) if isinstance(ks, int) else ks
    gen = torch.Generator().manual_seed(CASES.index(case))  # ks may be a (KH, KW) pair: no sum()
    x = random_input((n, c, h, w), gen)
    wt = random_input((k, c // groups, kh, kw), gen)
    ref = F.conv2d(sign(x), sign(wt), None, stride, pad, dil, groups)
    out = cb.xnor_conv2d(x.to(DEV), wt.to(DEV), stride, pad, dil, groups)
    assert torch.equal(out.cpu(), ref)


def test_epilogue_and_packed_output_on_device():
    gen = torch.Generator().manual_seed(5)
    x, wt = random_input((4, 64, 9, 9), gen), random_input((80, 32, 3, 3), gen)
    scale, bias = torch.randn(80, generator=gen), torch.randint(-3, 4, (80,), generator=gen).float()
    ref = F.conv2d(sign(x), sign(wt), None, 1, 1, 1, 2)
    y = ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    xp, wp = cb.pack_signs(x.to(DEV), 2), cb.pack_weights(wt.to(DEV))
    out = cb.xnor_conv2d_packed(xp, wp, 64, 3, 1, 1, 1, 2, scale=scale.to(DEV), bias=bias.to(DEV))
    assert torch.equal(out.cpu(), y)
    for out_groups in (1, 2):
        packed = cb.xnor_conv2d_packed(
            xp, wp, 64, 3, 1, 1, 1, 2, scale=scale.to(DEV), bias=bias.to(DEV), pack_output=True, out_groups=out_groups
        )
        assert torch.equal(packed.cpu(), emu.emulated_pack_signs(y, out_groups))


@pytest.mark.parametrize("n,f,k", [(1, 33, 10), (7, 512, 1000), (256, 4096, 1000)])
def test_linear_on_device(n, f, k):
    gen = torch.Generator().manual_seed(f)
    x, w = random_input((n, f), gen), random_input((k, f), gen)
    assert torch.equal(cb.xnor_linear(x.to(DEV), w.to(DEV)).cpu(), F.linear(sign(x), sign(w)))


def test_device_matches_emulator_exactly():
    # the emulator is the CPU proof of this kernel: same outputs, float and packed
    gen = torch.Generator().manual_seed(9)
    x, wt = random_input((2, 48, 7, 7), gen), random_input((40, 48, 3, 3), gen)
    scale, bias = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    xp, wp = emu.emulated_pack_signs(x), emu.emulated_pack_weights(wt)
    emulated = emu.emulated_xnor_conv2d_packed(xp, wp, 48, 3, 2, 1, scale=scale, bias=bias)
    dev = cb.xnor_conv2d_packed(xp.to(DEV), wp.to(DEV), 48, 3, 2, 1, scale=scale.to(DEV), bias=bias.to(DEV))
    assert torch.equal(dev.cpu(), emulated)


def test_dispatcher_routes_cuda_tensors_to_tensor_cores():
    import bnas.kernels as K

    assert K.backend("cuda") == "cuda-tensor-core"
    gen = torch.Generator().manual_seed(4)
    x, wt = random_input((2, 96, 9, 9), gen), random_input((64, 96, 3, 3), gen)
    with K.use_backend("cuda-tensor-core"):
        out = K.xnor_conv2d(x.to(DEV), wt.to(DEV), 1, 1)
        xp = K.pack_signs(x.to(DEV))
        packed = K.xnor_conv2d_packed(xp, K.pack_weights(wt.to(DEV)), 96, 3, 1, 1, pack_output=True)
    ref = F.conv2d(sign(x), sign(wt), None, 1, 1)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(packed.cpu(), emu.emulated_pack_signs(ref))
    xl, wl = x.reshape(2, -1), random_input((64, x[0].numel()), gen)
    with K.use_backend("cuda-tensor-core"):
        lin = K.xnor_linear(xl.to(DEV), wl.to(DEV))
    assert torch.equal(lin.cpu(), F.linear(sign(xl), sign(wl)))


def test_tap_sums_and_stray_tail_bits_on_device():
    from test_cuda_emulated import _with_stray_tail_bits

    gen = torch.Generator().manual_seed(13)
    x, wt = random_input((2, 70, 6, 6), gen), random_input((24, 35, 3, 3), gen)
    ref = F.conv2d(sign(x), sign(wt), None, 1, 1, 1, 2)
    xp, wp = cb.pack_signs(x.to(DEV), 2), cb.pack_weights(wt.to(DEV))
    sums = cb.tap_sums(wp, 70, 3, 2)
    assert torch.equal(sums.cpu(), sign(wt).sum(1).flatten(1).to(torch.int32))
    assert torch.equal(cb.xnor_conv2d_packed(xp, wp, 70, 3, 1, 1, 1, 2, tap_sums=sums).cpu(), ref)
    xd = _with_stray_tail_bits(xp.cpu(), 35, 2, gen).to(DEV)
    wd = _with_stray_tail_bits(wp.cpu(), 35, 1, gen).to(DEV)
    assert torch.equal(cb.xnor_conv2d_packed(xd, wd, 70, 3, 1, 1, 1, 2).cpu(), ref)
