"""Genotype -> networkx cell DAGs -> ``torch.nn.Module``.

The builder is where op names meet the registry: ``check_ops`` resolves every op of a
genotype (plain data) and checks its options, with errors that name the file and the YAML
path. The network is ``stem -> body -> head``. Every body entry is a *unit* that sees the outputs
of the two previous units (DARTS's cells k-2 and k-1); a plain op is a one-node cell that
reads only k-1. Shapes are tracked by running each new unit once on a zero tensor, so channel
and shape mismatches surface at build time with the YAML path of the culprit.

``_build`` takes an optional ``ModuleProvider``: every op, cell-input and residual module then
comes from it under a key saying what its weights mean, which is how a one-shot supernet
(``bnas.search.supernet``) shares modules between genotypes. Without one, nothing changes.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from .binarize import config as binarize_config
from .binarize import set_binarization
from .errors import GenotypeError, LimitError, short_repr
from .genotype import CellSpec, Genotype, LayerSpec, Preprocess, cell_graph, load_genotype
from .ops.basic import Zero
from .ops.cell_inputs import make_cell_input, make_residual
from .registry import UnknownPrimitiveError, build_op, get_spec, list_primitives

__all__ = [
    "build",
    "BinaryNetwork",
    "Cell",
    "ModuleProvider",
    "OpUnit",
    "check_op_name",
    "check_ops",
    "estimate_memory",
    "memory_limit",
]

Shape = tuple[int, ...]
log = logging.getLogger(__name__)

# ``provider(key, make)``: the module stored under ``key``, or ``make()`` stored there first.
# With one, every op, cell-input and residual module of a build comes from the provider (a
# one-shot supernet's shared table, ``bnas.search.supernet``); the key names what the module's
# weights mean across genotypes (see ``_unit_key`` and the call sites).
ModuleProvider = Callable[[str, Callable[[], nn.Module]], nn.Module]


def _provided(provider: ModuleProvider | None, key: str, make: Callable[[], nn.Module]) -> nn.Module:
    return make() if provider is None else provider(key, make)


def _options_key(options: Mapping[str, Any]) -> str:
    """Options as a canonical string (sorted keys), empty when there are none."""
    return json.dumps(dict(options), sort_keys=True, separators=(",", ":"), default=str) if options else ""


def _shape_key(shape: Shape) -> str:
    return "x".join(str(n) for n in shape)


def memory_limit() -> int | None:
    """Bytes of parameters and buffers a network may have: ``BNAS_MAX_PARAM_BYTES``, else the
    machine's physical memory (None when neither is known)."""
    raw = os.environ.get("BNAS_MAX_PARAM_BYTES", "").strip()
    if raw:
        try:
            value = int(float(raw))
        except ValueError:
            value = 0
        if value <= 0:
            raise LimitError(f"BNAS_MAX_PARAM_BYTES={raw[:40]!r}: expected a positive number of bytes")
        return value
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _same_tensor(x: Tensor) -> Tensor:
    return x


class _MemoryBudget:
    """Adds up parameter and buffer bytes as modules are made; refuses past ``cap``."""

    def __init__(self, cap: int, from_env: bool):
        self.cap = cap
        self.from_env = from_env
        self.total = 0

    def add(self, module: nn.Module, path: str) -> None:
        self.total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        if self.total > self.cap:
            where = "the limit BNAS_MAX_PARAM_BYTES" if self.from_env else "this machine's memory"
            raise LimitError(
                f"the network's parameters need more than {_gib(self.total)} by this layer, past {where} "
                f"({_gib(self.cap)}); make it narrower or shallower (or set BNAS_MAX_PARAM_BYTES=N if the memory is there)",
                path,
            )
        # The meta-device probe cannot run the sign's data-dependent checks; shapes do not
        # depend on binarization, so probe this throwaway copy with its quantizers off.
        set_binarization(module, activations=False, weights=False)
        # BatchNorm keeps its input's shape, and on the meta device it runs as a chain of
        # Python decompositions that took half of the estimate's time: pass the input through.
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = _same_tensor  # type: ignore[method-assign,assignment]


# --------------------------------------------------------------------------------------
# Op names and options: the genotype is plain data, resolved against the registry here
# --------------------------------------------------------------------------------------
_LAYER_KEYS = ("channels", "stride", "repeat")


