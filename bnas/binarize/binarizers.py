"""Weight binarizers: the ``WeightBinarizer`` module that binarizes a layer's latent real weights
by name (``sign``, ``xnor``, ``xnor_tensor``, ``bireal``, ``stochastic``, ``none``) and gives the
scale alpha its forward multiplies by: computed from the weights, or a learnable per-output-channel
parameter (``BinarizeConfig.learned_scale``).

It binarizes through the sign and straight-through functions of ``bnas.binarize.quantizers``,
like larq's ``kernel_quantizer`` beside its ``input_quantizer``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import LEARNED_SCALE_BINARIZERS, WEIGHT_BINARIZERS, learned_scale_error
from .quantizers import ste_sign, stochastic_sign

__all__ = ["WEIGHT_BINARIZERS", "WeightBinarizer"]


class WeightBinarizer(nn.Module):
    """Binarizes latent weights by name; ``scale(w)`` is the alpha the forward multiplies by.

    ``initial_scale`` (a tensor broadcastable to the weight, e.g. ``(C_out, 1, 1, 1)``) makes
    alpha a learnable parameter, ``learned_scale``, that starts there: the forward is then
    ``learned_scale * sign(W)`` with the clipped STE, for every binarizer with a sign forward.
    """

    learned_scale: nn.Parameter | None

    def __init__(self, name: str = "xnor", clip: float = 1.0, initial_scale: Tensor | None = None) -> None:
        super().__init__()
        if name not in WEIGHT_BINARIZERS:
            raise ValueError(f"unknown weight binarizer {name!r}; expected one of {', '.join(WEIGHT_BINARIZERS)}")
        self.name = name
        self.clip = float(clip)
        self.enabled = True
        if initial_scale is None:
            self.register_parameter("learned_scale", None)
        else:
            if name not in LEARNED_SCALE_BINARIZERS:
                raise ValueError(learned_scale_error(name))
            self.learned_scale = nn.Parameter(initial_scale.detach().clone())

    def scale(self, w: Tensor) -> Tensor | None:
        """Alpha, broadcastable to ``w`` (None for binarizers without a scale); the learned
        scale when there is one, so export folds what the forward multiplies by."""
        if self.learned_scale is not None:
            return self.learned_scale
        if self.name in ("xnor", "bireal"):
            return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        if self.name == "xnor_tensor":
            return w.abs().mean()
        return None

    def split(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(signs, alpha)`` with ``forward(w) == alpha * signs`` (alpha None: no scale), each
        carrying its gradient. A layer on binary inputs convolves with the signs and scales the
        result: the integer dot products are then exact in float, as in the packed kernels, so
        a dot product of exactly 0 is 0 in both (the next sign reads it as +1 in both)."""
        if not self.enabled or self.name == "none":
            return w, None
        if self.name == "stochastic":
            return stochastic_sign(w, self.clip, self.training), None
        binary = ste_sign(w, self.clip)
        if self.learned_scale is not None:
            # dL/dscale = sum of dL/dWb * sign(W) over the channel; dL/dW = dL/dWb * scale * 1{|W| <= clip}.
            return binary, self.learned_scale
        alpha = self.scale(w)
        if alpha is not None and self.name == "bireal":
            # Bi-Real's magnitude-aware gradient: alpha is a constant in backward, so
            # dL/dW = dL/dWb * alpha * 1{|W| <= clip}.
            alpha = alpha.detach()
        # xnor / xnor_tensor: autograd also carries the gradient through alpha (XNOR-Net).
        return binary, alpha

    def forward(self, w: Tensor) -> Tensor:
        signs, alpha = self.split(w)
        return signs if alpha is None else alpha * signs

    @property
    def precision(self) -> int:
        """Bits of the weights the layer computes with: 1 while it binarizes, else 32."""
        return 1 if self.enabled and self.name != "none" else 32

    def extra_repr(self) -> str:
        return self.name if self.learned_scale is None else f"{self.name}, learned_scale"
