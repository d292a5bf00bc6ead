"""Weight binarizers: the ``WeightBinarizer`` module that binarizes a layer's latent real weights
by name (``sign``, ``xnor``, ``xnor_tensor``, ``bireal``, ``stochastic``, ``none``) and gives the
scale alpha its forward multiplies by.

It binarizes through the sign and straight-through functions of ``bnas.binarize.quantizers``,
like larq's ``kernel_quantizer`` beside its ``input_quantizer``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import WEIGHT_BINARIZERS
from .quantizers import ste_sign, stochastic_sign

__all__ = ["WEIGHT_BINARIZERS", "WeightBinarizer"]


class WeightBinarizer(nn.Module):
    """Binarizes latent weights by name; ``scale(w)`` is the alpha the forward multiplies by."""

    def __init__(self, name: str = "xnor", clip: float = 1.0) -> None:
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
