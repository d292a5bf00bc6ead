"""XNOR-popcount kernels for binary convolutions and linear layers.

Signs are packed 32 per int32 word along channels (NHWC, bit 1 = +1; see
:mod:`bnas.kernels.packing`), and the kernels return exactly what the float reference
``conv2d(sign(x), sign(w))`` returns, zero padding included. ``backend()`` names the
implementation in use; ``use_backend(name)`` forces one.
"""

from .dispatch import (
    BACKENDS,
    FusedConv2d,
    backend,
    conv2d_max_pool,
    global_avg_pool2d,
    image_conv2d,
    int8_conv2d,
    linear,
    max_pool2d_and_pack,
    max_pool2d_nhwc,
    pack_signs,
    pack_weights,
    pointwise_conv2d,
    real_binary_linear,
    use_backend,
    xnor_conv2d,
    xnor_conv2d_fused,
    xnor_conv2d_packed,
    xnor_linear,
    xnor_linear_packed,
)
from .packing import unpack_signs, unpack_weights, words_for

__all__ = [
    "BACKENDS",
    "FusedConv2d",
    "backend",
    "conv2d_max_pool",
    "global_avg_pool2d",
    "image_conv2d",
    "int8_conv2d",
    "linear",
    "max_pool2d_and_pack",
    "max_pool2d_nhwc",
    "pack_signs",
    "pack_weights",
    "pointwise_conv2d",
    "real_binary_linear",
    "unpack_signs",
    "unpack_weights",
    "use_backend",
    "words_for",
    "xnor_conv2d",
    "xnor_conv2d_fused",
    "xnor_conv2d_packed",
    "xnor_linear",
    "xnor_linear_packed",
]
