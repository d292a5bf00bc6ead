"""The catalog file (``primitives/*.yaml``): named binarizations, and named presets of op families.

Which families exist, and whether a name is already taken, is the registry's business; the
file's structure is checked here. Messages follow ``bnas.registry.load_catalog`` and
``BinarizeConfig``: a binarization's mistake is reported at ``binarize.<name>``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from ..errors import short_repr
from .common import BINARIZE_INLINE, BINARIZE_NAME, ERROR_TYPE, Schema, StrictStr, expect, fail, says

__all__ = ["ACTIVATION_QUANTIZERS", "WEIGHT_BINARIZERS", "Binarization", "CatalogOp", "CatalogSchema"]

ActivationName = Literal["ste", "approx_sign", "swish_sign", "identity_ste", "stochastic", "rsign", "none"]
WeightName = Literal["sign", "xnor", "xnor_tensor", "bireal", "stochastic", "none"]
ACTIVATION_QUANTIZERS: tuple[str, ...] = get_args(ActivationName)
WEIGHT_BINARIZERS: tuple[str, ...] = get_args(WeightName)
# ``bnas.binarize.config.LEARNED_SCALE_BINARIZERS``, restated: this package does not import torch.
LEARNED_SCALE_BINARIZERS = ("sign", "xnor", "xnor_tensor", "bireal")


def _must_be(key: str, what: str) -> WrapValidator:
    """``BinarizeConfig``'s wording: ``clip must be a positive number, got -1``."""
    return says(lambda v: f"{key} must be {what}, got {short_repr(v)}", whole=True)


PositiveOrGlorot = Annotated[float, Strict(), Field(gt=0)] | Literal["glorot"] | None


class Binarization(Schema):
    """How a layer binarizes (`bnas.binarize.BinarizeConfig`): an activation quantizer and a
    weight binarizer by name, like larq's input_quantizer and kernel_quantizer."""

    model_config = ConfigDict(title="Binarization")
    unknown_style: ClassVar[Literal["each", "all"]] = "all"
    unknown_label: ClassVar[str] = "binarize option(s)"

    activation: Annotated[
        ActivationName,
        says(
            lambda v: (
                f"unknown activation quantizer {short_repr(v)}; expected one of {', '.join(ACTIVATION_QUANTIZERS)}"
            )
        ),
    ] = Field(
        "ste",
        description="ste (clipped STE, BinaryNet), approx_sign (Bi-Real), swish_sign (BNN+), identity_ste, "
        "stochastic, rsign (learnable thresholds, ReActNet), none (real-valued).",
    )
    weight: Annotated[
        WeightName,
        says(lambda v: f"unknown weight binarizer {short_repr(v)}; expected one of {', '.join(WEIGHT_BINARIZERS)}"),
    ] = Field(
        "xnor",
        description="sign (no scale), xnor (mean |W| per output channel), xnor_tensor (one scale), "
        "bireal (magnitude-aware gradient), stochastic, none.",
    )
    clip: Annotated[float, Strict(), Field(gt=0), _must_be("clip", "a positive number")] = Field(
        1.0, description="STE clip for activations: the gradient passes where |x| <= clip."
    )
    weight_clip: Annotated[float, Strict(), Field(gt=0), _must_be("weight_clip", "a positive number")] = Field(
        1.0, description="STE clip for weights: the gradient passes where |W| <= weight_clip."
    )
    latent_clip: Annotated[PositiveOrGlorot, _must_be("latent_clip", "a positive number, 'glorot' or null")] = Field(
        None,
        description="Clip latent weights to [-H, H] after each step: a number, glorot (BinaryNet's H, which "
        "also scales the layer's learning rate by 1/H), or null for none.",
    )
    swish_beta: Annotated[float, Strict(), _must_be("swish_beta", "a number")] = Field(
        5.0, description="The slope of swish_sign."
    )
    lr_scale: Annotated[PositiveOrGlorot, _must_be("lr_scale", "a positive number, 'glorot' or null")] = Field(
        None,
        description="A learning-rate multiplier for the latent weights: a number, or glorot (BinaryNet's MNIST "
        "recipe); default 1, or 1/H with latent_clip: glorot.",
    )
    learned_scale: Annotated[bool, Strict(), _must_be("learned_scale", "true or false")] = Field(
        False,
        description="A learnable per-output-channel weight scale (starts at mean |W|, XNOR-Net's alpha) "
        "instead of the binarizer's computed one: scale * sign(W). Not with weight: none or stochastic.",
    )

    @model_validator(mode="after")
    def _learned_scale_needs_a_sign_binarizer(self) -> Binarization:
        # BinarizeConfig's message, word for word.
        if self.learned_scale and self.weight not in LEARNED_SCALE_BINARIZERS:
            raise fail(
                f"learned_scale: true cannot be used with weight: {self.weight}; "
                f"use one of {', '.join(LEARNED_SCALE_BINARIZERS)}, or learned_scale: false"
            )
        return self


def _at_the_binarization(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # The catalog names the binarization, not its key: "binarize.b: unknown activation quantizer".
    try:
        return handler(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] != ERROR_TYPE:
            raise
        raise fail(str((first.get("ctx") or {})["message"])) from None


InlineBinarization = Annotated[Binarization, WrapValidator(_at_the_binarization)]


def _binarize_kind(value: Any) -> str:
    return BINARIZE_INLINE if isinstance(value, dict) else BINARIZE_NAME


class CatalogOp(Schema):
    """A named preset: an op family with some options fixed; any key but family and description
    is an option of the family (a genotype may override it inline)."""

    model_config = ConfigDict(extra="allow")
    not_a_mapping: ClassVar[str] = "expected a mapping with a 'family' key"

    family: Annotated[StrictStr, expect("an op family name (a string)")] = Field(
        description="A registered op family (`bnas primitives` lists families and presets)."
    )
    description: Annotated[StrictStr, expect("a one-line description")] = Field(
        "", description="Shown by `bnas primitives` (default: the family's)."
    )
    binarize: (
        Annotated[
            Annotated[Annotated[StrictStr, expect("a binarization name or mapping")], Tag(BINARIZE_NAME)]
            | Annotated[InlineBinarization, Tag(BINARIZE_INLINE)],
            Discriminator(_binarize_kind),
        ]
        | None
    ) = Field(
        None,
        description="A binarization named under `binarize:` (here or in an earlier catalog), or one "
        "written inline; default the family's.",
    )

    @classmethod
    def missing_key_error(cls, name: str) -> Any:
        return fail("expected a mapping with a 'family' key")


class CatalogSchema(Schema):
    """A catalog of named binarizations and op presets (`bnas.load_catalog`)."""

    model_config = ConfigDict(title="Catalog")
    not_a_mapping: ClassVar[str] = "expected a mapping with 'binarize' and 'ops' sections"

    binarize: (
        Annotated[dict[str, InlineBinarization | None], expect("a mapping of named binarizations", got="type")] | None
    ) = Field(None, description="Name -> binarization; ops of this file and of later ones may use the name.")
    ops: Annotated[dict[str, CatalogOp], expect("a mapping of named op presets", got="type")] | None = Field(
        None, description="Name -> preset of an op family; the name becomes usable in any genotype."
    )