def check_op_name(name: str, path: str) -> str:
    """``name`` if the registry knows it, else a ``GenotypeError`` at ``path`` naming the
    closest names (the one check of op names, for genotypes and search spaces alike)."""
    try:
        get_spec(name)
    except UnknownPrimitiveError as exc:
        message = str(exc)  # quotes the name, which may be as long as the file
        raise GenotypeError(message if len(message) <= 200 else message[:197] + "...", path) from None
    return name


def _op_options(op: str) -> tuple[str, ...] | None:
    """The keyword options ``op``'s factory takes, or None when it takes any (``**options``)."""
    try:
        params = list(inspect.signature(get_spec(op).factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    # The first three are C_in, C_out and stride: the builder passes them.
    return tuple(p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _key_path(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_options(op: str, options: Mapping[str, Any], path: str, layer_keys: tuple[str, ...] = ()) -> None:
    """Unknown option names are caught here, with the closest valid one, not as a TypeError at build."""
    valid = _op_options(op)
    if valid is None:
        return
    for key in options:
        if key in valid:
            continue
        if not layer_keys and key in ("stride", "C_in", "C_out", "channels"):
            raise GenotypeError(
                f"a cell edge cannot set {key!r}: the builder owns it (edges from the cell inputs get stride 2 when the "
                "body entry has stride: 2, and every edge works at the entry's channels); remove it",
                f"{path}.{key}",
            )
        names = tuple(layer_keys) + valid
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(names) if names else "none"
        raise GenotypeError(
            f"unknown option {short_repr(key, 40)} for {op}; {hint}valid: {listed}", f"{path}.{_key_path(key)}"
        )


def check_ops(genotype: Genotype, file: str | None = None) -> Genotype:
    """Resolve every op of ``genotype`` against the registry and check the options it is
    given; a ``GenotypeError`` names ``file`` (default: the genotype's source) and the YAML
    path (``cells.normal.nodes.n0[0][0]``, ``body[2].chanels``). Returns the genotype."""
    try:
        for name, cell in genotype.cells.items():
            for node, edges in cell.nodes.items():
                for i, edge in enumerate(edges):
                    path = f"cells.{name}.nodes.{node}[{i}]"
                    check_op_name(edge.op, f"{path}[0]")
                    _check_options(edge.op, edge.options, f"{path}[2]")
        for section in ("stem", "body", "head"):
            layers: Sequence[LayerSpec] = getattr(genotype, section)
            for i, layer in enumerate(layers):
                if layer.op is not None:
                    check_op_name(layer.op, f"{section}[{i}].op")
                    _check_options(layer.op, layer.options, f"{section}[{i}]", layer_keys=_LAYER_KEYS)
    except GenotypeError as exc:
        where = file or genotype.source
        if where:
            exc.in_file(where)
        raise
    return genotype


def _make_op(
    name: str,
    c_in: int,
    c_out: int,
    stride: int,
    options: Mapping[str, Any],
    path: str,
    provider: ModuleProvider | None = None,
    key: str = "",
) -> nn.Module:
    """Build op ``name``; with a ``provider``, the module stored under ``key`` + the op, its
    options, stride and widths (so a key never names two different shapes of weights)."""
    if provider is not None:
        full = f"{key}/{name}{_options_key(options)}/s{stride}/{c_in}>{c_out}"
        return provider(full, lambda: _make_op(name, c_in, c_out, stride, options, path))
    try:
        return build_op(name, c_in, c_out, stride, **dict(options))
    except GenotypeError:
        raise
    except (ValueError, TypeError) as exc:
        # Chained, not ``from None``: when the TypeError comes from a bug inside a user's
        # primitive, its traceback is what they need (the CLI prints one line regardless).
        raise GenotypeError(f"cannot build {name} ({c_in} -> {c_out} channels, stride {stride}): {exc}", path) from exc


def _probe(module: nn.Module, shapes: Sequence[Shape], path: str, what: str) -> Shape:
    """Run ``module`` once on zeros (eval mode, batch 2) and return the per-sample output shape."""
    was_training = module.training
    module.eval()
    # Where the module's tensors are: a provider's shared modules may already be on a GPU.
    device = next((t.device for t in (*module.parameters(), *module.buffers())), None)
    try:
        with torch.no_grad():
            out = module(*(torch.zeros(2, *s, device=device) for s in shapes))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        got = " and ".join(str(list(s)) for s in shapes)
        raise GenotypeError(f"{what} cannot take input of shape {got}: {first}", path) from None
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])


class OpUnit(nn.Module):
    """A plain op in the body: reads only the previous unit's output."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        return self.op(s1)


class Cell(nn.Module):
    """A cell DAG: inputs aligned to the cell width, each node the sum of its edges.

    The inputs are aligned as ``preprocess`` says (``bnas.ops.cell_inputs``); with
    ``residual`` the k-1 input is added to the output. The evaluation plan is compiled once
    from the networkx DAG (a topological order, as DARTS's ``_compile``), so ``forward`` is a
    short loop over it.
    """

    def __init__(
        self,
        spec: CellSpec,
        shape0: Shape,
        shape1: Shape,
        channels: int,
        stride: int,
        path: str,
        preprocess: Preprocess | None = None,
        provider: ModuleProvider | None = None,
        key: str = "",
    ):
        """``provider`` and ``key`` (the unit's key, e.g. ``s1.p0``): see ``ModuleProvider``.
        Edge keys add the node and edge slot, not the edge's source (any source has the
        cell's shape; edges from the inputs of a reduction cell differ by their stride)."""
        super().__init__()
        self.spec = spec
        self.graph = cell_graph(spec)
        preprocess = spec.preprocess or preprocess or Preprocess()
        target = (channels, *shape1[1:]) if len(shape1) == 3 else (channels,)
        # Align inputs to (channels, resolution of in1), as DARTS's preprocessing does.
        self.pre0 = (
            self._align(preprocess, shape0, target, f"{path} (aligning in0)", provider, f"{key}/pre0")
            if spec.inputs == 2
            else None
        )
        self.pre1 = self._align(preprocess, shape1, target, f"{path} (aligning in1)", provider, f"{key}/pre1")
        self.edges = nn.ModuleDict()
        for node, edges in spec.nodes.items():
            for i, edge in enumerate(edges):
                edge_stride = stride if edge.source in ("in0", "in1") else 1
                cell_path = f"cells.{spec.name}.nodes.{node}[{i}]"
                self.edges[f"{node}_{i}"] = _make_op(
                    edge.op, channels, channels, edge_stride, edge.options, cell_path, provider, f"{key}/{node}.e{i}"
                )
        plan, self.outputs = self._compile(self.graph)
        # A zero edge adds nothing to its node's sum: the node sums its other edges (bit for
        # bit the same, up to the sign of a zero), and the network runs no zeros and no adds
        # of them; its exports and packed programs do not either. A node of zero edges alone
        # keeps its first.
        self.plan = [
            (node, [edge for edge in edges if not isinstance(self.edges[edge[0]], Zero)] or edges[:1])
            for node, edges in plan
        ]
        self.order = [node for node, _ in self.plan]
        self.combine = spec.combine
        self.residual: nn.Module | None = None
        if spec.residual:
            width = channels * len(spec.output) if spec.combine == "concat" else channels
            out_shape = (width, *(-(-n // stride) for n in shape1[1:]))
            try:
                self.residual = _provided(
                    provider,
                    f"{key}/residual/{_shape_key(shape1)}>{_shape_key(out_shape)}",
                    lambda: make_residual(shape1, out_shape),
                )
            except ValueError as exc:
                raise GenotypeError(str(exc), f"{path} (cells.{spec.name}.output.residual)") from None

    @staticmethod
    def _compile(graph: nx.MultiDiGraph) -> tuple[list[tuple[str, list[tuple[str, str]]]], list[str]]:
        """``[(node, [(edge module key, source), ...]), ...]`` in topological order, and the
        nodes the output combines; edges in their YAML order (``slot``), so sums add up in
        the same order as the file lists them."""

        def inputs(node: str) -> list[tuple[int, str]]:
            return sorted((slot, source) for source, _, slot in graph.in_edges(node, data="slot"))

        plan = [
            (node, [(f"{node}_{slot}", source) for slot, source in inputs(node)])
            for node in nx.topological_sort(graph)
            if graph.nodes[node]["kind"] == "node"
        ]
        return plan, [source for _, source in inputs("out")]

    @staticmethod
    def _align(
        preprocess: Preprocess,
        shape: Shape,
        target: Shape,
        path: str,
        provider: ModuleProvider | None = None,
        key: str = "",
    ) -> nn.Module:
        if len(shape) != 3:
            raise GenotypeError(f"a cell needs a feature map (C, H, W) as input, got shape {list(shape)}", path)
        options: dict[str, Any] = {
            "reduce": preprocess.reduce,
            "activation": preprocess.activation,
            "bn_after": preprocess.bn_after,
        }
        if preprocess.binarize is not None:
            options["binarize"] = preprocess.binarize

        def make() -> nn.Module:
            return make_cell_input(preprocess.kind, shape, target, **options)

        try:
            if provider is not None:
                # The input's shape and the cell's width decide the module's weights.
                kind = _options_key({"kind": preprocess.kind, **options})
                return provider(f"{key}/{kind}/{_shape_key(shape)}>{target[0]}", make)
            return make()
        except (ValueError, TypeError) as exc:
            raise GenotypeError(f"preprocess: {preprocess.kind}: {exc}", path) from exc

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = {"in1": self.pre1(s1)}
        if self.pre0 is not None:
            states["in0"] = self.pre0(s0)
        for node, edges in self.plan:
            (key, source), *rest = edges
            total = self.edges[key](states[source])
            for key, source in rest:
                total = total + self.edges[key](states[source])
            states[node] = total
        outs = [states[n] for n in self.outputs]
        if self.combine == "concat":
            result = torch.cat(outs, dim=1)
        else:
            result = outs[0]
            for extra in outs[1:]:
                result = result + extra
        if self.residual is not None:
            result = result + self.residual(s1)
        return result


class BinaryNetwork(nn.Module):
    """A network built from a genotype: ``stem -> body units -> head``."""

    def __init__(self, genotype: Genotype, stem: nn.Sequential, body: nn.ModuleList, head: nn.Sequential):
        super().__init__()
        self.genotype = genotype
        self.stem = stem
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        s0 = s1 = s
        for unit in self.body:
            s0, s1 = s1, unit(s0, s1)
        return self.head(s1)


def _build_sequence(
    layers: Sequence[LayerSpec],
    shape: Shape,
    section: str,
    num_classes: int,
    budget: _MemoryBudget | None = None,
    provider: ModuleProvider | None = None,
) -> tuple[list[nn.Module], Shape]:
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        path = f"{section}[{i}]"
        for r in range(layer.repeat):
            c_in = shape[0]
            is_last = section == "head" and i == len(layers) - 1 and r == layer.repeat - 1
            c_out = layer.channels if layer.channels is not None else (num_classes if is_last else c_in)
            stride = layer.stride if r == 0 else 1
            op = _make_op(layer.op or "", c_in, c_out, stride, layer.options, path, provider, f"{section}{i}.r{r}")
            if budget is not None:
                budget.add(op, path)
            shape = _probe(op, [shape], path, layer.label)
            modules.append(op)
    return modules, shape


def _build(
    genotype: Genotype, budget: _MemoryBudget | None = None, provider: ModuleProvider | None = None
) -> BinaryNetwork:
    """The network; with ``provider`` (see ``ModuleProvider``) every module comes from it.

    Body keys start with the unit's stage (the number of stride-2 units up to and including
    it) and its position in that stage (``s1.p0``): a stage at a smaller depth uses a prefix
    of its deepest version's units, so their weights carry over between depths.
    """
    shape: Shape = tuple(genotype.input)
    stem_modules, shape = _build_sequence(genotype.stem, shape, "stem", genotype.num_classes, budget, provider)
    units: list[nn.Module] = []
    shape0 = shape1 = shape
    stage, position = 0, -1
    for i, layer in enumerate(genotype.body):
        path = f"body[{i}]"
        for r in range(layer.repeat):
            stride = layer.stride if r == 0 else 1
            stage, position = (stage + 1, 0) if stride != 1 else (stage, position + 1)
            key = f"s{stage}.p{position}"
            if layer.cell is not None:
                channels = layer.channels or shape1[0]
                unit: nn.Module = Cell(
                    genotype.cells[layer.cell],
                    shape0,
                    shape1,
                    channels,
                    stride,
                    path,
                    genotype.preprocess,
                    provider,
                    key,
                )
            else:
                c_out = layer.channels if layer.channels is not None else shape1[0]
                unit = OpUnit(
                    _make_op(layer.op or "", shape1[0], c_out, stride, layer.options, path, provider, f"{key}/op")
                )
            if budget is not None:
                budget.add(unit, path)
            new_shape = _probe(unit, [shape0, shape1], path, layer.label)
            units.append(unit)
            shape0, shape1 = shape1, new_shape
    head_modules, out_shape = _build_sequence(genotype.head, shape1, "head", genotype.num_classes, budget, provider)
    if out_shape != (genotype.num_classes,):
        raise GenotypeError(
            f"the network outputs shape {list(out_shape)} per sample, expected [{genotype.num_classes}] "
            "(num_classes); end the head with e.g. {op: global_avgpool} and {op: linear}",
            "head",
        )
    return BinaryNetwork(genotype, nn.Sequential(*stem_modules), nn.ModuleList(units), nn.Sequential(*head_modules))


# Sizing a network on the meta device costs about what building it costs, and the same
# architecture is sized again and again: a search trial builds its network for its metrics,
# then for its training. A size holds for the architecture (``canonical_hash``: ops, widths,
# input) with the registry's ops and the named binarizations as they were: any of them
# registered or replaced since, by any name, sizes it afresh. Each entry keeps those objects,
# so their ids stay theirs.
_SIZES: OrderedDict[tuple[str, tuple[int, ...], tuple[str, ...]], tuple[int | None, list[object]]] = OrderedDict()
_SIZES_KEPT = 256
_SIZES_LOCK = threading.Lock()


def estimate_memory(genotype: Genotype, cap: int | None = None) -> int | None:
    """Bytes of parameters and buffers of ``genotype``'s network, found by building it on the
    ``meta`` device (no memory is allocated); a ``LimitError`` as soon as the running total
    passes ``cap``. None when an op cannot be built on ``meta`` (then nothing is known)."""
    presets = binarize_config.BINARIZE_PRESETS  # looked up here: a catalog may swap the table
    made_of: list[object] = [*list_primitives(), *presets.values()]
    key = (genotype.canonical_hash(), tuple(id(obj) for obj in made_of), tuple(presets))
    with _SIZES_LOCK:
        known = _SIZES.get(key)
        # A size past ``cap`` is found again, so that the error names the layer that passes it.
        if known is not None and (known[0] is None or cap is None or known[0] <= cap):
            _SIZES.move_to_end(key)
            return known[0]
    total = _meta_size(genotype, cap)
    with _SIZES_LOCK:
        _SIZES[key] = (total, made_of)
        if len(_SIZES) > _SIZES_KEPT:
            _SIZES.popitem(last=False)
    return total


def _meta_size(genotype: Genotype, cap: int | None) -> int | None:
    budget = _MemoryBudget(
        cap if cap is not None else 2**63, from_env=bool(os.environ.get("BNAS_MAX_PARAM_BYTES", "").strip())
    )
    try:
        with torch.device("meta"):
            _build(genotype, budget)
    except LimitError:
        raise
    except (GenotypeError, RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        # A custom op that needs real data (``.item()``) cannot be sized this way; the real
        # build reports any genuine mistake in the genotype.
        log.debug("no meta-device size estimate for %s: %s", genotype.name, exc)
        return None
    return budget.total


def build(genotype: Genotype | Mapping[str, Any] | str | os.PathLike[str], binarize: bool = True) -> BinaryNetwork:
    """Build a ``torch.nn.Module`` from a genotype, a genotype mapping or a YAML path.

    ``binarize=False`` gives the full-precision twin (same topology, every quantizer off):
    the teacher for distillation and the float baseline for benchmarks.
    """
    if not isinstance(genotype, Genotype):
        genotype = load_genotype(genotype)
    try:
        check_ops(genotype)
        # Size the network before allocating it: a width or depth within the caps can still
        # add up to more parameters than the machine holds.
        estimate_memory(genotype, memory_limit())
        model = _build(genotype)
    except GenotypeError as exc:
        if genotype.source:
            exc.in_file(genotype.source)
        raise
    if not binarize:
        set_binarization(model, activations=False, weights=False)
    return model
