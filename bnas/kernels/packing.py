"""The packed sign format shared by every backend and the export file, in plain torch.

Words are int32 along the channel axis: bit j (LSB = 0) of word i holds channel 32*i + j,
bit 1 means +1 (value >= 0, so sign(0) = +1), bit 0 means -1, and bits past the channel
count are 0. Activations are NHWC ``(N, H, W, G * Wg)`` with ``Wg = ceil(C / G / 32)`` and
group g in words ``[g*Wg, (g+1)*Wg)``; conv weights ``(K, kh, kw, Wg)``; linear
activations ``(N, ceil(F/32))`` and weights ``(K, ceil(F/32))``.

These functions run on any device and define the format; the CPU and CUDA backends have
faster packers that must agree with them bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

WORD_BITS = 32


def words_for(channels: int) -> int:
    """Number of int32 words holding ``channels`` sign bits."""
    return (channels + WORD_BITS - 1) // WORD_BITS


def _bit_weights(device: torch.device) -> Tensor:
    return torch.bitwise_left_shift(
        torch.ones(WORD_BITS, dtype=torch.int64, device=device), torch.arange(WORD_BITS, device=device)
    )


def pack_bits_last(bits: Tensor) -> Tensor:
    """Pack a boolean tensor along its last axis into int32 words (zero padding bits)."""
    channels = bits.shape[-1]
    nwords = words_for(channels)
    pad = nwords * WORD_BITS - channels
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    grouped = bits.reshape(*bits.shape[:-1], nwords, WORD_BITS).to(torch.int64)
    words = (grouped * _bit_weights(bits.device)).sum(dim=-1)
    # Words are unsigned 32-bit values; int32 storage wraps the top bit around.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits_last(words: Tensor, channels: int) -> Tensor:
    """Inverse of :func:`pack_bits_last`: int32 words -> boolean tensor of ``channels``."""
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = torch.bitwise_and(torch.bitwise_right_shift(words.unsqueeze(-1), shifts), 1)
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)
    return bits[..., :channels].bool()


def _check_groups(channels: int, groups: int, what: str) -> None:
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"{what}: {channels} channels do not split into {groups} groups; "
            "use a group count that divides the channel count"
        )


def pack_signs_reference(x: Tensor, groups: int = 1) -> Tensor:
    """Float NCHW (or (N, F)) -> packed NHWC (or (N, words)) sign bits."""
    if x.dim() == 2:
        return pack_bits_last(x >= 0)
    if x.dim() != 4:
        raise ValueError(f"pack_signs expects NCHW or (N, F) input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    _check_groups(c, groups, "pack_signs")
    bits = (x >= 0).permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups)
    return pack_bits_last(bits).reshape(n, h, w, -1).contiguous()


def pack_weights_reference(w: Tensor, groups: int = 1) -> Tensor:
    """Float weights (K, Cg, kh, kw) -> (K, kh, kw, Wg); (K, F) -> (K, words)."""
    if w.dim() == 2:
        return pack_bits_last(w >= 0)
    if w.dim() != 4:
        raise ValueError(f"pack_weights expects (K, C/groups, kh, kw) or (K, F) weights, got shape {tuple(w.shape)}")
    if groups < 1 or w.shape[0] % groups != 0:
        raise ValueError(f"pack_weights: {w.shape[0]} output channels do not split into {groups} groups")
    return pack_bits_last((w >= 0).permute(0, 2, 3, 1)).contiguous()


def unpack_signs(packed: Tensor, channels: int, groups: int = 1) -> Tensor:
    """Packed NHWC activations -> float NCHW of +-1 (or (N, words) -> (N, F))."""
    if packed.dim() == 2:
        return unpack_bits_last(packed, channels).float() * 2 - 1
    n, h, w, total = packed.shape
    _check_groups(channels, groups, "unpack_signs")
    cg = channels // groups
    wg = words_for(cg)
    if total != groups * wg:
        raise ValueError(
            f"packed input has {total} words per pixel; {channels} channels in {groups} groups need {groups * wg}"
        )
    bits = unpack_bits_last(packed.reshape(n, h, w, groups, wg), cg).reshape(n, h, w, channels)
    return (bits.float() * 2 - 1).permute(0, 3, 1, 2).contiguous()


def unpack_weights(packed: Tensor, channels_per_group: int) -> Tensor:
    """Packed (K, kh, kw, Wg) -> float (K, Cg, kh, kw) of +-1 ((K, words) -> (K, F))."""
    bits = unpack_bits_last(packed, channels_per_group).float() * 2 - 1
    if packed.dim() == 2:
        return bits
    return bits.permute(0, 3, 1, 2).contiguous()
