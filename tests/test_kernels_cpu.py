"""XNOR-popcount kernels: bit-exact against the float reference on every CPU code path.

The C++ extension is built once per session (cached across sessions in the bnas cache);
each backend this machine can run is forced in turn and compared with
``conv2d(sign(x), sign(w))`` (``sign(0) = +1``, zero padding contributing 0).

The expected values are computed here, independently of bnas: ``sign`` and the packed
format are written out below rather than taken from ``bnas.binarize`` or
``bnas.kernels.packing``, which the ``reference`` backend itself uses. With
``BNAS_REQUIRE_EXTENSION=1`` (CI) an extension that cannot be built fails the session
instead of skipping every CPU backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bnas.errors
import bnas.kernels as kernels
from bnas.kernels import cpu_backend

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

REPO = Path(__file__).resolve().parents[1]
ALL_CPU = ["cpu-avx512", "cpu-avx2", "cpu-popcnt"]
CPU_FLAGS = {"cpu-avx512": {"avx512f", "avx512bw", "avx512_vpopcntdq"}, "cpu-avx2": {"avx2"}, "cpu-popcnt": {"popcnt"}}

# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 1, 5, 7, 3, 3, 1, 1, 1, 1),
    (3, 3, 9, 7, 8, 3, 1, 0, 1, 1),
    (1, 31, 7, 9, 17, 3, 2, 1, 1, 1),
    (3, 33, 11, 5, 40, 3, 1, 2, 1, 1),
    (1, 65, 9, 9, 70, 3, 2, 2, 2, 1),
    (3, 100, 7, 7, 36, 3, 1, 1, 2, 1),
    (1, 64, 8, 8, 48, 3, 1, 1, 1, 2),
    (3, 100, 9, 7, 100, 3, 2, 1, 1, 4),
    (1, 66, 6, 6, 66, 1, 1, 0, 1, 2),
    (1, 128, 5, 5, 64, 5, 1, 2, 1, 1),
    (3, 256, 5, 5, 130, 3, 1, 1, 1, 1),
    (1, 5, 3, 3, 4, 1, 1, 2, 1, 1),  # whole output rows made only of padding
    (1, 96, 13, 11, 24, 3, 2, 1, 1, 4),  # 4 groups of 24 channels: word-crossing blocks
]
LINEAR_CASES = [(1, 1, 1), (3, 31, 5), (5, 65, 33), (2, 100, 70), (4, 2048, 10)]


def test_kernel_tests_run_on_two_threads() -> None:
    """conftest runs the suite on one torch thread; this file's tests run the kernels'
    threaded paths on two (the pytestmark above), whatever the machine's core count."""
    assert torch.get_num_threads() == 2


def sign(t: torch.Tensor) -> torch.Tensor:
    """The contract's sign: +1 for x >= 0 (so sign(0) = +1), else -1."""
    return torch.where(t >= 0, 1.0, -1.0)


def words_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 32*w) 0/1 -> (..., w) int32 words, bit j of word i = element 32*i + j."""
    shape = bits.shape[:-1] + (bits.shape[-1] // 32, 32)
    weights = 1 << torch.arange(32, dtype=torch.int64)
    words = (bits.reshape(shape).to(torch.int64) * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_signs_reference(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The packed format, written out: NCHW -> NHWC words per group ((N, F) -> (N, words)),
    bit 1 where x >= 0, padding bits 0."""
    x4 = x if x.dim() == 4 else x[:, :, None, None]
    n, c, h, w = x4.shape
    cg = c // groups
    wg = (cg + 31) // 32
    bits = (x4 >= 0).permute(0, 2, 3, 1).reshape(n, h, w, groups, cg)
    padded = torch.zeros(n, h, w, groups, wg * 32, dtype=torch.bool)
    padded[..., :cg] = bits
    words = words_from_bits(padded).reshape(n, h, w, groups * wg)
    return words if x.dim() == 4 else words.reshape(n, -1)


def pack_weights_reference(w: torch.Tensor) -> torch.Tensor:
    """Conv weights (K, C/groups, kh, kw) are packed like an NCHW batch of K images."""
    return pack_signs_reference(w)


@pytest.fixture(scope="session")
def cpu_backends() -> list[str]:
    """Builds (or loads) the extension once for the whole session; with
    BNAS_REQUIRE_EXTENSION=1 a failed build raises here, failing every test that uses it."""
    return cpu_backend.supported_backends()


