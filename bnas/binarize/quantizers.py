"""The shared binarization core: every binary op in bnas binarizes through this module.

Two kinds of quantizer, composed into layers the way larq composes ``input_quantizer`` and
``kernel_quantizer``:

* activation quantizers (forward is always ``sign`` with ``sign(0) = +1``; they differ only in
  the gradient they pass back): ``ste``, ``approx_sign``, ``swish_sign``, ``identity_ste``,
  ``stochastic``, ``rsign``, ``none``;
* weight binarizers: ``sign``, ``xnor``, ``xnor_tensor``, ``bireal``, ``stochastic``, ``none``.

``BinaryConv2d`` and ``BinaryLinear`` keep latent real weights and take both by name through a
frozen ``BinarizeConfig``, so binarization is orthogonal to topology and no two layers can
share mutable state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATION_QUANTIZERS",
    "BINARIZE_PRESETS",
    "WEIGHT_BINARIZERS",
    "BinarizeConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "ActivationQuantizer",
    "WeightBinarizer",
    "sign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "identity_sign",
    "stochastic_sign",
    "hard_sigmoid",
    "binary_layers",
    "clip_latent_weights",
    "named_binarization",
    "set_binarization",
]


# --------------------------------------------------------------------------------------
# Forward: one sign for the whole project.
# --------------------------------------------------------------------------------------
def sign(x: Tensor) -> Tensor:
    """Sign with ``sign(0) = +1`` (``torch.sign(0) == 0`` would silently drop inputs).

    Written as sign(sign(x) + 0.5) rather than ``where(x >= 0, 1, -1)``: three float passes
    are about ten times faster on CPU than materialising a boolean mask and selecting.
    """
    return torch.sign(x).add_(0.5).sign_()


def hard_sigmoid(x: Tensor) -> Tensor:
    """``clip((x + 1) / 2, 0, 1)``: BinaryNet's probability of drawing +1."""
    return ((x + 1.0) * 0.5).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------
# Straight-through estimators as autograd Functions (forward = sign; backward differs).
# --------------------------------------------------------------------------------------
def _clipped(grad: Tensor, x: Tensor, clip: float) -> Tensor:
    """``grad * 1{|x| <= clip}``; the 0/1 mask is built with float ops (see ``sign``)."""
    inside = sign(clip - x.abs()).add_(1.0).mul_(0.5)  # 1 where |x| <= clip, else 0
    return grad * inside


class _SteSign(torch.autograd.Function):
    """BinaryNet's STE: gradient x 1{|x| <= clip}."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, clip: float) -> Tensor:
        # Latent weights are usually clipped inside [-clip, clip]; then the mask is all ones
        # and backward can skip it. One min/max pass here saves three passes there.
        lo, hi = torch.aminmax(x)
        ctx.all_inside = bool(lo >= -clip) and bool(hi <= clip)
        ctx.save_for_backward(None if ctx.all_inside else x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.all_inside:
            return grad, None
        (x,) = ctx.saved_tensors
        return _clipped(grad, x, ctx.clip), None


class _ApproxSign(torch.autograd.Function):
    """Bi-Real Net's piecewise-quadratic approximation: gradient x max(0, 2 - 2|x|)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_(min=0.0)


