"""Safe YAML reading and writing shared by genotypes, search spaces and the catalog.

Only a ``yaml.SafeLoader`` subclass is used, so a tag such as
``!!python/object/apply:os.system`` is an error, never a call. Every failure becomes a
one-line ``GenotypeError`` naming the file. Reading is bounded: a file-size cap, a cap on
how many values a document expands to (an alias bomb composes in kilobytes and expands to
gigabytes), and a duplicate key is an error instead of "the last one wins".

The caps (``LIMITS``) are environment variables ``BNAS_MAX_<NAME>``; every cap error names
its variable, so a user with a real need can raise it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic as _atomic_write_text
from .errors import BnasError, GenotypeError, LimitError

# name -> (default, what it bounds). Defaults are far past any real binary network.
LIMITS: dict[str, tuple[int, str]] = {
    "YAML_BYTES": (1 << 20, "bytes in a genotype, search-space or catalog YAML file"),
    "YAML_NODES": (100_000, "values in one YAML document after aliases are expanded"),
    "CHANNELS": (16_384, "channels of any layer or cell (and input channels)"),
    "INPUT_SIZE": (8_192, "input height or width"),
    "CLASSES": (100_000, "num_classes"),
    "REPEAT": (1_024, "repeat of one layer entry, or cells per stage"),
    "LAYERS": (4_096, "layers and cells of a whole network (every repeat counted)"),
    "STAGES": (16, "stages of a search space"),
    "NODES": (64, "nodes of one cell, or edges into one node"),
    "KERNEL": (63, "kernel size of an op"),
}


def limit(name: str) -> int:
    """The cap ``name`` of ``LIMITS``: ``BNAS_MAX_<NAME>`` from the environment, else the default."""
    default, _ = LIMITS[name]
    raw = os.environ.get(f"BNAS_MAX_{name}")
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BnasError(
            f"BNAS_MAX_{name}={raw[:40]!r}: expected a positive integer (the default is {default})"
        ) from None
    if value <= 0:
        raise BnasError(f"BNAS_MAX_{name}={value}: expected a positive integer (the default is {default})")
    return value


def check_limit(name: str, value: int, path: str, what: str | None = None) -> int:
    """``value`` if it is within the cap ``name``, else a one-line ``LimitError`` at ``path``."""
    cap = limit(name)
    if value > cap:
        raise LimitError(
            f"{what or LIMITS[name][1]} is {value:,}, past the cap of {cap:,}; no real binary network needs that many "
            f"(if yours does, raise the cap: BNAS_MAX_{name}=N)",
            path,
        )
    return value


def _line_of(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"line {mark.line + 1}" if mark is not None else ""


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _TooLargeError(yaml.YAMLError):
    pass


class _RecursiveAliasError(yaml.YAMLError):
    pass


# libyaml's parser when present: it composes a 1 MiB file in about a second, the pure-Python
# one in twenty. Both are safe loaders (only the SafeConstructor builds values).
_SafeBase: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class BnasLoader(_SafeBase):
    """A safe loader that refuses duplicate keys and documents that expand past a cap."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            # Only the keys written in this mapping: a merge (``<<: *base``) may be overridden.
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: the base constructor reports it
                if duplicate:
                    first = seen[key].start_mark.line + 1
                    raise _DuplicateKeyError(
                        None,
                        None,
                        f"duplicate key {short_key(key)} (first at line {first}); each key may appear once per mapping",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node, limit("YAML_NODES"))
        return node


def short_key(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_expanded_size(root: yaml.Node, cap: int) -> None:
    """Count the values ``root`` expands to (an alias counts its whole target again)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    # Iterative post-order walk: aliases share node objects, so memoise by id.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if not done and id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            if len(open_) + len(sizes) >= cap:  # distinct values alone are past the cap: stop early
                raise _TooLargeError(
                    f"the document holds more than {cap:,} values; write a smaller one, "
                    "or raise the cap with BNAS_MAX_YAML_NODES=N"
                )
            if id(node) in open_:
                raise _RecursiveAliasError(
                    f"line {node.start_mark.line + 1}: an alias refers to the value that contains it "
                    "(a recursive structure); write the value out plainly"
                )
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_.discard(id(node))
        total = 1 + sum(sizes[id(c)] for c in children)
        if total > cap:
            raise _TooLargeError(
                f"the document expands to more than {cap:,} values (YAML aliases repeat their target); "
                f"write it out plainly, or raise the cap with BNAS_MAX_YAML_NODES=N"
            )
        sizes[id(node)] = total


def load_yaml_text(text: str, file: str, what: str = "genotype") -> Any:
    """Parse ``text`` with ``BnasLoader``; errors are one-line ``GenotypeError``s naming ``file``."""
    cap = limit("YAML_BYTES")
    if len(text) > cap // 4 and len(text.encode("utf-8", "surrogatepass")) > cap:
        raise LimitError(
            f"the {what} text is larger than the cap of {cap:,} bytes; no real {what} is this long "
            f"(if yours is, raise the cap: BNAS_MAX_YAML_BYTES=N)",
            "",
            file,
        )
    try:
        return yaml.load(text, Loader=BnasLoader)  # noqa: S506 (BnasLoader is a SafeLoader)
    except _DuplicateKeyError as exc:
        raise GenotypeError(exc.problem or "duplicate key", _line_of(exc), file) from None
    except _TooLargeError as exc:
        raise LimitError(str(exc), "", file) from None
    except _RecursiveAliasError as exc:
        raise GenotypeError(str(exc), "", file) from None
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise GenotypeError(
            f"invalid YAML: tags that construct Python objects are not allowed ({tag.strip()[:200]}); write plain values",
            _line_of(exc),
            file,
        ) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise GenotypeError(f"invalid YAML: {problem[:200]}", _line_of(exc), file) from None


def parse_yaml_mapping(text: str, file: str, what: str = "genotype") -> dict[str, Any]:
    """Parse ``text`` as one YAML mapping, with errors that name ``file`` and the line."""
    try:
        data = load_yaml_text(text, file, what)
    except GenotypeError as exc:
        exc.in_file(file)
        raise
    if data is None:
        raise GenotypeError(
            f"the file is empty; a {what} is a YAML mapping (see search_spaces/genotypes/ for examples)", "", file
        )
    if not isinstance(data, dict):
        raise GenotypeError(
            f"expected a YAML mapping at the top level, got a {type(data).__name__}", "(top level)", file
        )
    return data


def read_yaml_text(path: str | os.PathLike[str], what: str = "genotype") -> str:
    """The text of a YAML file, refusing files past ``BNAS_MAX_YAML_BYTES`` before reading them."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            cap = limit("YAML_BYTES")
            # Read one byte past the cap: the size is known without reading a huge file.
            raw = fh.read(cap + 1)
    except FileNotFoundError:
        raise GenotypeError(f"no such {what} file", "", str(path)) from None
    except OSError as exc:
        raise GenotypeError(f"cannot read the file: {exc.strerror or exc}", "", str(path)) from None
    if len(raw) > cap:
        raise LimitError(
            f"the {what} file is larger than the cap of {cap:,} bytes; no real {what} is this long "
            f"(if yours is, raise the cap: BNAS_MAX_YAML_BYTES=N)",
            "",
            str(path),
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GenotypeError(
            f"cannot read the file: not UTF-8 text ({exc.reason} at byte {exc.start})", "", str(path)
        ) from None


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "genotype") -> dict[str, Any]:
    """Read a YAML file that must hold one mapping."""
    return parse_yaml_mapping(read_yaml_text(path, what), str(path), what)


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