@pytest.fixture(params=ALL_CPU + ["reference"])
def backend_name(request, cpu_backends) -> str:
    name = request.param
    if name != "reference" and name not in cpu_backends:
        pytest.skip(f"{name} cannot run on this machine ({cpu_backend.build_error() or 'CPU feature missing'})")
    with kernels.use_backend(name):
        yield name


def small_ints(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Values in {-2, ..., 2}: many exact zeros, which must binarize to +1."""
    return torch.randint(-2, 3, shape, generator=generator).float()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_every_backend_the_cpu_supports_is_offered(cpu_backends):
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    if cpu_backend.build_error():
        pytest.skip(f"extension not built: {cpu_backend.build_error()}")
    expected = [name for name in ALL_CPU if CPU_FLAGS[name] <= flags]
    assert cpu_backends == expected
    assert kernels.backend() == (expected[0] if expected else "reference")


def test_use_backend_forces_and_restores(cpu_backends):
    default = kernels.backend()
    for name in cpu_backends + ["reference"]:
        with kernels.use_backend(name):
            assert kernels.backend("cpu") == name
        assert kernels.backend() == default


def test_use_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="unknown kernel backend 'avx9000'; choose one of"):
        with kernels.use_backend("avx9000"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda-tensor-core' cannot run here"):
            with kernels.use_backend("cuda-tensor-core"):
                pass


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_bit_exact(backend_name, case):
    n, c, h, w, k, ks, stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x = small_ints(n, c, h, w, generator=gen)
    weight = small_ints(k, c // groups, ks, ks, generator=gen)
    expected = F.conv2d(sign(x), sign(weight), None, stride, padding, dilation, groups)
    out = kernels.xnor_conv2d(x, weight, stride, padding, dilation, groups)
    assert out.dtype == torch.float32
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


def test_conv2d_rectangular_kernel_stride_padding(backend_name):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 45, 10, 9, generator=gen)
    weight = torch.randn(20, 45, 1, 3, generator=gen)
    expected = F.conv2d(sign(x), sign(weight), None, (2, 1), (1, 0), (1, 2))
    out = kernels.xnor_conv2d(x, weight, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "x".join(map(str, c)))
def test_linear_bit_exact(backend_name, case):
    n, f, k = case
    gen = torch.Generator().manual_seed(f * 1000 + k)
    x = small_ints(n, f, generator=gen)
    weight = small_ints(k, f, generator=gen)
    out = kernels.xnor_linear(x, weight)
    assert out.shape == (n, k)
    assert torch.equal(out, F.linear(sign(x), sign(weight)))


@pytest.mark.parametrize("groups,k", [(1, 70), (2, 100), (4, 96)])
def test_conv2d_epilogue_scale_bias_and_packed_output(backend_name, groups, k):
    gen = torch.Generator().manual_seed(groups * 100 + k)
    x = small_ints(3, 40 * groups // 2 * 2, 7, 9, generator=gen)
    c = x.shape[1]
    weight = small_ints(k, c // groups, 3, 3, generator=gen)
    # Exactly representable scales and integer biases make many outputs exactly zero.
    scale = torch.tensor([0.5, -1.25, 2.0, 1.0])[torch.randint(0, 4, (k,), generator=gen)]
    bias = torch.randint(-3, 4, (k,), generator=gen).float()
    conv = F.conv2d(sign(x), sign(weight), None, 1, 1, 1, groups)
    expected = conv * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    assert (expected == 0).any()
    xp = kernels.pack_signs(x, groups)
    wp = kernels.pack_weights(weight, groups)
    out = kernels.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, 1, groups, scale=scale, bias=bias)
    assert torch.equal(out, expected)
    packed = kernels.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, 1, groups, scale=scale, bias=bias, pack_output=True)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, pack_signs_reference(expected))
    # Random real-valued scale and bias: still the same float operations, bit for bit.
    scale = torch.randn(k, generator=gen)
    bias = torch.randn(k, generator=gen)
    out = kernels.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, 1, groups, scale=scale, bias=bias)
    assert torch.equal(out, conv * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    only_bias = kernels.xnor_conv2d_packed(xp, wp, c, 3, 1, 1, 1, groups, bias=bias)
    assert torch.equal(only_bias, conv + bias.view(1, -1, 1, 1))


def test_linear_epilogue_and_packed_output(backend_name):
    gen = torch.Generator().manual_seed(3)
    x = small_ints(6, 300, generator=gen)
    weight = small_ints(77, 300, generator=gen)
    scale = torch.randn(77, generator=gen)
    bias = torch.randint(-4, 5, (77,), generator=gen).float()
    expected = F.linear(sign(x), sign(weight)) * scale + bias
    xp, wp = kernels.pack_signs(x), kernels.pack_weights(weight)
    assert torch.equal(kernels.xnor_linear_packed(xp, wp, 300, scale, bias), expected)
    packed = kernels.xnor_linear_packed(xp, wp, 300, scale, bias, pack_output=True)
    assert packed.shape == (6, 3)
    assert torch.equal(packed, pack_signs_reference(expected))


def test_packed_layers_chain_like_the_float_network(backend_name):
    """conv -> BN-folded epilogue -> sign -> conv, all on packed tensors."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 50, 9, 9, generator=gen)
    w1 = torch.randn(70, 50, 3, 3, generator=gen)
    w2 = torch.randn(33, 70, 3, 3, generator=gen)
    scale, bias = torch.rand(70, generator=gen) + 0.5, torch.randn(70, generator=gen) * 4
    hidden = F.conv2d(sign(x), sign(w1), None, 1, 1) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    expected = F.conv2d(sign(hidden), sign(w2), None, 2, 1)
    h = kernels.xnor_conv2d_packed(
        kernels.pack_signs(x), kernels.pack_weights(w1), 50, 3, 1, 1, scale=scale, bias=bias, pack_output=True
    )
    assert h.shape == (2, 9, 9, 3)
    out = kernels.xnor_conv2d_packed(h, kernels.pack_weights(w2), 70, 3, 2, 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "shape,groups",
    [
        ((2, 1, 3, 5), 1),
        ((1, 33, 4, 3), 1),
        ((2, 100, 5, 2), 4),
        ((1, 64, 3, 3), 2),
        ((3, 257, 1, 1), 1),
        ((4, 70), 1),
        ((2, 70, 9, 11), 2),
        ((3, 1000), 1),
        ((2, 96, 5, 4), 3),
        ((1, 200, 3, 5), 1),
    ],
)
def test_pack_signs_matches_reference_format(backend_name, shape, groups):
    gen = torch.Generator().manual_seed(sum(shape))
    x = small_ints(*shape, generator=gen)
    packed = kernels.pack_signs(x, groups)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, pack_signs_reference(x, groups))
    channels = shape[1]
    assert torch.equal(kernels.unpack_signs(packed, channels, groups), sign(x))
    if x.dim() == 4:  # channels_last memory (packed pixel by pixel) gives the same words
        assert torch.equal(kernels.pack_signs(x.contiguous(memory_format=torch.channels_last), groups), packed)


