"""The integers of one packed convolution: argument checks and output shapes shared by the
CUDA kernel (``cuda_backend``), its host emulator (``emulator``) and the dispatcher.

``plan_conv`` turns packed operands and convolution arguments into a :class:`ConvPlan` (the
integers in the order the C++ side takes them, ``CONV_DIMS``) or raises a ``ValueError`` that
says what does not match; ``run_conv`` allocates the output and hands the plan to a runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .packing import words_for

__all__ = [
    "CONV_DIMS",
    "MAX_TAPS",
    "ConvPlan",
    "ConvRunner",
    "IntPair",
    "as_nchw",
    "epilogue_vector",
    "linear_as_conv",
    "check_tap_sums",
    "conv_output_size",
    "pair",
    "plan_conv",
    "run_conv",
    "tap_sum_dims",
]

# Order of the integers handed to the C++ side (mirrors enum ConvDim in cuda/xnor_conv.cuh).
CONV_DIMS = ("N", "H", "W", "C", "groups", "K", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "out_groups")
MAX_TAPS = 64

IntPair = int | Sequence[int]


def pair(value: IntPair, what: str) -> tuple[int, int]:
    """``value`` as ``(h, w)``: an int is used for both; anything else must hold two ints."""
    if isinstance(value, int):
        return (value, value)
    t = tuple(int(v) for v in value)
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    return t[0], t[1]


@dataclass(frozen=True)
class ConvPlan:
    """The integers of one packed convolution, in CONV_DIMS order, plus output sizes."""

    dims: tuple[int, ...]
    out_h: int
    out_w: int
    out_words: int  # packed-output words per pixel

    @property
    def n(self) -> int:
        return self.dims[0]

    @property
    def k(self) -> int:
        return self.dims[5]


def conv_output_size(h: int, w: int, geometry: tuple[int, ...]) -> tuple[int, int]:
    """A convolution's output size for an ``h x w`` input, ``geometry`` = (kh, kw, sh, sw,
    ph, pw, dh, dw)."""
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def plan_conv(
    x_packed: torch.Tensor,
    w_packed: torch.Tensor,
    in_channels: int,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    out_groups: int = 1,
) -> ConvPlan:
    """Checks packed operands against the convolution parameters; raises ValueError saying
    what does not match."""
    if x_packed.dtype != torch.int32 or w_packed.dtype != torch.int32:
        raise ValueError("packed activations and weights must be int32 tensors (use pack_signs / pack_weights)")
    if x_packed.dim() != 4 or w_packed.dim() != 4:
        raise ValueError(
            f"packed conv operands must be 4-D: activations (N, H, W, G*Wg), weights (K, KH, KW, Wg); "
            f"got {tuple(x_packed.shape)} and {tuple(w_packed.shape)}"
        )
    if groups < 1 or in_channels < 1 or in_channels % groups:
        raise ValueError(f"in_channels={in_channels} must be a positive multiple of groups={groups}")
    n, h, w, gw = (int(v) for v in x_packed.shape)
    k, kh, kw, wg = (int(v) for v in w_packed.shape)
    cg_words = words_for(in_channels // groups)
    if gw != groups * cg_words:
        raise ValueError(
            f"packed activations have {gw} words per pixel; {in_channels} channels in {groups} groups "
            f"need {groups * cg_words}"
        )
    if wg != cg_words:
        raise ValueError(
            f"packed weights have {wg} words per tap; {in_channels // groups} channels per group need {cg_words}"
        )
    if pair(kernel_size, "kernel_size") != (kh, kw):
        raise ValueError(f"packed weights hold a {kh}x{kw} kernel, kernel_size says {kernel_size}")
    if k % groups:
        raise ValueError(f"{k} filters are not divisible by groups={groups}")
    if out_groups < 1 or k % out_groups:
        raise ValueError(f"{k} filters are not divisible by out_groups={out_groups}")
    if kh * kw > MAX_TAPS:
        raise ValueError(f"kernel {kh}x{kw} has more than {MAX_TAPS} taps, which the CUDA XNOR kernel does not support")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1 and padding >= 0")
    oh, ow = conv_output_size(h, w, (kh, kw, sh, sw, ph, pw, dh, dw))
    if oh < 1 or ow < 1:
        raise ValueError(
            f"the {kh}x{kw} kernel (dilation {dh}x{dw}) does not fit the {h}x{w} input with padding {ph}x{pw}"
        )
    dims = (n, h, w, in_channels, groups, k, kh, kw, sh, sw, ph, pw, dh, dw, out_groups)
    return ConvPlan(dims, oh, ow, out_groups * words_for(k // out_groups))


def tap_sum_dims(w_packed: torch.Tensor, in_channels: int, kernel_size: IntPair, groups: int = 1) -> tuple[int, ...]:
    """CONV_DIMS for the tap sums of packed weights alone (a conv of one KHxKW input, which
    fixes K, the taps and the words per group; the sums depend on nothing else)."""
    kh, kw = pair(kernel_size, "kernel_size")
    probe = torch.empty((1, kh, kw, groups * words_for(max(in_channels, 1) // max(groups, 1))), dtype=torch.int32)
    return plan_conv(probe, w_packed, in_channels, (kh, kw), groups=groups).dims


def check_tap_sums(tap_sums: torch.Tensor, plan: ConvPlan) -> None:
    """Raises ValueError unless ``tap_sums`` fits the plan: int32 with K*KH*KW entries."""
    k, taps = plan.dims[5], plan.dims[6] * plan.dims[7]
    if tap_sums.dtype != torch.int32 or tap_sums.numel() != k * taps:
        raise ValueError(
            f"tap_sums must be int32 (K, KH*KW) = ({k}, {taps}) from tap_sums(w_packed, ...), "
            f"got {tap_sums.dtype} {tuple(tap_sums.shape)}"
        )


def epilogue_vector(v: torch.Tensor | None, k: int, name: str, device: torch.device) -> torch.Tensor | None:
    if v is None:
        return None
    if v.numel() != k:
        raise ValueError(f"{name} must have one value per output channel ({k}), got {v.numel()}")
    return v.detach().reshape(k).to(device=device, dtype=torch.float32).contiguous()


def linear_as_conv(
    x_packed: torch.Tensor, w_packed: torch.Tensor, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if x_packed.dim() != 2 or w_packed.dim() != 2:
        raise ValueError(
            f"packed linear operands must be 2-D: activations (N, ceil(F/32)), weights (K, ceil(F/32)); "
            f"got {tuple(x_packed.shape)} and {tuple(w_packed.shape)}"
        )
    return x_packed.reshape(x_packed.shape[0], 1, 1, x_packed.shape[1]), w_packed.reshape(
        w_packed.shape[0], 1, 1, w_packed.shape[1]
    )


def as_nchw(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 4:
        return x
    raise ValueError(f"{what} must be 2-D (N, F) or 4-D (N, C, H, W), got shape {tuple(x.shape)}")


# (x, w, scale, bias, out, out_packed, plan): runs one planned convolution into out or out_packed
ConvRunner = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        ConvPlan,
    ],
    None,
]


def run_conv(
    run: ConvRunner,
    x_packed: torch.Tensor,
    w_packed: torch.Tensor,
    plan: ConvPlan,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_output: bool,
) -> torch.Tensor:
    """Allocates the float (N, K, OH, OW) or packed (N, OH, OW, words) output and runs ``plan``."""
    dev = x_packed.device
    scale_t = epilogue_vector(scale, plan.k, "scale", dev)
    bias_t = epilogue_vector(bias, plan.k, "bias", dev)
    if pack_output:
        out = torch.empty((plan.n, plan.out_h, plan.out_w, plan.out_words), dtype=torch.int32, device=dev)
        run(x_packed.contiguous(), w_packed.contiguous(), scale_t, bias_t, None, out, plan)
    else:
        out = torch.empty((plan.n, plan.k, plan.out_h, plan.out_w), dtype=torch.float32, device=dev)
        run(x_packed.contiguous(), w_packed.contiguous(), scale_t, bias_t, out, None, plan)
    return out
