"""The primitive registry: op families from Python, named presets from catalog YAML files.

A primitive is a factory ``f(C_in, C_out, stride, **options) -> nn.Module`` (timm's
``register_model`` idea applied to ops). The registry is a leaf: it imports no op. The
modules of ``bnas.ops`` register the op *families* as they are imported; catalog files
register *named presets* that fix a family's options and its binarization, e.g.
``xnor_resnet_block = resnet_block(binarize=xnor)``. ``bnas.catalog`` (imported by ``import
bnas``) imports the families and installs the loader of the shipped ``primitives/*.yaml``,
which runs on the first query, so every name is known by the time anyone asks.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .binarize import config as _binarize_config
from .binarize.config import BinarizeConfig
from .errors import BnasError, GenotypeError
from .schemas import validate
from .yaml_io import load_yaml_text

__all__ = [
    "CatalogError",
    "PrimitiveFactory",
    "PrimitiveSpec",
    "UnknownPrimitiveError",
    "build_op",
    "closest_primitives",
    "ensure_catalog",
    "get_primitive",
    "get_spec",
    "list_primitives",
    "load_catalog",
    "register_family",
    "register_primitive",
    "set_catalog_loader",
]

PrimitiveFactory = Callable[..., nn.Module]


class UnknownPrimitiveError(BnasError, KeyError):
    """An op name that is not registered; the message lists the closest known names.

    Still a ``KeyError`` (a failed lookup by name), as it was before it became a ``BnasError``.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class PrimitiveSpec:
    """One registry entry."""

    name: str
    factory: PrimitiveFactory
    family: str
    binarize: str = "-"  # a catalog binarization name, "real", or "-" (set per use)
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    source: str = "python"


_REGISTRY: dict[str, PrimitiveSpec] = {}
_catalog_loaded = False
# Set by ``bnas.catalog``: registers the shipped presets. A hook rather than an import, so
# the registry never imports the ops that register into it.
_catalog_loader: Callable[[], None] | None = None


def __getattr__(name: str) -> Any:
    # The named binarizations live in ``bnas.binarize.config`` now; ``registry.BINARIZE_PRESETS``
    # still reads the live table.
    if name == "BINARIZE_PRESETS":
        return _binarize_config.BINARIZE_PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_catalog_loader(loader: Callable[[], None]) -> None:
    """Install the function that registers the shipped catalog (run once, on first use)."""
    global _catalog_loader
    _catalog_loader = loader


def ensure_catalog() -> None:
    """Run the shipped catalog's loader once, before the first query needs its names."""
    global _catalog_loaded
    if _catalog_loaded:
        return
    _catalog_loaded = True  # first: the loader's own load_catalog calls come back here
    if _catalog_loader is not None:
        _catalog_loader()