class _SwishSign(torch.autograd.Function):
    """BNN+'s SignSwish gradient: beta * (2 - beta*x*tanh(beta*x/2)) / (1 + cosh(beta*x))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, beta: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.beta = beta
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        bx = ctx.beta * x
        # cosh overflows for |beta*x| > ~88 in float32; the gradient there is 0 anyway.
        bx = bx.clamp(-60.0, 60.0)
        slope = ctx.beta * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))
        return grad * slope, None


class _IdentitySign(torch.autograd.Function):
    """Plain straight-through: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _StochasticSign(torch.autograd.Function):
    """+1 with probability hard_sigmoid(x); the clipped STE in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, clip: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        draw = torch.rand_like(x) < hard_sigmoid(x)
        return torch.where(draw, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return _clipped(grad, x, ctx.clip), None


def ste_sign(x: Tensor, clip: float = 1.0) -> Tensor:
    """sign(x); gradient x 1{|x| <= clip} (BinaryNet)."""
    return _SteSign.apply(x, clip)


def approx_sign(x: Tensor) -> Tensor:
    """sign(x); gradient x max(0, 2 - 2|x|) (Bi-Real Net)."""
    return _ApproxSign.apply(x)


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    """sign(x); gradient of SignSwish with slope ``beta`` (BNN+)."""
    return _SwishSign.apply(x, beta)


def identity_sign(x: Tensor) -> Tensor:
    """sign(x); gradient passed through unchanged."""
    return _IdentitySign.apply(x)


def stochastic_sign(x: Tensor, clip: float = 1.0, training: bool = True) -> Tensor:
    """+1 with probability hard_sigmoid(x) while training; deterministic sign in eval."""
    if not training:
        return ste_sign(x, clip)
    return _StochasticSign.apply(x, clip)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
ACTIVATION_QUANTIZERS = ("ste", "approx_sign", "swish_sign", "identity_ste", "stochastic", "rsign", "none")
WEIGHT_BINARIZERS = ("sign", "xnor", "xnor_tensor", "bireal", "stochastic", "none")


@dataclass(frozen=True)
class BinarizeConfig:
    """How a layer binarizes: by name, like larq's ``input_quantizer`` / ``kernel_quantizer``.

    Frozen, so a config can be shared by many layers without one layer changing another.

    activation:  activation quantizer name (see ``ACTIVATION_QUANTIZERS``).
    weight:      weight binarizer name (see ``WEIGHT_BINARIZERS``).
    clip:        STE clip for activations: gradient passes where |x| <= clip.
    weight_clip: STE clip for weights: gradient passes where |W| <= weight_clip.
    latent_clip: clip latent weights to [-H, H] after each optimiser step; a number,
                 ``"glorot"`` (BinaryNet's H = sqrt(1.5 / (fan_in + fan_out)), which also gives
                 the layer a learning-rate scale 1/H), or None for no clipping.
    swish_beta:  the slope of ``swish_sign``.
    lr_scale:    a per-layer learning-rate multiplier for the latent weights: a number, or
                 ``"glorot"`` (1 / sqrt(1.5 / (fan_in + fan_out)): BinaryNet's MNIST recipe,
                 which keeps H = 1 but scales the learning rate). Default: 1, or 1/H when
                 ``latent_clip`` is ``"glorot"``.
    """

    activation: str = "ste"
    weight: str = "xnor"
    clip: float = 1.0
    weight_clip: float = 1.0
    latent_clip: float | str | None = None
    swish_beta: float = 5.0
    lr_scale: float | str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATION_QUANTIZERS:
            raise ValueError(
                f"unknown activation quantizer {self.activation!r}; expected one of {', '.join(ACTIVATION_QUANTIZERS)}"
            )
        if self.weight not in WEIGHT_BINARIZERS:
            raise ValueError(
                f"unknown weight binarizer {self.weight!r}; expected one of {', '.join(WEIGHT_BINARIZERS)}"
            )
        if not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"clip must be a positive number, got {self.clip!r}")
        if not (isinstance(self.weight_clip, (int, float)) and self.weight_clip > 0):
            raise ValueError(f"weight_clip must be a positive number, got {self.weight_clip!r}")
        lc = self.latent_clip
        if not (lc is None or lc == "glorot" or (isinstance(lc, (int, float)) and not isinstance(lc, bool) and lc > 0)):
            raise ValueError(f"latent_clip must be a positive number, 'glorot' or null, got {lc!r}")
        ls = self.lr_scale
        if not (ls is None or ls == "glorot" or (isinstance(ls, (int, float)) and not isinstance(ls, bool) and ls > 0)):
            raise ValueError(f"lr_scale must be a positive number, 'glorot' or null, got {ls!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BinarizeConfig:
        """Build from a YAML mapping; unknown keys are an error that names the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown binarize option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> BinarizeConfig:
        return replace(self, **changes)

    @property
    def is_binary(self) -> bool:
        """The config asks for some binarization. What a layer computes at the moment (its
        quantizers may be switched off) is the layer's ``binarizes_input`` / ``binarizes_weights``."""
        return self.activation != "none" or self.weight != "none"


FULL_PRECISION = BinarizeConfig(activation="none", weight="none")

# Named binarizations (``xnor``, ``bireal``, ...): the ``binarize:`` sections of the catalog
# files fill this (``bnas.registry.load_catalog``), and ops accept the names too. It lives
# here, below the registry and the ops, so both can read it without importing each other.
BINARIZE_PRESETS: dict[str, BinarizeConfig] = {}


def named_binarization(name: str) -> BinarizeConfig:
    """The binarization the loaded catalog names ``name`` (a ValueError listing the names)."""
    config = BINARIZE_PRESETS.get(name)
    if config is None:
        raise ValueError(f"unknown binarization {name!r}; the catalog defines {', '.join(sorted(BINARIZE_PRESETS))}")
    return config


