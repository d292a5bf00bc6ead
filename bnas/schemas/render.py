"""A pydantic ``ValidationError`` -> bnas's one-line ``GenotypeError(message, path, file)``.

Only the first error is reported, as the loaders do: pydantic checks a mapping's keys in
the schema's order, and each ``Schema`` refuses unknown and missing keys before its
values, so the first error is the one a reader meets first. Its YAML path comes from the
structured ``loc`` (keys joined by ``.``, list indices as ``[i]``), never from text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ..errors import GenotypeError, short_repr
from .common import ERROR_TYPE, UNION_TAGS

__all__ = ["first_error", "message_of", "to_error", "yaml_path"]

# What pydantic's own error types expect, for an error no bnas wrapper rewrote (a schema
# written later, without ``expect``, still reads like the rest).
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def yaml_path(loc: Iterable[Any], prefix: str = "") -> str:
    """``("cells", "normal", "nodes", "n1", 0)`` -> ``cells.normal.nodes.n1[0]``, after ``prefix``."""
    path = prefix
    parts = list(loc)
    for i, part in enumerate(parts):
        if part in UNION_TAGS or part == "[key]":
            continue  # a union's branch, or pydantic's marker of a key (vs its value)
        # An int is a list index, unless pydantic marks it as a mapping's key ({5: ...}).
        is_key = i + 1 < len(parts) and parts[i + 1] == "[key]"
        if isinstance(part, int) and not is_key:
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def message_of(error: ErrorDetails) -> str:
    """bnas's wording of one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == ERROR_TYPE:
        return str(ctx["message"])
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        return f"unknown key {short_repr(error['loc'][-1] if error['loc'] else '')}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected', 'one of the listed values')}, got {short_repr(value)}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"expected a number {_BOUNDS[kind]} {bound}, got {short_repr(value)}"
    if kind in ("too_short", "too_long"):
        most = ctx.get("max_length", "any number of")
        return f"expected {ctx.get('min_length', 0)} to {most} items, got {short_repr(value)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {short_repr(value)}"
    text = error["msg"]
    return text[:1].lower() + text[1:]


def first_error(exc: ValidationError) -> ErrorDetails:
    return exc.errors(include_url=False)[0]


def to_error(exc: ValidationError, file: str | None = None, prefix: str = "") -> GenotypeError:
    """The first error of ``exc`` as a ``GenotypeError`` naming ``file`` and the YAML path."""
    error = first_error(exc)
    loc: tuple[Any, ...] = tuple(error["loc"])
    if error["type"] == ERROR_TYPE:
        loc += tuple((error.get("ctx") or {}).get("at", ()))
    elif error["type"] == "missing":
        return GenotypeError(f"missing required key {short_repr(loc[-1])}", yaml_path(loc, prefix), file)
    return GenotypeError(message_of(error), yaml_path(loc, prefix), file)
