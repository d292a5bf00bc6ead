"""Which BatchNorm directly and only consumes which conv / linear, and the BN as an affine map.

A BN is folded into the layer before it only when that is provably the BN's sole input and the
layer's sole consumer: a torch.fx trace shows it, or, where tracing fails, a known structure
(``nn.Sequential``, ``ConvUnit`` in ``conv_bn_act`` order) does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.conv_unit import ConvUnit

__all__ = ["LAYER_TYPES", "bn_affine", "find_bn_folds"]

LAYER_TYPES = (nn.Conv2d, nn.Linear)  # BinaryConv2d / BinaryLinear are subclasses


class _Tracer(torch.fx.Tracer):
    """Stops at convs, linears and BNs, so they appear as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LAYER_TYPES + (_BatchNorm,)) or super().is_leaf_module(m, qualname)


def _foldable_bn(bn: nn.Module, layer: nn.Module) -> bool:
    """A BN in eval mode uses its running statistics; it folds when it has them and matches."""
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(layer, nn.Conv2d):
        return (
            isinstance(bn, nn.BatchNorm2d) and bn.num_features == layer.out_channels and layer.padding_mode == "zeros"
        )
    return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features


def _pairs_from_graph(root: nn.Module, graph: torch.fx.Graph) -> dict[str, str]:
    modules = dict(root.named_modules())
    calls: dict[str, int] = {}
    attr_uses: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            attr_uses.append(str(node.target))
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        bn_path = str(node.target)  # a call_module target is the module's dotted path
        if node.op != "call_module" or not isinstance(modules.get(bn_path), _BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        layer_path = str(src.target)
        if src.op != "call_module" or not isinstance(modules.get(layer_path), LAYER_TYPES):
            continue
        # The layer's output goes nowhere else, and neither module is reused or read directly.
        if len(src.users) != 1 or calls[layer_path] != 1 or calls[bn_path] != 1:
            continue
        if any(a == t or a.startswith(t + ".") for a in attr_uses for t in (layer_path, bn_path)):
            continue
        if _foldable_bn(modules[bn_path], modules[layer_path]):
            pairs[layer_path] = bn_path
    return pairs


def _structural_pairs(module: nn.Module) -> dict[str, str] | None:
    """Pairs in modules whose dataflow is known without tracing, else None."""
    if type(module) is nn.Sequential:
        children = list(module.named_children())
        return {
            a: b
            for (a, ma), (b, mb) in itertools.pairwise(children)
            if isinstance(ma, LAYER_TYPES) and _foldable_bn(mb, ma)
        }
    if type(module) is ConvUnit and module.order == "conv_bn_act" and _foldable_bn(module.bn, module.conv):
        return {"conv": "bn"}  # forward: self.bn(self.conv(x)), the conv's output used once
    if (
        type(module) is ConvUnit
        and module.order == "bn_conv_bn_act"
        and module.bn_out is not None
        and _foldable_bn(module.bn_out, module.conv)
    ):
        return {"conv": "bn_out"}  # forward: self.bn_out(self.conv(self.bn(x)))
    return None


def _prefixed(prefix: str, pairs: Mapping[str, str]) -> dict[str, str]:
    return {f"{prefix}{a}": f"{prefix}{b}" for a, b in pairs.items()}


def find_bn_folds(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """``{layer path: BN path}`` for every conv / linear whose output only a BN consumes.

    The whole model is traced with torch.fx when possible; a module that cannot be traced is
    searched part by part, using the known structures where tracing fails."""
    try:
        graph = _Tracer().trace(model)
    except (torch.fx.proxy.TraceError, TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
        graph = None
    if graph is not None:
        return _prefixed(prefix, _pairs_from_graph(model, graph))
    pairs = _prefixed(prefix, _structural_pairs(model) or {})
    for name, child in model.named_children():
        if not isinstance(child, LAYER_TYPES + (_BatchNorm,)):
            pairs.update(find_bn_folds(child, f"{prefix}{name}."))
    return pairs


def bn_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """BN in eval mode as ``y * s + t`` per channel (float64 for the fold). Only for a BN with
    running statistics (``find_bn_folds`` pairs no other)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    s = gamma * inv
    return s, beta - bn.running_mean.double() * s
