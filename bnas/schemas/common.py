"""The pieces every schema is made of: a base model, and leaf types whose errors read like bnas's.

A field is a pydantic type (which the JSON Schema is generated from) wrapped by
``expect``/``says``: the wrapper only rewrites pydantic's own wording for an error at that
value into bnas's one-line style ("expected a positive integer, got -8"); errors further in
keep their own path and message. Checks pydantic types cannot express (unknown keys with
the closest valid one, references between parts of a file) raise ``fail``, whose ``at``
extends the YAML path below the value being checked.

Caps (``bnas.yaml_io.LIMITS``) are not here: they are environment variables, so a static
``le=`` bound would be wrong whenever a user raises one. The loaders apply them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import short_repr

__all__ = [
    "ERROR_TYPE",
    "UNION_TAGS",
    "Schema",
    "chw",
    "expect",
    "fail",
    "int_only",
    "says",
    "type_name",
]

# The ``type`` of every error raised with a bnas message; ``render`` reads ``ctx``.
ERROR_TYPE = "bnas"
# Tags of the unions below (a layer is an op entry or a cell entry): pydantic puts them in
# an error's ``loc``; they are not part of the YAML path. The angle brackets keep them
# apart from any key a user writes.
OP_ENTRY = "<op entry>"
CELL_ENTRY = "<cell entry>"
ONE_CHOICE = "<one choice>"
FLAT_CHOICES = "<choice list>"
STAGE_CHOICES = "<choice list per stage>"
BINARIZE_NAME = "<binarization name>"
BINARIZE_INLINE = "<binarization>"
PREPROCESS_NAME = "<preprocessing kind>"
PREPROCESS_INLINE = "<preprocessing>"
UNION_TAGS = frozenset(
    {
        OP_ENTRY,
        CELL_ENTRY,
        ONE_CHOICE,
        FLAT_CHOICES,
        STAGE_CHOICES,
        BINARIZE_NAME,
        BINARIZE_INLINE,
        PREPROCESS_NAME,
        PREPROCESS_INLINE,
    }
)

GotStyle = Literal["repr", "typed", "type", "none"]


def type_name(value: Any) -> str:
    """The YAML-ish name of a value's type (``null`` for None)."""
    return "null" if value is None else type(value).__name__


def fail(message: str, *at: str | int) -> PydanticCustomError:
    """An error with bnas's ``message`` at the value being checked, or ``at`` below it."""
    return PydanticCustomError(ERROR_TYPE, "{message}", {"message": message, "at": tuple(at)})


def _got(value: Any, style: GotStyle, error_type: str) -> str:
    if style == "none":
        return ""
    if style == "type":
        return f", got {type_name(value)}"
    # Genotype style: the type is named when it is the problem, not when the value is.
    wrong_type = error_type.endswith(("_type", "_parsing")) or error_type in ("value_error", "literal_error")
    suffix = f" ({type_name(value)})" if style == "typed" and wrong_type else ""
    return f", got {short_repr(value)}{suffix}"


def says(message: str | Callable[[Any], str], got: GotStyle = "none", whole: bool = False) -> WrapValidator:
    """Rewrite pydantic's error at this value into ``message`` (a text, or a function of the value).

    Errors inside the value (an item of a list, a key of a mapping) keep their own path and
    message unless ``whole``: then any error in the value is reported as this one.
    """

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            # An error already in bnas's words at this value, or (unless whole) one inside
            # the value, speaks for itself.
            if (first["type"] == ERROR_TYPE and not first["loc"]) or (first["loc"] and not whole):
                raise
            text = message(value) if callable(message) else message
            raise fail(text + _got(value, got, first["type"])) from None

    return WrapValidator(check)


def expect(what: str, got: GotStyle = "repr", whole: bool = False) -> WrapValidator:
    """``expected <what>, got <value>``: bnas's wording for a value of the wrong kind."""
    return says(f"expected {what}", got=got, whole=whole)


