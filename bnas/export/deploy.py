"""What the LCE and ONNX exports share: the trained network read from a checkpoint, its
deployable twin, one torch.fx trace of that twin, and messages that name a genotype's op.

The deployable twin is :func:`~bnas.export.freeze_model`'s float twin (BatchNorms folded, the
float module of the genotype elsewhere) with every fully binary layer split back into what
an engine with binary kernels computes: ``sign(x - threshold)``, a convolution (or linear map)
with +-1 weights, then a per-output-channel ``* scale + bias`` that holds alpha and the folded
BN (:class:`ScaledSignConv2d`, :class:`ScaledSignLinear`). The +-1 sums are integers, exact
in float32, as in the packed kernels; the twin is the network both exports write, layer by
layer, and the PyTorch reference ``--verify`` compares them with is the trained network itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..binarize import sign
from ..genotype import Genotype
from .convert import freeze_model, load_trained, split_signs
from .format import ExportError, set_module
from .layers import SignConv2d, SignLinear, _as_channel_view

__all__ = [
    "ScaledSignConv2d",
    "ScaledSignLinear",
    "deploy_twin",
    "describe",
    "load_trained",
    "require",
    "trace_twin",
]


def require(module: str, extra: str, fmt: str) -> ModuleType:
    """Import an optional dependency of one export format, or one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(
            f"bnas export --format {fmt} needs the [{extra}] extra ({module} is not installed): "
            f"pip install 'bnas[{extra}]'"
        ) from exc


# --------------------------------------------------------------------------------------
# Binary layers as sign -> +-1 conv -> scale and bias
# --------------------------------------------------------------------------------------
class ScaledSignConv2d(nn.Module):
    """``conv2d(sign(x - threshold), signs) * scale + bias``; ``signs`` holds +-1."""

    signs: Tensor
    scale: Tensor
    bias: Tensor
    threshold: Tensor | None

    def __init__(self, conv: SignConv2d, signs: Tensor, scale: Tensor):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size: tuple[int, ...] = tuple(conv.kernel_size)
        self.stride: tuple[int, ...] = tuple(conv.stride)
        self.padding: tuple[int, ...] = tuple(int(p) for p in conv.padding)  # SignConv2d: integer padding
        self.dilation: tuple[int, ...] = tuple(conv.dilation)
        self.groups = conv.groups
        self.register_buffer("signs", signs)
        self.register_buffer("scale", scale)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.detach().clone())
        threshold = conv.threshold
        self.register_buffer("threshold", None if threshold is None else threshold.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - _as_channel_view(self.threshold, x.dim())
        out = F.conv2d(sign(x), self.signs, None, self.stride, self.padding, self.dilation, self.groups)
        return out * self.scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ScaledSignLinear(nn.Module):
    """``linear(sign(x - threshold), signs) * scale + bias``; ``signs`` holds +-1."""

    signs: Tensor
    scale: Tensor
    bias: Tensor
    threshold: Tensor | None

    def __init__(self, linear: SignLinear, signs: Tensor, scale: Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("signs", signs)
        self.register_buffer("scale", scale)
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", bias.detach().clone())
        threshold = linear.threshold
        self.register_buffer("threshold", None if threshold is None else threshold.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - self.threshold
        return F.linear(sign(x), self.signs) * self.scale + self.bias


def _split(weight: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """``(signs, scale)`` with ``signs * scale == weight`` exactly: a binarized layer's float
    weights are one magnitude per output channel (alpha times the folded BN scale)."""
    split = split_signs(weight)
    if split is None:
        raise ExportError(
            f"layer {path}: binarized weights are not one magnitude per output channel; cannot split them"
        )
    return split


def deploy_twin(model: nn.Module) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The twin of a trained ``model`` (left unchanged) that the exports write, and the layer
    table of :func:`~bnas.export.freeze_model` (which records each layer's quantizer names)."""
    frozen = freeze_model(model)
    net = frozen.net
    for entry in frozen.layers:
        if entry["kind"] not in ("sign_conv2d", "sign_linear") or entry.get("weight", "none") == "none":
            continue
        layer = net.get_submodule(entry["path"])
        signs, scale = _split(cast(Tensor, layer.weight), entry["path"])
        if isinstance(layer, SignConv2d):
            set_module(net, entry["path"], ScaledSignConv2d(layer, signs, scale))
        elif isinstance(layer, SignLinear):
            set_module(net, entry["path"], ScaledSignLinear(layer, signs, scale))
    net.genotype = getattr(model, "genotype", None)  # type: ignore[assignment]  # describe() names ops by it
    return net.eval(), frozen.layers


# --------------------------------------------------------------------------------------
# One trace of the twin, and where a node came from
# --------------------------------------------------------------------------------------
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    ScaledSignConv2d,
    ScaledSignLinear,
    _BatchNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.PReLU,
    nn.Hardtanh,
)


class _Tracer(torch.fx.Tracer):
    """Stops at the layers the exporters map one to one; remembers the innermost module a
    failing trace was in, so the error can name the op."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def trace_twin(net: nn.Module, fmt: str, leaves: tuple[type[nn.Module], ...] = LEAF_TYPES) -> torch.fx.GraphModule:
    """The twin as a torch.fx graph, or one line naming the op whose forward cannot be traced
    (it depends on the input's shape or values in Python)."""
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(net)
    except Exception as exc:
        where = describe(net, tracer.failed_in or "")
        raise ExportError(
            f"bnas export --format {fmt}: {where} computes in Python on its input's shape or values, "
            f"which an exported graph cannot hold ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "replace that op in the genotype"
        ) from exc
    return torch.fx.GraphModule(net, graph)


def describe(net: nn.Module, path: str) -> str:
    """``body[2] (op bireal_block), module body.2.op.conv (ScaledSignConv2d)``: the genotype
    entry a module path belongs to, where the network was built from a genotype."""
    try:
        module_type = type(net.get_submodule(path)).__name__ if path else type(net).__name__
    except AttributeError:
        module_type = "?"
    where = f"module {path or '(network)'} ({module_type})"
    genotype = getattr(net, "genotype", None)
    parts = path.split(".")
    if not isinstance(genotype, Genotype) or len(parts) < 2 or parts[0] not in ("stem", "body", "head"):
        return where
    if not parts[1].isdigit():
        return where
    layers = getattr(genotype, parts[0])
    expanded = [(i, layer) for i, layer in enumerate(layers) for _ in range(layer.repeat)]
    k = int(parts[1])
    if k >= len(expanded):
        return where
    i, layer = expanded[k]
    if layer.op:
        label = f"{parts[0]}[{i}] (op {layer.op})"
    else:
        label = f"{parts[0]}[{i}] (cell {layer.cell})"
        if len(parts) > 3 and parts[2] == "edges":
            node, _, slot = parts[3].rpartition("_")
            cell = genotype.cells.get(layer.cell or "")
            edges: tuple[Any, ...] = tuple(cell.nodes.get(node, ())) if cell is not None else ()
            op = edges[int(slot)].op if slot.isdigit() and int(slot) < len(edges) else "?"
            label += f", node {node} edge {slot} (op {op})"
    return f"{label}, {where}"
