"""Activation quantizers: the one ``sign`` of bnas, its straight-through estimators, and the
``ActivationQuantizer`` module that picks one by name.

Every forward here is ``sign`` with ``sign(0) = +1``; the quantizers differ only in the gradient
they pass back: ``ste`` (BinaryNet's clipped identity), ``approx_sign`` (Bi-Real Net),
``swish_sign`` (BNN+), ``identity_ste``, ``stochastic`` (BinaryNet's stochastic sign), ``rsign``
(ReActNet's learnable threshold) and ``none``. The weight binarizers
(``bnas.binarize.binarizers``) binarize through the same functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import ACTIVATION_QUANTIZERS

__all__ = [
    "ACTIVATION_QUANTIZERS",
    "ActivationQuantizer",
    "approx_sign",
    "hard_sigmoid",
    "identity_sign",
    "sign",
    "ste_sign",
    "stochastic_sign",
    "swish_sign",
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
# Quantizer modules (small, named, composable)
# --------------------------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """Binarizes activations by name. ``rsign`` owns a learnable per-channel threshold."""

    def __init__(
        self, name: str = "ste", channels: int | None = None, clip: float = 1.0, swish_beta: float = 5.0
    ) -> None:
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