def register_primitive(
    name: str,
    factory: PrimitiveFactory | None = None,
    *,
    override: bool = False,
    family: str | None = None,
    binarize: str = "-",
    description: str = "",
) -> Any:
    """Register an op factory under ``name``; usable as a decorator or a plain call.

    ``@bnas.register_primitive("my_op")`` on a function ``f(C_in, C_out, stride, **options)``
    makes ``my_op`` usable in any genotype at once. Re-registering an existing name is an
    error unless ``override=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"primitive names must be identifiers (letters, digits, _), got {name!r}")

    def register(fn: PrimitiveFactory) -> PrimitiveFactory:
        if not callable(fn):
            raise TypeError(f"primitive {name!r}: the factory must be callable, got {type(fn).__name__}")
        ensure_catalog()  # a user name that clashes with a shipped one is refused now, not later
        if name in _REGISTRY and not override:
            raise ValueError(f"primitive {name!r} is already registered; pass override=True to replace it")
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = PrimitiveSpec(
            name=name, factory=fn, family=family or name, binarize=binarize, description=doc
        )
        return fn

    if factory is not None:
        return register(factory)
    return register


def register_family(
    name: str, *, binarize: str = "-", description: str = ""
) -> Callable[[PrimitiveFactory], PrimitiveFactory]:
    """Register an op family from ``bnas.ops`` (internal: does not trigger catalog loading,
    since the catalog's presets are built on top of the families)."""

    def register(fn: PrimitiveFactory) -> PrimitiveFactory:
        if name in _REGISTRY:
            raise ValueError(f"op family {name!r} is registered twice")
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = PrimitiveSpec(name=name, factory=fn, family=name, binarize=binarize, description=doc)
        return fn

    return register


def closest_primitives(name: str, n: int = 3) -> list[str]:
    """Up to ``n`` registered names close to ``name`` (for "did you mean" hints)."""
    ensure_catalog()
    return difflib.get_close_matches(name, list(_REGISTRY), n=n, cutoff=0.5)


def get_spec(name: str) -> PrimitiveSpec:
    """The entry registered under ``name``; an ``UnknownPrimitiveError`` names the closest."""
    ensure_catalog()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = closest_primitives(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `bnas primitives` for the list"
        raise UnknownPrimitiveError(f"unknown op {name!r}{hint}") from None


def get_primitive(name: str) -> PrimitiveFactory:
    """The factory registered under ``name`` (a clear error naming the closest names)."""
    return get_spec(name).factory


def list_primitives(pattern: str | None = None) -> list[PrimitiveSpec]:
    """Every registered primitive, families and catalog presets, sorted by name; with
    ``pattern`` (shell-style, e.g. ``xnor_*``), only the names it matches."""
    ensure_catalog()
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [_REGISTRY[n] for n in names]


def build_op(name: str, C_in: int, C_out: int, stride: int = 1, **options: Any) -> nn.Module:
    """Instantiate primitive ``name``; options override the preset's options."""
    return get_primitive(name)(C_in, C_out, stride, **options)


# --------------------------------------------------------------------------------------
# The YAML catalog
# --------------------------------------------------------------------------------------
class CatalogError(BnasError, ValueError):
    """A catalog file that cannot be registered; the message names the file and the key.

    Still a ``ValueError``, as it was before it became a ``BnasError``."""


def _preset_factory(family: PrimitiveFactory, preset: Mapping[str, Any]) -> PrimitiveFactory:
    @functools.wraps(family)
    def factory(C_in: int, C_out: int, stride: int = 1, **options: Any) -> nn.Module:
        # A fresh dict per call: building one op never changes the preset or another op.
        return family(C_in, C_out, stride, **{**preset, **options})

    return factory


def _same_entry(spec: PrimitiveSpec, path: Path, family: str, options: Mapping[str, Any]) -> bool:
    """Whether ``spec`` came from this very file with these options: loading an unchanged
    catalog again (a search space and its workers, a command run twice in one process) is
    then a no-op, not a name clash."""
    if spec.source == "python" or spec.family != family or dict(spec.options) != dict(options):
        return False
    return Path(spec.source).resolve() == path.resolve()


def load_catalog(path: str | Path, override: bool = False) -> list[str]:
    """Register the named presets of one catalog YAML file; returns the names added.

    All or nothing: a file with a mistake registers none of its presets. A binarization or
    op name that is already defined differently is an error unless ``override=True``; the
    same file loaded again, unchanged, registers the same presets again (no error)."""
    ensure_catalog()  # the shipped presets come first
    path = Path(path)
    try:  # bnas's safe loader: a size cap, duplicate keys refused, one-line errors
        data = load_yaml_text(path.read_text(), str(path), what="catalog")
    except GenotypeError as exc:
        raise CatalogError(str(exc)) from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog ({exc.strerror}); check the path") from None
    # The file's structure is the catalog schema's (bnas.schemas.catalog); what is left here
    # is what the registry knows: families, names already taken.
    try:
        validate("catalog", data, str(path))
    except GenotypeError as exc:
        raise CatalogError(str(exc)) from exc
    presets = _binarize_config.BINARIZE_PRESETS
    configs: dict[str, BinarizeConfig] = {}
    for key, value in (data.get("binarize") or {}).items():
        configs[key] = BinarizeConfig.from_dict(value or {})
        earlier = presets.get(key)
        if earlier is not None and earlier != configs[key] and not override:
            raise CatalogError(
                f"{path}: binarize.{key}: the name is already defined differently ({earlier}); "
                "rename it, or load the catalog with override=True to replace it"
            )
    known = {**presets, **configs}  # an op may name this file's binarizations or earlier ones
    specs: dict[str, PrimitiveSpec] = {}
    for name, entry in (data.get("ops") or {}).items():
        options = dict(entry)
        family_name = options.pop("family")
        description = options.pop("description", "")
        family = _REGISTRY.get(family_name)
        if family is None:
            raise CatalogError(f"{path}: ops.{name}.family: unknown op family {family_name!r}")
        binarize_label = "real"
        if "binarize" in options:
            ref = options["binarize"]
            if isinstance(ref, str):
                if ref not in known:
                    raise CatalogError(
                        f"{path}: ops.{name}.binarize: unknown binarization {ref!r}; defined: {', '.join(sorted(known))}"
                    )
                options["binarize"] = known[ref]
                binarize_label = ref
            elif isinstance(ref, dict):
                options["binarize"] = BinarizeConfig.from_dict(ref)
                binarize_label = f"{options['binarize'].activation}/{options['binarize'].weight}"
        elif family.binarize != "real":
            binarize_label = family.binarize
        if name in _REGISTRY and not override and not _same_entry(_REGISTRY[name], path, family.family, options):
            raise CatalogError(
                f"{path}: ops.{name}: the name is already registered; "
                "rename it, or load the catalog with override=True to replace it"
            )
        specs[name] = PrimitiveSpec(
            name=name,
            factory=_preset_factory(family.factory, options),
            family=family.family,
            binarize=binarize_label,
            description=description or family.description,
            options=options,
            source=str(path),
        )
    presets.update(configs)
    _REGISTRY.update(specs)
    return list(specs)
