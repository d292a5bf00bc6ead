"""Light cell edges: skip, zero, the 3x3 pools of DARTS-style cells (optionally followed by
BN, as SNAS), EBNAS's average-pool shortcut, and the single-layer BN, ReLU and PReLU ops."""

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


@register_family(
    "pool", binarize="real", description="k x k max or average pooling, 'same' padding (keeps channels), optional BN"
)
def pool(
    C_in: int,
    C_out: int,
    stride: int = 1,
    *,
    mode: str = "max",
    kernel: int = 3,
    bn: bool = False,
    bn_affine: bool = False,
) -> nn.Module:
    """Pooling keeps the channel count: a pool that changed it would need a conv, which is
    a different op. The average ignores padded pixels (``count_include_pad=False``, DARTS).

    ``bn: true`` follows the pool with BN, as SNAS does to put the parameter-free edges on the
    scale of the conv edges; SNAS's BN has no affine parameters (``bn_affine: false``).
    """
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode must be one of {', '.join(POOL_MODES)}, got {mode!r}")
    name = f"{mode}_pool"
    check_channels(name, C_in, C_out)
    check_same_channels(name, C_in, C_out, "put a conv_downsample or a conv unit before or after it")
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{name}: kernel must be an odd positive integer, got {kernel!r}")
    layer: nn.Module
    if mode == "max":
        layer = nn.MaxPool2d(kernel, check_stride(stride), kernel // 2)
    else:
        layer = nn.AvgPool2d(kernel, check_stride(stride), kernel // 2, count_include_pad=False)
    return nn.Sequential(layer, nn.BatchNorm2d(C_out, affine=bn_affine)) if bn else layer


@register_family(
    "avgpool_shortcut", binarize="real", description="identity; a parameter-free 2x2 average pool at stride 2 (EBNAS)"
)
def avgpool_shortcut(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    """EBNAS's shortcut: no weights at all, so the widths must match (unlike ``skip_connect``,
    whose stride-2 form is a factorized reduce with 1x1 convs)."""
    check_channels("avgpool_shortcut", C_in, C_out)
    check_same_channels(
        "avgpool_shortcut", C_in, C_out, "use skip_connect (factorized reduce) or avgpool_downsample to change it"
    )
    if check_stride(stride) == 1:
        return nn.Identity()
    # ceil_mode with count_include_pad=False: odd maps give ceil(H / 2), the edge window
    # averaging only its real pixels, like every other stride-2 op here.
    return nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)


def _check_no_downsampling(op: str, stride: int) -> None:
    # A pointwise op has nothing to halve the map with; picking a pixel of two would be a
    # different op (a strided identity), which nothing published uses.
    if check_stride(stride) != 1:
        raise ValueError(f"{op} cannot downsample (stride 2); use it in a normal cell, or a pool or conv on reductions")


@register_family("bn", binarize="real", description="BatchNorm only (keeps channels; stride 1)")
def bn(C_in: int, C_out: int, stride: int = 1, *, affine: bool = True) -> nn.Module:
    check_channels("bn", C_in, C_out)
    check_same_channels("bn", C_in, C_out, "use a conv unit or conv_downsample to change it")
    _check_no_downsampling("bn", stride)
    return nn.BatchNorm2d(C_out, affine=affine)


@register_family("relu", binarize="real", description="ReLU only (keeps channels; stride 1)")
def relu(C_in: int, C_out: int, stride: int = 1) -> nn.Module:
    check_channels("relu", C_in, C_out)
    check_same_channels("relu", C_in, C_out, "use a conv unit or conv_downsample to change it")
    _check_no_downsampling("relu", stride)
    return nn.ReLU()


@register_family(
    "prelu", binarize="real", description="PReLU with one learnable slope per channel (keeps channels; stride 1)"
)
def prelu(C_in: int, C_out: int, stride: int = 1, *, init: float = 0.25) -> nn.Module:
    check_channels("prelu", C_in, C_out)
    check_same_channels("prelu", C_in, C_out, "use a conv unit or conv_downsample to change it")
    _check_no_downsampling("prelu", stride)
    return nn.PReLU(C_out, init=init)
