"""The shared binarization core: every binary op in bnas binarizes through this package.

Two kinds of quantizer, composed into layers the way larq composes ``input_quantizer`` and
``kernel_quantizer``:

* activation quantizers (forward is always ``sign`` with ``sign(0) = +1``; they differ only in
  the gradient they pass back): ``ste``, ``approx_sign``, ``swish_sign``, ``identity_ste``,
  ``stochastic``, ``rsign``, ``none``;
* weight binarizers: ``sign``, ``xnor``, ``xnor_tensor``, ``bireal``, ``stochastic``, ``none``;
  the sign-based ones can hold a learnable per-output-channel scale instead of their computed
  alpha (``BinarizeConfig.learned_scale``).

``BinaryConv2d`` and ``BinaryLinear`` keep latent real weights and take both by name through a
frozen ``BinarizeConfig``, so binarization is orthogonal to topology and no two layers can
share mutable state.

One job per module, after larq:

* ``quantizers``: ``sign``, the straight-through estimators, ``ActivationQuantizer``;
* ``binarizers``: ``WeightBinarizer``;
* ``config``: the quantizer names, ``BinarizeConfig``, the named binarizations
  (``BINARIZE_PRESETS``, ``named_binarization``); no torch, so the registry may import it;
* ``layers``: ``BinaryConv2d``, ``BinaryLinear`` and the whole-model helpers.

Everything is re-exported here, so ``from bnas.binarize import ...`` reads as before. The
named-binarization table is looked up in ``bnas.binarize.config``: to swap it (a test), patch it
there.
"""

from __future__ import annotations

from .binarizers import WeightBinarizer
from .config import (
    ACTIVATION_QUANTIZERS,
    BINARIZE_PRESETS,
    FULL_PRECISION,
    WEIGHT_BINARIZERS,
    BinarizeConfig,
    named_binarization,
)
from .layers import BinaryConv2d, BinaryLayer, BinaryLinear, binary_layers, clip_latent_weights, set_binarization
from .quantizers import (
    ActivationQuantizer,
    approx_sign,
    hard_sigmoid,
    identity_sign,
    sign,
    ste_sign,
    stochastic_sign,
    swish_sign,
)

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
    # importable as before, though not in the original ``__all__``
    "BinaryLayer",
    "FULL_PRECISION",
]