# --------------------------------------------------------------------------------------
# Quantizer modules (small, named, composable)
# --------------------------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """Binarizes activations by name. ``rsign`` owns a learnable per-channel threshold."""

    def __init__(self, name: str = "ste", channels: int | None = None, clip: float = 1.0, swish_beta: float = 5.0):
        super().__init__()
        if name not in ACTIVATION_QUANTIZERS:
            raise ValueError(
                f"unknown activation quantizer {name!r}; expected one of {', '.join(ACTIVATION_QUANTIZERS)}"
            )
        self.name = name
        self.clip = float(clip)
        self.swish_beta = float(swish_beta)
        self.enabled = True  # the two-step schedule switches activations on later
        if name == "rsign":
            if channels is None:
                raise ValueError("rsign needs the channel count for its per-channel threshold")
            self.threshold = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.name == "none":
            return x
        if self.name == "ste":
            return ste_sign(x, self.clip)
        if self.name == "approx_sign":
            return approx_sign(x)
        if self.name == "swish_sign":
            return swish_sign(x, self.swish_beta)
        if self.name == "identity_ste":
            return identity_sign(x)
        if self.name == "stochastic":
            return stochastic_sign(x, self.clip, self.training)
        # rsign (ReActNet): a learnable shift before the sign, the Bi-Real gradient through it.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return approx_sign(x - self.threshold.view(shape))

    @property
    def precision(self) -> int:
        """Bits of what the quantizer passes on: 1 while it binarizes, else 32 (larq's ``precision``)."""
        return 1 if self.enabled and self.name != "none" else 32

    def extra_repr(self) -> str:
        return self.name


class WeightBinarizer(nn.Module):
    """Binarizes latent weights by name; ``scale(w)`` is the alpha the forward multiplies by."""

    def __init__(self, name: str = "xnor", clip: float = 1.0):
        super().__init__()
        if name not in WEIGHT_BINARIZERS:
            raise ValueError(f"unknown weight binarizer {name!r}; expected one of {', '.join(WEIGHT_BINARIZERS)}")
        self.name = name
        self.clip = float(clip)
        self.enabled = True

    def scale(self, w: Tensor) -> Tensor | None:
        """Alpha, broadcastable to ``w`` (None for binarizers without a scale)."""
        if self.name in ("xnor", "bireal"):
            return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        if self.name == "xnor_tensor":
            return w.abs().mean()
        return None

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled or self.name == "none":
            return w
        if self.name == "stochastic":
            return stochastic_sign(w, self.clip, self.training)
        binary = ste_sign(w, self.clip)
        alpha = self.scale(w)
        if alpha is None:  # sign: no scale
            return binary
        if self.name == "bireal":
            # Bi-Real's magnitude-aware gradient: alpha is a constant in backward, so
            # dL/dW = dL/dWb * alpha * 1{|W| <= clip}.
            alpha = alpha.detach()
        # xnor / xnor_tensor: autograd also carries the gradient through alpha (XNOR-Net).
        return alpha * binary

    @property
    def precision(self) -> int:
        """Bits of the weights the layer computes with: 1 while it binarizes, else 32."""
        return 1 if self.enabled and self.name != "none" else 32

    def extra_repr(self) -> str:
        return self.name


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
        self.kernel_quantizer = WeightBinarizer(config.weight, config.weight_clip)
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
        """The weight the forward pass uses (alpha * sign(W) for xnor)."""
        return self.kernel_quantizer(self.weight)

    @torch.no_grad()
    def clip_latent(self) -> None:
        if self.latent_clip_value is not None:
            self.weight.clamp_(-self.latent_clip_value, self.latent_clip_value)


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
        config: BinarizeConfig = BinarizeConfig(),
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        kh, kw = self.kernel_size
        self._setup_binarization(config, in_channels, in_channels // groups * kh * kw, out_channels // groups * kh * kw)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            self.input_quantizer(x),
            self.binary_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.config.activation}, weight={self.config.weight}"


class BinaryLinear(nn.Linear, _BinaryLayer):
    """Linear layer on binarized inputs and binarized weights."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, config: BinarizeConfig = BinarizeConfig()
    ):
        super().__init__(in_features, out_features, bias)
        self._setup_binarization(config, in_features, in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.config.activation}, weight={self.config.weight}"


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
    first (``activations=True, weights=False``), then both.
    """
    for layer in binary_layers(model):
        layer.input_quantizer.enabled = activations
        layer.kernel_quantizer.enabled = weights
