"""Safe YAML reading and writing shared by genotypes, search spaces and the catalog.

Only ``yaml.safe_load`` is used, so a tag such as ``!!python/object/apply:os.system`` is an
error, never a call. Every failure becomes a one-line ``GenotypeError`` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic as _atomic_write_text
from .errors import GenotypeError


def _line_of(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"line {mark.line + 1}" if mark is not None else ""


def parse_yaml_mapping(text: str, file: str, what: str = "genotype") -> dict[str, Any]:
    """Parse ``text`` as one YAML mapping, with errors that name ``file`` and the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise GenotypeError(
            f"YAML tags that construct Python objects are not allowed ({tag.strip()}); write plain values",
            _line_of(exc),
            file,
        ) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GenotypeError(f"invalid YAML: {problem}", _line_of(exc), file) from None
    if data is None:
        raise GenotypeError(f"the file is empty; a {what} is a YAML mapping (see search_spaces/genotypes/ for examples)", "", file)
    if not isinstance(data, dict):
        raise GenotypeError(f"expected a YAML mapping at the top level, got a {type(data).__name__}", "(top level)", file)
    return data


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "genotype") -> dict[str, Any]:
    """Read a YAML file that must hold one mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenotypeError(f"no such {what} file", "", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GenotypeError(f"cannot read the file: {exc}", "", str(path)) from None
    return parse_yaml_mapping(text, str(path), what)


class _FlowDumper(yaml.SafeDumper):
    """Block style for the top levels, flow style for leaf lists and small mappings."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(x, (list, dict)) for x in data) or all(
        isinstance(x, list) and all(not isinstance(y, (list, dict)) for y in x) for x in data
    )
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = len(data) <= 6 and all(not isinstance(v, (list, dict)) for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_FlowDumper.add_representer(list, _represent_list)
_FlowDumper.add_representer(dict, _represent_dict)


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text in the compact style of the shipped genotypes (key order kept)."""
    return yaml.dump(data, Dumper=_FlowDumper, sort_keys=False, width=100)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file;
    the file gets 0666 & ~umask like a plain open() (see bnas.atomic)."""
    _atomic_write_text(path, text)
