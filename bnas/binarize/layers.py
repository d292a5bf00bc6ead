"""Binary layers: ``BinaryConv2d`` and ``BinaryLinear`` keep latent real weights and binarize
their input and weights through the quantizers a ``BinarizeConfig`` names; they answer what they
compute now (``binarizes_input``, ``binarizes_weights``, ``fully_binary``,
``has_latent_weights``) and own their latent clipping and learning-rate scale.

The whole-model helpers the trainer uses (``binary_layers``, ``clip_latent_weights``,
``set_binarization``) walk these layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .binarizers import WeightBinarizer
from .config import BinarizeConfig
from .quantizers import ActivationQuantizer

__all__ = [
    "BinaryConv2d",
    "BinaryLayer",
    "BinaryLinear",
    "binary_layers",
    "clip_latent_weights",
    "set_binarization",
]

# The layers' default config: frozen, so one instance is shared safely, as the default argument
# ``BinarizeConfig()`` was (evaluated once, when the class was defined).
_DEFAULT_CONFIG = BinarizeConfig()


# --------------------------------------------------------------------------------------
# Binary layers
# --------------------------------------------------------------------------------------
class _BinaryLayer:
    """Shared state of binary layers: quantizers, latent clipping, learning-rate scale."""

    weight: Tensor
    config: BinarizeConfig
    input_quantizer: ActivationQuantizer
    kernel_quantizer: WeightBinarizer

    def _setup_binarization(self, config: BinarizeConfig, channels: int, fan_in: int, fan_out: int) -> None:
        if not isinstance(config, BinarizeConfig):
            raise TypeError(f"config must be a BinarizeConfig, got {type(config).__name__}")
        self.config = config
        self.input_quantizer = ActivationQuantizer(config.activation, channels, config.clip, config.swish_beta)
        initial_scale = None
        if config.learned_scale:
            # XNOR-Net's alpha of the initial latent weights, so training starts where xnor does.
            w = self.weight.detach()
            initial_scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        self.kernel_quantizer = WeightBinarizer(config.weight, config.weight_clip, initial_scale)
        glorot_h = math.sqrt(1.5 / (fan_in + fan_out))
        if config.latent_clip == "glorot":
            self.latent_clip_value: float | None = glorot_h
            self.lr_scale = 1.0 / glorot_h  # BinaryNet's per-layer learning-rate scale
        else:
            self.latent_clip_value = None if config.latent_clip is None else float(config.latent_clip)
            self.lr_scale = 1.0
        if config.lr_scale == "glorot":
            self.lr_scale = 1.0 / glorot_h
        elif config.lr_scale is not None:
            self.lr_scale = float(config.lr_scale)

    # What the layer computes, asked of its quantizers' ``precision``: metrics (BOPs, 1-bit
    # parameters), export (packed or float) and the optimiser (latent weights) all ask here.
    @property
    def binarizes_input(self) -> bool:
        """The layer takes the sign of its input now (quantizer set and switched on)."""
        return self.input_quantizer.precision == 1

    @property
    def binarizes_weights(self) -> bool:
        """The layer computes with binarized weights now (binarizer set and switched on)."""
        return self.kernel_quantizer.precision == 1

    @property
    def fully_binary(self) -> bool:
        """Both operands binary: its MACs are BOPs and it packs to XNOR-popcount."""
        return self.binarizes_input and self.binarizes_weights

    @property
    def has_latent_weights(self) -> bool:
        """Its weight is a latent binary weight (no decay by default, the layer's lr_scale).

        True as soon as any binarization is on, so under the two-step schedule (binary
        activations first, weights later) the weights are latent from the start; False for the
        full-precision twin (``bnas.build(..., binarize=False)``), whose quantizers are all off.
        """
        return self.kernel_quantizer.name != "none" and (self.kernel_quantizer.enabled or self.input_quantizer.enabled)

    def binary_weight(self) -> Tensor:
        """The weight the forward pass uses (alpha * sign(W) for xnor, the learned scale for alpha
        with ``learned_scale``)."""
        return self.kernel_quantizer(self.weight)

    @torch.no_grad()
    def clip_latent(self) -> None:
        if self.latent_clip_value is not None:
            self.weight.clamp_(-self.latent_clip_value, self.latent_clip_value)


def _binarize_repr(config: BinarizeConfig) -> str:
    learned = ", learned_scale=True" if config.learned_scale else ""
    return f", activation={config.activation}, weight={config.weight}{learned}"


class BinaryConv2d(nn.Conv2d, _BinaryLayer):
    """Conv2d on binarized activations and binarized weights; latent weights stay real.

    Zero padding is applied after the activation sign, so padded taps contribute 0, exactly
    what the packed XNOR kernels compute.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        config: BinarizeConfig = _DEFAULT_CONFIG,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        kh, kw = self.kernel_size
        self._setup_binarization(config, in_channels, in_channels // groups * kh * kw, out_channels // groups * kh * kw)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        if not self.binarizes_input:
            return F.conv2d(x, self.binary_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        # +-1 inputs: convolve with the signs, then scale; the integer sums are exact (see
        # WeightBinarizer.split), so the float model agrees with the packed one at ties too.
        signs, alpha = self.kernel_quantizer.split(self.weight)
        out = F.conv2d(x, signs, None, self.stride, self.padding, self.dilation, self.groups)
        if alpha is not None:
            out = out * alpha.reshape(1, -1, 1, 1)
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + _binarize_repr(self.config)


class BinaryLinear(nn.Linear, _BinaryLayer):
    """Linear layer on binarized inputs and binarized weights."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, config: BinarizeConfig = _DEFAULT_CONFIG
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self._setup_binarization(config, in_features, in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        if not self.binarizes_input:
            return F.linear(x, self.binary_weight(), self.bias)
        signs, alpha = self.kernel_quantizer.split(self.weight)  # as BinaryConv2d: exact integer sums
        out = F.linear(x, signs)
        if alpha is not None:
            out = out * alpha.reshape(1, -1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + _binarize_repr(self.config)


# --------------------------------------------------------------------------------------
# Whole-model helpers used by the trainer
# --------------------------------------------------------------------------------------
BinaryLayer = (BinaryConv2d, BinaryLinear)


def binary_layers(model: nn.Module) -> Iterator[BinaryConv2d | BinaryLinear]:
    """Every binary conv / linear layer of ``model`` (binarizing or switched off)."""
    return (m for m in model.modules() if isinstance(m, BinaryLayer))


def clip_latent_weights(model: nn.Module) -> None:
    """Clip each layer's latent weights to its [-H, H] (call after every optimiser step)."""
    for layer in binary_layers(model):
        layer.clip_latent()


def set_binarization(model: nn.Module, activations: bool = True, weights: bool = True) -> None:
    """Switch binarization of activations and/or weights on or off model-wide.

    The two-step schedule of ReActNet trains with binary activations and real weights
    first (``activations=True, weights=False``), then both. With weights off a layer computes
    with its latent weights as they are; a learned scale is then unused.
    """
    for layer in binary_layers(model):
        layer.input_quantizer.enabled = activations
        layer.kernel_quantizer.enabled = weights
