"""Parameter-free cell edges: skip, zero, and the 3x3 pools of DARTS-style cells."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register_family
from .common import check_channels, check_same_channels, check_stride
from .downsample import factorized_reduce


class Zero(nn.Module):
    """Zeros of the output shape: the "no edge" op of DARTS-style cells.

    At stride 2 the map is ceil(H / 2) x ceil(W / 2), like every other stride-2 op, and it
    has ``C_out`` channels, so it can stand on any edge.
    """

    def __init__(self, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.c_out, -(-h // s), -(-w // s))

    def extra_repr(self) -> str:
        return f"c_out={self.c_out}, stride={self.stride}"


@register_family("skip_connect", binarize="real", description="identity; a factorized reduce at stride 2 (as DARTS)")
def skip_connect(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    """Identity at stride 1; at stride 2 DARTS's factorized reduce (which may change the width).

    The stride-2 form is what DARTS's ``skip_connect`` is in a reduction cell: an identity
    cannot halve the map, and the factorized reduce keeps the information of every pixel.
    """
    check_channels("skip_connect", C_in, C_out)
    if check_stride(stride) == 1:
        if C_in != C_out:
            raise ValueError(
                f"skip_connect needs C_out == C_in at stride 1 (got {C_in} -> {C_out}); "
                "use a conv unit or a downsample op (conv_downsample, factorized_reduce)"
            )
        return nn.Identity()
    return factorized_reduce(C_in, C_out, 2)


@register_family("zero", binarize="real", description="no connection: zeros of the output shape")
def zero(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    check_channels("zero", C_in, C_out)
    return Zero(C_out, check_stride(stride))


POOL_MODES = ("max", "avg")


@register_family("pool", binarize="real", description="k x k max or average pooling, 'same' padding (keeps channels)")
def pool(C_in: int, C_out: int, stride: int = 1, *, mode: str = "max", kernel: int = 3) -> nn.Module:
    """Pooling keeps the channel count: a pool that changed it would need a conv, which is
    a different op. The average ignores padded pixels (``count_include_pad=False``, DARTS)."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode must be one of {', '.join(POOL_MODES)}, got {mode!r}")
    name = f"{mode}_pool"
    check_channels(name, C_in, C_out)
    check_same_channels(name, C_in, C_out, "put a conv_downsample or a conv unit before or after it")
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{name}: kernel must be an odd positive integer, got {kernel!r}")
    if mode == "max":
        return nn.MaxPool2d(kernel, check_stride(stride), kernel // 2)
    return nn.AvgPool2d(kernel, check_stride(stride), kernel // 2, count_include_pad=False)
