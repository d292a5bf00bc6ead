"""The file formats people write, defined once: genotype, search space, recipe, catalog.

Each format is a pydantic v2 model. The model validates (``validate``: the first mistake
as a one-line ``GenotypeError`` naming the file and the YAML path, in the loaders' words)
and emits the JSON Schema that editors with a YAML language server use to complete and
check files (``json_schema``, ``bnas schema KIND``, ``docs/schemas/KIND.schema.json``).

What a schema does not check, the loaders do: the registry's op names and op options,
the size caps (environment variables), and graph properties of cells (acyclic, every node
reachable and used). ``validate`` returns the model, but loaders keep building from the
data they read: a model turns ``lr: 1`` into ``1.0``, and a genotype's hash must not move.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import BnasError
from .catalog import CatalogSchema
from .genotype import GenotypeSchema
from .recipe import RecipeSchema
from .render import to_error, yaml_path
from .space import SpaceSchema

__all__ = [
    "KINDS",
    "CatalogSchema",
    "GenotypeSchema",
    "RecipeSchema",
    "SchemaError",
    "SpaceSchema",
    "json_schema",
    "json_schema_text",
    "validate",
    "yaml_path",
]

MODELS: dict[str, type[BaseModel]] = {
    "genotype": GenotypeSchema,
    "space": SpaceSchema,
    "recipe": RecipeSchema,
    "catalog": CatalogSchema,
}
KINDS: tuple[str, ...] = tuple(MODELS)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class SchemaError(BnasError):
    """An unknown schema kind (a caller's mistake: the kinds are ``KINDS``)."""


def _model(kind: str) -> type[BaseModel]:
    try:
        return MODELS[kind]
    except KeyError:
        raise SchemaError(f"unknown schema {kind!r}; expected one of {', '.join(KINDS)}") from None


def validate(kind: str, data: Mapping[str, Any] | Any, file: str | None = None, prefix: str = "") -> BaseModel:
    """The validated model of ``data``, a parsed file of ``kind``; else the first mistake as a
    ``GenotypeError`` naming ``file`` and the YAML path (after ``prefix``, e.g. ``budget``)."""
    model = _model(kind)
    if kind == "recipe" and data is None:
        data = {}  # no recipe: every default (``Recipe.from_dict(None)``)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # bnas's one line says it all; pydantic's report would repeat it in its own words.
        raise to_error(exc, file, prefix) from None


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``kind``, for editors and other tools."""
    schema = _model(kind).model_json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def json_schema_text(kind: str) -> str:
    """``json_schema(kind)`` as the text ``docs/schemas/KIND.schema.json`` holds."""
    return json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n"
