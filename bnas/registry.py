"""The primitive registry: op families from Python, named presets from ``primitives/*.yaml``.

A primitive is a factory ``f(C_in, C_out, stride, **options) -> nn.Module`` (timm's
``register_model`` idea applied to ops). Python modules in ``bnas.ops`` register the op
*families*; the YAML catalog registers *named presets* that fix a family's options and its
binarization, e.g. ``xnor_resnet_block = resnet_block(binarize=xnor)``.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .binarize import BinarizeConfig
from .resources import resource_dir

__all__ = [
    "PrimitiveFactory",
    "PrimitiveSpec",
    "UnknownPrimitiveError",
    "register_primitive",
    "get_primitive",
    "get_spec",
    "list_primitives",
    "build_op",
    "closest_primitives",
    "load_catalog",
    "register_family",
]

PrimitiveFactory = Callable[..., nn.Module]


class UnknownPrimitiveError(KeyError):
    """An op name that is not registered; the message lists the closest known names."""

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
# Named binarizations of the catalog (``xnor``, ``bireal``, ...): ops accept these names too.
BINARIZE_PRESETS: dict[str, BinarizeConfig] = {}
_catalog_loaded = False


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
        _ensure_catalog()
        if name in _REGISTRY and not override:
            raise ValueError(f"primitive {name!r} is already registered; pass override=True to replace it")
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = PrimitiveSpec(name=name, factory=fn, family=family or name, binarize=binarize, description=doc)
        return fn

    if factory is not None:
        return register(factory)
    return register


def register_family(name: str, *, binarize: str = "-", description: str = "") -> Callable[[PrimitiveFactory], PrimitiveFactory]:
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
    _ensure_catalog()
    return difflib.get_close_matches(name, list(_REGISTRY), n=n, cutoff=0.5)


def get_spec(name: str) -> PrimitiveSpec:
    _ensure_catalog()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = closest_primitives(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `bnas primitives` for the list"
        raise UnknownPrimitiveError(f"unknown op {name!r}{hint}") from None


def get_primitive(name: str) -> PrimitiveFactory:
    """The factory registered under ``name`` (a clear error naming the closest names)."""
    return get_spec(name).factory


def list_primitives() -> list[PrimitiveSpec]:
    """Every registered primitive, families and catalog presets, sorted by name."""
    _ensure_catalog()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def build_op(name: str, C_in: int, C_out: int, stride: int = 1, **options: Any) -> nn.Module:
    """Instantiate primitive ``name``; options override the preset's options."""
    return get_primitive(name)(C_in, C_out, stride, **options)


# --------------------------------------------------------------------------------------
# The YAML catalog
# --------------------------------------------------------------------------------------
class CatalogError(ValueError):
    pass


def _preset_factory(family: PrimitiveFactory, preset: Mapping[str, Any]) -> PrimitiveFactory:
    @functools.wraps(family)
    def factory(C_in: int, C_out: int, stride: int = 1, **options: Any) -> nn.Module:
        # A fresh dict per call: building one op never changes the preset or another op.
        return family(C_in, C_out, stride, **{**preset, **options})

    return factory


def load_catalog(path: str | Path, override: bool = False) -> list[str]:
    """Register the named presets of one catalog YAML file; returns the names added.

    All or nothing: a file with a mistake registers none of its presets. A binarization or
    op name that is already defined differently is an error unless ``override=True``."""
    _ensure_catalog()  # the op families and the shipped presets come first
    path = Path(path)
    from .errors import GenotypeError
    from .yaml_io import load_yaml_text

    try:  # bnas's safe loader: a size cap, duplicate keys refused, one-line errors
        data = load_yaml_text(path.read_text(), str(path), what="catalog")
    except GenotypeError as exc:
        raise CatalogError(str(exc)) from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog ({exc.strerror}); check the path") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a mapping with 'binarize' and 'ops' sections")
    configs: dict[str, BinarizeConfig] = {}
    for key, value in (data.get("binarize") or {}).items():
        try:
            configs[key] = BinarizeConfig.from_dict(value or {})
        except (ValueError, TypeError) as exc:
            raise CatalogError(f"{path}: binarize.{key}: {exc}") from None
        earlier = BINARIZE_PRESETS.get(key)
        if earlier is not None and earlier != configs[key] and not override:
            raise CatalogError(f"{path}: binarize.{key}: the name is already defined differently ({earlier}); "
                               "rename it, or load the catalog with override=True to replace it")
    known = {**BINARIZE_PRESETS, **configs}  # an op may name this file's binarizations or earlier ones
    specs: dict[str, PrimitiveSpec] = {}
    for name, entry in (data.get("ops") or {}).items():
        if not isinstance(entry, dict) or "family" not in entry:
            raise CatalogError(f"{path}: ops.{name}: expected a mapping with a 'family' key")
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
                    raise CatalogError(f"{path}: ops.{name}.binarize: unknown binarization {ref!r}; defined: {', '.join(sorted(known))}")
                options["binarize"] = known[ref]
                binarize_label = ref
            elif isinstance(ref, dict):
                options["binarize"] = BinarizeConfig.from_dict(ref)
                binarize_label = f"{options['binarize'].activation}/{options['binarize'].weight}"
        elif family.binarize != "real":
            binarize_label = family.binarize
        if name in _REGISTRY and not override:
            raise CatalogError(f"{path}: ops.{name}: the name is already registered; "
                               "rename it, or load the catalog with override=True to replace it")
        specs[name] = PrimitiveSpec(
            name=name,
            factory=_preset_factory(family.factory, options),
            family=family.family,
            binarize=binarize_label,
            description=description or family.description,
            options=options,
            source=str(path),
        )
    BINARIZE_PRESETS.update(configs)
    _REGISTRY.update(specs)
    return list(specs)


def _ensure_catalog() -> None:
    """Register the op families and the shipped catalog once, on first use."""
    global _catalog_loaded
    if _catalog_loaded:
        return
    _catalog_loaded = True
    from . import ops  # noqa: F401  (importing registers the families)

    for path in sorted(resource_dir("primitives").glob("*.yaml")):
        load_catalog(path)
