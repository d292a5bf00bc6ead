"""Which of a plan's PyTorch ops the C++ runner makes too, and with which arguments.

Between its kernel calls, a packed cell network runs PyTorch's own ops: BatchNorm in
inference (a cell input's alignment, an edge's ``bn -> conv``), the sums and concatenations of
a cell's nodes, the pad and slice of a factorized reduce, pools, activations (ReActNet's
RPReLU too), flatten and dropout (the identity in eval). In
the Python program each is a module or function call of 5-15 us on the small maps of a cell
network, several times the op itself. :func:`torch_op` describes such a plan node as a
``torch.<op>`` kind of the extension's ``ProgramRunner`` (``csrc/program_torch_ops.h``), which
calls the same ATen function with the arguments the module or function passes, so the values
are the same bit for bit. Any other node (a constant operand, an argument form the runner does
not take, a module in training mode) gets None, and the program stays in Python.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..ops.common import RPReLU

__all__ = ["TorchOp", "torch_op"]


@dataclass(frozen=True)
class TorchOp:
    """A plan node as the runner's call: ``kind`` (``torch.<op>``), the slots of its tensor
    inputs, the arguments after them, and the ``(module, attribute)`` pairs whose objects the
    call holds (its weights, and the flags it was bound for), which must stay the module's."""

    kind: str
    slots: list[int]
    args: tuple[Any, ...] = ()
    holds: list[tuple[nn.Module, str]] = field(default_factory=list)


def torch_op(gm: torch.fx.GraphModule, node: torch.fx.Node, slot_of: dict[torch.fx.Node, int]) -> TorchOp | None:
    """``node`` of plan ``gm`` as a call of the runner, or None where it has none."""
    if node.op == "call_module":
        args = node.args
        if len(args) != 1 or not isinstance(args[0], torch.fx.Node) or node.kwargs:
            return None
        return _module_op(gm.get_submodule(str(node.target)), slot_of[args[0]])
    if node.op == "call_function":
        return _function_op(node, slot_of)
    return None


def _pair(value: Any) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


def _module_op(module: nn.Module, x: int) -> TorchOp | None:
    kind = type(module)  # the exact class: a subclass may compute something else
    if kind is nn.BatchNorm2d:
        bn = cast(nn.BatchNorm2d, module)
        if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return None  # it would normalize by the batch's statistics
        momentum = 0.0 if bn.momentum is None else bn.momentum  # as the module passes it (unused in eval)
        statistics = (bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)
        holds = [(module, name) for name in ("weight", "bias", "running_mean", "running_var", "training", "eps")]
        return TorchOp("torch.batch_norm", [x], (*statistics, torch.backends.cudnn.enabled), holds)
    if kind is nn.ReLU:
        return TorchOp("torch.relu", [x], (cast(nn.ReLU, module).inplace,), [(module, "inplace")])
    if kind is nn.Hardtanh:
        hardtanh = cast(nn.Hardtanh, module)
        args = (float(hardtanh.min_val), float(hardtanh.max_val), hardtanh.inplace)
        return TorchOp("torch.hardtanh", [x], args, [(module, name) for name in ("min_val", "max_val", "inplace")])
    if kind is nn.Dropout:
        if module.training:
            return None  # it would drop
        dropout = cast(nn.Dropout, module)
        return TorchOp("torch.dropout", [x], (float(dropout.p), dropout.inplace), [(module, "training")])
    if kind is nn.PReLU:
        return TorchOp("torch.prelu", [x], (cast(nn.PReLU, module).weight,), [(module, "weight")])
    if kind is RPReLU:
        rprelu = cast(RPReLU, module)
        names = ("shift_in", "slope", "shift_out")
        return TorchOp("torch.rprelu", [x], tuple(getattr(rprelu, n) for n in names), [(module, n) for n in names])
    if kind is nn.AvgPool2d:
        avg = cast(nn.AvgPool2d, module)
        geometry = (_pair(avg.kernel_size), _pair(avg.stride), _pair(avg.padding))
        return TorchOp("torch.avg_pool2d", [x], (*geometry, avg.ceil_mode, avg.count_include_pad, avg.divisor_override))
    if kind is nn.MaxPool2d:
        pool = cast(nn.MaxPool2d, module)
        if pool.return_indices:
            return None
        window = (_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation))
        return TorchOp("torch.max_pool2d", [x], (*window, pool.ceil_mode))
    if kind is nn.Flatten:
        flatten = cast(nn.Flatten, module)
        return TorchOp("torch.flatten", [x], (flatten.start_dim, flatten.end_dim))
    return None


def _function_op(node: torch.fx.Node, slot_of: dict[torch.fx.Node, int]) -> TorchOp | None:
    target, args, kwargs = node.target, node.args, node.kwargs
    if target in (operator.add, torch.add):
        if len(args) == 2 and not kwargs and all(isinstance(a, torch.fx.Node) for a in args):
            return TorchOp("torch.add", [slot_of[cast(torch.fx.Node, a)] for a in args])
        return None
    if target is torch.cat:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        extra = set(kwargs) - {"tensors", "dim"}
        if (
            extra
            or not isinstance(tensors, (list, tuple))
            or not tensors
            or not all(isinstance(t, torch.fx.Node) for t in tensors)
            or not isinstance(dim, int)
        ):
            return None
        return TorchOp("torch.cat", [slot_of[cast(torch.fx.Node, t)] for t in tensors], (dim,))
    if target is F.pad:
        return _pad_op(args, kwargs, slot_of)
    if target is operator.getitem:
        return _slice_op(args, slot_of)
    if getattr(target, "__name__", None) == "_to_channels_last" and len(args) == 1 and not kwargs:
        x = args[0]
        return TorchOp("torch.channels_last", [slot_of[x]]) if isinstance(x, torch.fx.Node) else None
    return None


def _pad_op(args: tuple[Any, ...], kwargs: dict[str, Any], slot_of: dict[torch.fx.Node, int]) -> TorchOp | None:
    names = ("input", "pad", "mode", "value")
    if len(args) > len(names) or set(kwargs) - set(names[len(args) :]):
        return None
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    x, pad, mode, value = given.get("input"), given.get("pad"), given.get("mode", "constant"), given.get("value")
    if (
        not isinstance(x, torch.fx.Node)
        or not isinstance(pad, (list, tuple))
        or not all(isinstance(p, int) for p in pad)
        or not isinstance(mode, str)
        or not (value is None or isinstance(value, (int, float)))
    ):
        return None
    return TorchOp("torch.pad", [slot_of[x]], (list(pad), mode, None if value is None else float(value)))


def _slice_op(args: tuple[Any, ...], slot_of: dict[torch.fx.Node, int]) -> TorchOp | None:
    """``x[a:b, c:d, ...]``: plain slices of the leading dimensions (the factorized reduce's
    shifted path), as one ``at::slice`` per dimension."""
    if len(args) != 2 or not isinstance(args[0], torch.fx.Node):
        return None
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    cuts = []
    for dim, cut in enumerate(index):
        if not isinstance(cut, slice) or not all(v is None or type(v) is int for v in (cut.start, cut.stop, cut.step)):
            return None
        step = 1 if cut.step is None else cut.step
        if step <= 0:
            return None
        cuts.append((dim, cut.start, cut.stop, step))
    return TorchOp("torch.slice", [slot_of[args[0]]], (cuts,))