def _int_only(value: Any) -> Any:
    # For a choice of integers (``Literal[1, 2]``), which pydantic matches by equality: YAML's
    # true/false are Python bools, and 2.0 == 2, but neither is an integer choice. A
    # ValueError, as pydantic reports only that (not a TypeError) as a validation error.
    if isinstance(value, (bool, float)):
        raise ValueError("not an integer")  # noqa: TRY004
    return value


int_only = BeforeValidator(_int_only)


def _three_items(value: Any) -> Any:
    # The shape before its items: [[8], [16]] is two items short before it holds a list.
    if not isinstance(value, list) or len(value) != 3:
        raise fail(f"expected [C, H, W], got {short_repr(value)}")
    return value


# An image shape [C, H, W] (the items' own type is added by each schema).
chw = BeforeValidator(_three_items)

# Leaf types shared by several schemas. ``Strict`` keeps YAML's text "8" from becoming 8
# (and a number from becoming a string); a float field still takes an integer.
StrictStr = Annotated[str, Strict()]
TrueOrFalse = Annotated[bool, Strict(), expect("true or false")]
# Positive integers: the genotype loader names the type when it is the problem
# ("got 'eight' (str)"), the search-space loader and the recipe do not.
PositiveInt = Annotated[int, Strict(), Field(gt=0), expect("a positive integer")]
PositiveIntTyped = Annotated[int, Strict(), Field(gt=0), expect("a positive integer", got="typed")]


def closest(key: Any, allowed: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(str(key), list(allowed), n=1)
    return match[0] if match else None


def key_path(key: Any) -> str:
    """A key as a YAML path element, cut short (a key may be as long as the file)."""
    text = str(key)
    return text if len(text) <= 40 else text[:37] + "..."


class Schema(BaseModel):
    """A YAML mapping: unknown keys and missing required keys are refused first, in bnas's words.

    Subclasses set ``not_a_mapping`` (formatted with ``got``: a short repr, and ``type``),
    ``missing`` (field -> message when it is absent), ``unknown_style`` (``each``: the first
    unknown key with the closest valid one, at that key; ``all``: every unknown key, at the
    mapping) and ``keys`` (the allowed keys in the order messages list them, by default the
    fields). ``extra="allow"`` models (op entries: other keys are op options) skip the
    unknown-key check.
    """

    model_config = ConfigDict(extra="forbid")

    not_a_mapping: ClassVar[str] = "expected a mapping, got {type}"
    missing: ClassVar[dict[str, str]] = {}
    unknown_style: ClassVar[Literal["each", "all"]] = "each"
    unknown_label: ClassVar[str] = "key(s)"
    keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return cls.keys or tuple(cls.model_fields)

    @classmethod
    def unknown_keys_error(cls, unknown: list[Any]) -> PydanticCustomError:
        allowed = cls.allowed_keys()
        if cls.unknown_style == "all":
            names = ", ".join(sorted(str(k) for k in unknown))
            return fail(f"unknown {cls.unknown_label} {names}; expected some of {', '.join(sorted(allowed))}")
        key = unknown[0]
        match = closest(key, allowed)
        hint = f"; did you mean {match!r}?" if match else f"; expected some of {', '.join(allowed)}"
        return fail(f"unknown key {short_repr(key)}{hint}", key_path(key))

    @classmethod
    def missing_key_error(cls, name: str) -> PydanticCustomError:
        return fail(cls.missing.get(name, f"missing required key {name!r}"), name)

    @classmethod
    def check_keys(cls, data: dict[Any, Any]) -> None:
        """Refuse unknown keys, then missing required ones (the loaders' order)."""
        if cls.model_config.get("extra") == "forbid":
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise cls.unknown_keys_error(unknown)
        for name, info in cls.model_fields.items():
            if info.is_required() and name not in data:
                raise cls.missing_key_error(name)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_with_known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            # Templates hold literal braces ("{op: NAME}"), so no str.format here.
            raise fail(cls.not_a_mapping.replace("{got}", short_repr(data)).replace("{type}", type_name(data)))
        cls.check_keys(data)
        return data


def no_default_in_schema(schema: dict[str, Any]) -> None:
    """For an optional key whose absence means something other than null (``final_lr``)."""
    schema.pop("default", None)
