"""How a layer binarizes, as data: the quantizer and binarizer names, the frozen
``BinarizeConfig`` that names them (with its clips and learning-rate scale) and checks them, and
the named binarizations (``BINARIZE_PRESETS``, ``named_binarization``) the catalogs fill.

Plain data without torch, so the registry can read it without importing any layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = [
    "ACTIVATION_QUANTIZERS",
    "BINARIZE_PRESETS",
    "FULL_PRECISION",
    "LEARNED_SCALE_BINARIZERS",
    "WEIGHT_BINARIZERS",
    "BinarizeConfig",
    "learned_scale_error",
    "named_binarization",
]

ACTIVATION_QUANTIZERS = ("ste", "approx_sign", "swish_sign", "identity_ste", "stochastic", "rsign", "none")
WEIGHT_BINARIZERS = ("sign", "xnor", "xnor_tensor", "bireal", "stochastic", "none")
# The binarizers whose forward is alpha * sign(W), so a learned scale can stand in for alpha.
LEARNED_SCALE_BINARIZERS = ("sign", "xnor", "xnor_tensor", "bireal")


def learned_scale_error(weight: str) -> str:
    """The one message for ``learned_scale: true`` with a binarizer it cannot scale."""
    return (
        f"learned_scale: true cannot be used with weight: {weight}; "
        f"use one of {', '.join(LEARNED_SCALE_BINARIZERS)}, or learned_scale: false"
    )


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
    learned_scale: the weight binarizer holds a learnable per-output-channel scale (a parameter,
                 initialised as XNOR-Net's alpha, mean |W| per output channel, from the layer's
                 initial latent weights) and binarizes to ``scale * sign(W)`` with its own STE;
                 it replaces the computed alpha of ``sign``, ``xnor``, ``xnor_tensor`` and
                 ``bireal``. Invalid with ``weight: none`` and ``weight: stochastic``.
    """

    activation: str = "ste"
    weight: str = "xnor"
    clip: float = 1.0
    weight_clip: float = 1.0
    latent_clip: float | str | None = None
    swish_beta: float = 5.0
    lr_scale: float | str | None = None
    learned_scale: bool = False

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
        if not isinstance(self.learned_scale, bool):
            raise ValueError(f"learned_scale must be true or false, got {self.learned_scale!r}")
        if self.learned_scale and self.weight not in LEARNED_SCALE_BINARIZERS:
            raise ValueError(learned_scale_error(self.weight))

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