def values_around(threshold: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values at, one float step above and below, and far from a threshold per channel (dim 1):
    the ties and near-ties where packing against it must equal the sign of ``x - threshold``."""
    t = threshold.view(1, -1, *([1] * (len(shape) - 2))).expand(shape)
    pick = torch.randint(0, 5, shape, generator=generator)
    far = torch.randn(shape, generator=generator) * 4
    up, down = (
        torch.nextafter(t, torch.full_like(t, float("inf"))),
        torch.nextafter(t, torch.full_like(t, -float("inf"))),
    )
    return torch.where(pick == 0, t, torch.where(pick == 1, up, torch.where(pick == 2, down, t + far))).contiguous()


@pytest.mark.parametrize(
    "shape, groups", [((2, 33, 5, 4), 1), ((2, 70, 3, 5), 2), ((1, 64, 6, 6), 4), ((3, 100), 1), ((2, 31), 1)]
)
def test_pack_signs_against_a_threshold_is_the_sign_of_x_minus_it(backend_name, shape, groups):
    gen = torch.Generator().manual_seed(sum(shape) + groups)
    threshold = torch.randn(shape[1], generator=gen)
    threshold[::7] = 0.0
    x = values_around(threshold, shape, gen)
    expected = pack_signs_reference(x - threshold.view(1, -1, *([1] * (x.dim() - 2))), groups)
    ties = x == threshold.view(1, -1, *([1] * (x.dim() - 2)))
    assert ties.any() and (~ties).any()
    assert torch.equal(kernels.pack_signs(x, groups, threshold), expected)
    if x.dim() == 4:
        channels_last = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(kernels.pack_signs(channels_last, groups, threshold), expected)
    assert not torch.equal(expected, pack_signs_reference(x, groups))  # the threshold moved bits
    with pytest.raises(ValueError, match=rf"one value per channel \({shape[1]}\) on cpu, got {shape[1] - 1}"):
        kernels.pack_signs(x, groups, threshold[1:])


def test_fused_step_packs_its_output_against_a_threshold(backend_name):
    """The packed output of a step whose reader has a threshold per channel (RSign) is the
    sign of ``y - threshold``, in every output combination, ties included (integer sums and
    integer thresholds)."""
    gen = torch.Generator().manual_seed(8)
    x, weight = small_ints(2, 40, 6, 5, generator=gen), small_ints(36, 40, 3, 3, generator=gen)
    residual = small_ints(2, 36, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    threshold = small_ints(36, generator=gen) * 3
    xp, wp = kernels.pack_signs(x), kernels.pack_weights(weight)
    conv = F.conv2d(sign(x), sign(weight), None, 1, 1)
    for res in (None, residual):
        expected = conv if res is None else conv + res
        want = pack_signs_reference(expected - threshold.view(1, -1, 1, 1))
        assert (expected == threshold.view(1, -1, 1, 1)).any()
        for float_output in (True, False):
            out, packed = kernels.xnor_conv2d_fused(
                xp, wp, 40, 3, 1, 1, residual=res, float_output=float_output, pack_output=True, pack_threshold=threshold
            )
            assert torch.equal(packed, want)
            assert out is None if not float_output else torch.equal(out, expected)
        fused = kernels.FusedConv2d(wp, 40, 3, 1, 1)
        assert torch.equal(fused(xp, res, False, True, False, threshold)[1], want)


def rprelu(y: torch.Tensor, shift_in: torch.Tensor, slope: torch.Tensor, shift_out: torch.Tensor) -> torch.Tensor:
    """ReActNet's RPReLU, written out: y - shift_in, times slope where negative, + shift_out."""
    view = (1, -1, 1, 1)
    z = y - shift_in.view(view)
    return torch.where(z >= 0, z, slope.view(view) * z) + shift_out.view(view)


def test_fused_step_applies_rprelu_after_the_residual(backend_name):
    gen = torch.Generator().manual_seed(9)
    x, weight = small_ints(2, 40, 6, 5, generator=gen), small_ints(36, 40, 3, 3, generator=gen)
    scale, bias = torch.rand(36, generator=gen) + 0.5, torch.randn(36, generator=gen)
    residual = torch.randn(2, 36, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    params = (torch.randn(36, generator=gen), torch.rand(36, generator=gen) - 0.2, torch.randn(36, generator=gen))
    threshold = torch.randn(36, generator=gen)
    xp, wp = kernels.pack_signs(x), kernels.pack_weights(weight)
    conv = F.conv2d(sign(x), sign(weight), None, 1, 1) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    expected = rprelu(conv + residual, *params)
    negative = conv + residual - params[0].view(1, -1, 1, 1) < 0
    assert negative.any() and (~negative).any()
    out, packed = kernels.xnor_conv2d_fused(
        xp, wp, 40, 3, 1, 1, 1, 1, scale, bias, residual.clone(), True, True, pack_threshold=threshold, rprelu=params
    )
    assert torch.equal(out, expected)  # bit for bit: the same float ops in the same order
    assert torch.equal(packed, pack_signs_reference(expected - threshold.view(1, -1, 1, 1)))
    into = residual.clone()
    out, _ = kernels.xnor_conv2d_fused(
        xp, wp, 40, 3, 1, 1, 1, 1, scale, bias, into, True, into_residual=True, rprelu=params
    )
    assert out.data_ptr() == into.data_ptr() and torch.equal(into, expected)
    _, packed = kernels.xnor_conv2d_fused(xp, wp, 40, 3, 1, 1, 1, 1, scale, bias, None, False, True, rprelu=params)
    assert torch.equal(packed, pack_signs_reference(rprelu(conv, *params)))


def test_packed_bit_layout_by_hand():
    x = -torch.ones(1, 40, 1, 1)
    x[0, [0, 31, 33, 39], 0, 0] = 0.0  # zeros are +1 -> bit set
    words = pack_signs_reference(x)[0, 0, 0]
    assert words.tolist() == [1 | -(2**31), (1 << 1) | (1 << 7)]  # bits past 40 stay 0
    grouped = pack_signs_reference(x, groups=2)[0, 0, 0]  # 20 channels per group, 1 word each
    assert grouped.tolist() == [1, (1 << 11) | (1 << 13) | (1 << 19)]
    w = pack_weights_reference(torch.ones(2, 3, 1, 2))
    assert w.shape == (2, 1, 2, 1) and w.unique().tolist() == [0b111]
    # the project's packer (the reference backend's) writes the same words
    from bnas.kernels import packing

    assert torch.equal(packing.pack_signs_reference(x), pack_signs_reference(x))
    assert torch.equal(packing.pack_signs_reference(x, groups=2), pack_signs_reference(x, groups=2))
    assert torch.equal(packing.pack_weights_reference(torch.ones(2, 3, 1, 2)), w)


def test_inplace_update_of_packed_weights_is_seen(backend_name):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 40, 6, 6, generator=gen)
    w = torch.randn(24, 40, 3, 3, generator=gen)
    xp, wp = kernels.pack_signs(x), kernels.pack_weights(w)
    kernels.xnor_conv2d_packed(xp, wp, 40, 3, padding=1)
    wp.copy_(kernels.pack_weights(-w))  # new weights in the same tensor
    out = kernels.xnor_conv2d_packed(xp, wp, 40, 3, padding=1)
    assert torch.equal(out, F.conv2d(sign(x), sign(-w), None, 1, 1))
    # Weights packed inside xnor_conv2d are temporaries: their cache entries go with them.
    cached = len(cpu_backend._repacked)
    for _ in range(3):
        kernels.xnor_conv2d(x, w, padding=1)
    assert len(cpu_backend._repacked) == cached


def test_argument_errors_say_what_to_do():
    x = torch.randn(1, 40, 5, 5)
    w = torch.randn(8, 40, 3, 3)
    xp, wp = kernels.pack_signs(x), kernels.pack_weights(w)
    with pytest.raises(TypeError, match="int32 packed words"):
        kernels.xnor_conv2d_packed(xp.float(), wp, 40, 3)
    with pytest.raises(ValueError, match="40 channels in 4 groups need 4"):
        kernels.xnor_conv2d_packed(xp, wp, 40, 3, groups=4)
    with pytest.raises(ValueError, match=r"expected \(K, 5, 5, 2\)"):
        kernels.xnor_conv2d_packed(xp, wp, 40, 5)
    with pytest.raises(ValueError, match="one value per output channel"):
        kernels.xnor_conv2d_packed(xp, wp, 40, 3, scale=torch.ones(7))
    with pytest.raises(ValueError, match="weights expect 40 per group with groups=2"):
        kernels.xnor_conv2d(x, w, groups=2)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        kernels.pack_signs(x, groups=3)
    with pytest.raises(TypeError, match="must be a float tensor"):
        kernels.pack_signs(x.to(torch.int64))
    with pytest.raises(ValueError, match="40 features pack into 2 words"):
        kernels.xnor_linear_packed(xp.reshape(25, 2), kernels.pack_weights(torch.randn(3, 70)), 40)


def test_without_a_compiler_one_warning_and_the_reference(tmp_path):
    """A fresh cache and no usable compiler: backend() is 'reference', one clear warning,
    results are still exact, and CPU calls never import the CUDA backend."""
    script = (
        "import sys, warnings, torch, torch.nn.functional as F\n"
        "import bnas.kernels as K\n"
        "def sign(t): return torch.where(t >= 0, 1.0, -1.0)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    name = K.backend()\n"
        "    x, w = torch.randn(2, 33, 5, 5), torch.randn(7, 33, 3, 3)\n"
        "    ok = torch.equal(K.xnor_conv2d(x, w, padding=1), F.conv2d(sign(x), sign(w), None, 1, 1))\n"
        "msgs = [str(c.message) for c in caught if 'bnas.kernels' in str(c.message)]\n"
        "cuda_imported = 'bnas.kernels.cuda_backend' in sys.modules\n"
        "print(name, ok, len(msgs), cuda_imported); print(msgs[0] if msgs else '')\n"
    )
    env = dict(os.environ, BNAS_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"), PYTHONPATH=str(REPO))
    env.pop(cpu_backend.REQUIRE_ENV, None)  # the fallback is what is tested here
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first, message = result.stdout.strip().splitlines()[-2:]
    assert first == "reference True 1 False"
    assert "CPU XNOR kernels are unavailable" in message
    assert "Install a C++ compiler" in message


@pytest.fixture
def failed_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh extension state whose build fails the way a missing compiler does (the module
    state is restored afterwards)."""

    def load(**kwargs: object) -> None:
        raise RuntimeError("g++: error: no such file or directory")

    monkeypatch.setattr(cpu_backend, "_extension", None)
    monkeypatch.setattr(cpu_backend, "_build_error", None)
    monkeypatch.setattr(cpu_backend, "_supported", None)
    monkeypatch.setattr(cpu_backend, "_import_cpp_extension_load", lambda: load)
    monkeypatch.setattr(cpu_backend.platform, "machine", lambda: "x86_64")  # reach the build on any CPU


def test_failed_build_warns_and_falls_back_without_require(failed_build, monkeypatch):
    monkeypatch.delenv(cpu_backend.REQUIRE_ENV, raising=False)
    x, w = torch.randn(2, 33, 5, 5), torch.randn(7, 33, 3, 3)
    with pytest.warns(RuntimeWarning, match="CPU XNOR kernels are unavailable"):
        assert kernels.backend() == "reference"
    assert torch.equal(kernels.xnor_conv2d(x, w, padding=1), F.conv2d(sign(x), sign(w), None, 1, 1))


@pytest.mark.parametrize("value", ["1", "yes"])
def test_failed_build_raises_with_require(failed_build, monkeypatch, value):
    monkeypatch.setenv(cpu_backend.REQUIRE_ENV, value)
    x, w = torch.randn(2, 33, 5, 5), torch.randn(7, 33, 3, 3)
    with pytest.raises(cpu_backend.ExtensionUnavailableError, match="BNAS_REQUIRE_EXTENSION is set") as info:
        kernels.backend()
    assert "no such file or directory" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, bnas.errors.BnasError)
    # every later call raises too (no silent reference after the first failure)
    with pytest.raises(cpu_backend.ExtensionUnavailableError):
        kernels.xnor_conv2d(x, w, padding=1)
    with pytest.raises(cpu_backend.ExtensionUnavailableError):
        kernels.pack_signs(x)
    with pytest.raises(cpu_backend.ExtensionUnavailableError):
        with kernels.use_backend("cpu-popcnt"):
            pass
    # the reference stays available when asked for by name
    with kernels.use_backend("reference"):
        assert torch.equal(kernels.xnor_conv2d(x, w, padding=1), F.conv2d(sign(x), sign(w), None, 1, 1))


def test_require_set_to_zero_is_off(failed_build, monkeypatch):
    monkeypatch.setenv(cpu_backend.REQUIRE_ENV, "0")
    with pytest.warns(RuntimeWarning):
        assert kernels.backend() == "reference"


@pytest.mark.skipif(not cpu_backend.extension_required(), reason="BNAS_REQUIRE_EXTENSION is not set")
def test_required_extension_runs_a_cpu_kernel(cpu_backends):
    # what CI relies on: the default CPU path is a compiled kernel, not the reference
    assert cpu_backends
    assert kernels.backend() in ALL_CPU


@pytest.mark.parametrize("groups,k,stride", [(1, 40, 1), (1, 64, 2), (2, 40, 1)])
def test_fused_step_adds_the_residual_and_writes_float_and_packed(backend_name, groups, k, stride):
    """xnor_conv2d_fused = conv * scale + bias, then + residual (one rounding each, as the
    separate add rounds), its float result and its packed signs in the same pass."""
    gen = torch.Generator().manual_seed(groups * 10 + k + stride)
    x = small_ints(2, 40, 9, 7, generator=gen)
    weight = small_ints(k, 40 // groups, 3, 3, generator=gen)
    scale, bias = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
    expected = F.conv2d(sign(x), sign(weight), None, stride, 1, 1, groups)
    expected = expected * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    residual = torch.randn(expected.shape, generator=gen)
    # a residual that cancels some outputs exactly: the sign of 0 is +1 in the packed bits
    residual.view(-1)[::7] = -expected.reshape(-1)[::7]
    residual = residual.contiguous(memory_format=torch.channels_last)
    conv_only, expected = expected, expected + residual
    assert (expected == 0).any()
    xp, wp = kernels.pack_signs(x, groups), kernels.pack_weights(weight, groups)
    args = (xp, wp, 40, 3, stride, 1, 1, groups, scale, bias, residual)
    out, packed = kernels.xnor_conv2d_fused(*args, float_output=True, pack_output=True)
    assert torch.equal(out, expected)
    assert torch.equal(packed, pack_signs_reference(expected))
    only_packed = kernels.xnor_conv2d_fused(*args, float_output=False, pack_output=True)
    assert only_packed[0] is None and torch.equal(only_packed[1], packed)
    no_residual = kernels.xnor_conv2d_fused(*args[:-1], None, float_output=True, pack_output=False)
    assert no_residual[1] is None and torch.equal(no_residual[0], conv_only)


def test_fused_step_refuses_a_residual_of_another_shape_or_layout(cpu_backends):
    if not cpu_backends:
        pytest.skip("no CPU kernel extension on this machine")
    gen = torch.Generator().manual_seed(0)
    xp = kernels.pack_signs(small_ints(1, 32, 6, 6, generator=gen))
    wp = kernels.pack_weights(small_ints(16, 32, 3, 3, generator=gen))
    with kernels.use_backend(cpu_backends[0]):
        with pytest.raises(RuntimeError, match="residual must have the output's shape"):
            kernels.xnor_conv2d_fused(xp, wp, 32, 3, 1, 1, residual=torch.zeros(1, 16, 5, 5))
        with pytest.raises(RuntimeError, match="NHWC memory"):  # an NCHW-contiguous residual
            kernels.xnor_conv2d_fused(xp, wp, 32, 3, 1, 1, residual=torch.zeros(1, 16, 6, 6))
        with pytest.raises(ValueError, match="float output, the packed output or both"):
            kernels.xnor_conv2d_fused(xp, wp, 32, 3, 1, 1, float_output=False)


@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_bound_fused_conv_equals_the_function_and_follows_in_place_weight_updates(
    backend_name, groups, stride, dilation
):
    """FusedConv2d binds the weights and geometry once (a plan step's fast path): every
    output, on every code path, is the function's; an in-place change of the packed weights
    is seen on the next call (the lane layout it keeps is rebuilt)."""
    gen = torch.Generator().manual_seed(groups + stride * 3 + dilation * 7)
    x = small_ints(2, 64, 11, 9, generator=gen)
    weight = small_ints(48, 64 // groups, 3, 3, generator=gen)
    scale, bias = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    xp, wp = kernels.pack_signs(x, groups), kernels.pack_weights(weight, groups)
    fused = kernels.FusedConv2d(wp, 64, 3, stride, 1, dilation, groups, scale, bias)
    geometry = (64, 3, stride, 1, dilation, groups, scale, bias)
    expected = kernels.xnor_conv2d_fused(xp, wp, *geometry, float_output=True, pack_output=groups == 1)
    oh, ow = fused.output_size(11, 9)
    assert expected[0] is not None and tuple(expected[0].shape) == (2, 48, oh, ow)
    residual = torch.randn(2, 48, oh, ow, generator=gen).contiguous(memory_format=torch.channels_last)
    for res, float_output, pack_output in [(None, True, groups == 1), (residual, True, False), (residual, False, True)]:
        if pack_output and groups != 1:
            continue
        ours = fused(xp, res, float_output, pack_output)
        theirs = kernels.xnor_conv2d_fused(xp, wp, *geometry, res, float_output, pack_output)
        for a, b in zip(ours, theirs, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    wp.copy_(kernels.pack_weights(-weight, groups))  # every sign flipped, in place
    flipped = fused(xp)[0]
    assert torch.equal(flipped, kernels.xnor_conv2d_fused(xp, wp, *geometry)[0])
    assert not torch.equal(flipped, expected[0])
    with pytest.raises(ValueError, match="float output, the packed output or both"):
        fused(xp, None, False, False)


@pytest.mark.parametrize("features,outputs", [(784, 40), (37, 21), (64, 16)])
def test_real_input_binary_weight_linear_bit_exact(backend_name, features, outputs):
    """Integer-valued inputs make every partial sum exact, so any summation order must give
    exactly linear(x, sign(W)) * scale + bias."""
    gen = torch.Generator().manual_seed(features + outputs)
    x = torch.randint(-8, 9, (3, features), generator=gen).float()
    weight = small_ints(outputs, features, generator=gen)
    scale = torch.tensor([0.5, -1.25, 2.0, 1.0])[torch.randint(0, 4, (outputs,), generator=gen)]
    bias = torch.randint(-3, 4, (outputs,), generator=gen).float()
    expected = F.linear(x, sign(weight)) * scale + bias
    out = kernels.real_binary_linear(x, kernels.pack_weights(weight), features, scale, bias)
    assert torch.equal(out, expected)
    assert torch.equal(kernels.real_binary_linear(x, kernels.pack_weights(weight), features), F.linear(x, sign(weight)))


def test_real_input_binary_weight_linear_checks_shapes():
    wp = kernels.pack_weights(torch.randn(8, 40))
    with pytest.raises(ValueError, match=r"expects \(N, 40\) input and \(K, 2\) packed weights"):
        kernels.real_binary_linear(torch.randn(2, 41), wp, 40)


@pytest.mark.parametrize(
    "shape,kernel,stride,padding",
    [
        ((1, 64, 112, 112), 3, 2, 1),  # ResNet's stem pool
        ((2, 40, 9, 7), 3, 2, 1),  # a partial SIMD vector of channels, odd map
        ((1, 16, 8, 8), 2, 2, 0),
        ((1, 24, 10, 10), (3, 2), (1, 2), (1, 0)),
    ],
)
def test_channels_last_max_pool_equals_torch(backend_name, shape, kernel, stride, padding):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) - 2.0  # mostly negative: padding must never win
    out = kernels.max_pool2d_nhwc(x, kernel, stride, padding)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, F.max_pool2d(x, kernel, stride, padding))


@pytest.mark.parametrize(
    "shape", [(1, 64, 112, 112), (2, 40, 9, 7), (1, 16, 8, 8), (1, 32, 9, 9), (1, 48, 6, 5), (1, 33, 7, 7)]
)
def test_max_pool_and_pack_writes_the_pooled_map_and_its_packed_signs(backend_name, shape):
    """Channel counts of one 16-lane vector, a half word, whole and partial words: the words
    are pack_signs' of the pooled map, bits past the channels 0; exact zeros pack as +1."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(-3, 3, shape, generator=gen).float()
    expected = F.max_pool2d(x, 3, 2, 1)
    assert (expected == 0).any()
    out, packed = kernels.max_pool2d_and_pack(x, 3, 2, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)
    assert torch.equal(packed, pack_signs_reference(expected))


def test_fused_step_can_write_into_its_residual(backend_name):
    gen = torch.Generator().manual_seed(5)
    x = small_ints(1, 64, 6, 6, generator=gen)
    weight = small_ints(64, 64, 3, 3, generator=gen)
    scale, bias = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    residual = torch.randn(1, 64, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(sign(x), sign(weight), None, 1, 1) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    expected = expected + residual
    buffer = residual.data_ptr()
    out, packed = kernels.xnor_conv2d_fused(
        kernels.pack_signs(x),
        kernels.pack_weights(weight),
        64,
        3,
        1,
        1,
        1,
        1,
        scale,
        bias,
        residual,
        True,
        True,
        into_residual=True,
    )
    assert out.data_ptr() == buffer and torch.equal(residual, expected)
    assert torch.equal(out, expected) and torch.equal(packed, pack_signs_reference(expected))
    with pytest.raises(ValueError, match="into_residual needs a residual"):
        kernels.xnor_conv2d_fused(kernels.pack_signs(x), kernels.pack_weights(weight), 64, 3, 1, 1, into_residual=True)


def test_stray_bits_past_the_channels_are_rejected_or_ignored(backend_name):
    # padding bits must be 0; the CPU kernels (which count x XOR w) refuse packed data that
    # breaks that instead of returning a wrong sum; the reference masks them
    gen = torch.Generator().manual_seed(17)
    x, w = small_ints(2, 70, 5, 5, generator=gen), small_ints(12, 35, 3, 3, generator=gen)
    xp, wp = kernels.pack_signs(x, 2), kernels.pack_weights(w, 2)
    ref = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), None, 1, 1, 1, 2)
    assert torch.equal(kernels.xnor_conv2d_packed(xp, wp, 70, 3, 1, 1, 1, 2), ref)
    dirty_x = xp.clone()
    dirty_x[1, 2, 3, 1] |= 1 << 20  # group 0's last word holds channels 32..34: bit 20 is padding
    dirty_w = wp.clone()
    dirty_w[5, 1, 1, 1] |= 1 << 31
    for xd, wd, what in [(dirty_x, wp, "packed activations"), (xp, dirty_w, "packed weights")]:
        if backend_name == "reference":
            assert torch.equal(kernels.xnor_conv2d_packed(xd, wd, 70, 3, 1, 1, 1, 2), ref)
        else:
            with pytest.raises(RuntimeError, match=f"{what} have bits set past the 35 channels of a group"):
                kernels.xnor_conv2d_packed(xd, wd, 70, 3, 1, 1, 1, 2)
