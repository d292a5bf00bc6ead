"""A larq-style model summary: binary / real parameters, BOPs, FLOPs, OPs and model size.

Conventions (stated in the printed summary too):
* BOPs: multiply-accumulates where both operands are binary (binary activations and weights).
* FLOPs: real-valued multiply-accumulates of conv and linear layers (a binary-weight layer on
  real inputs, such as a first layer, counts here).
* OPs = BOPs / 64 + FLOPs (the Bi-Real Net convention).
* Size: binary weights at 1 bit, every other parameter and buffer (BatchNorm statistics) at
  32 bits; the compression ratio is against the same model stored in float32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .binarize import BinaryLayer, binary_layers

__all__ = ["LayerStats", "Summary", "summarize", "OPS_CONVENTION"]

OPS_CONVENTION = "OPs = BOPs/64 + FLOPs (Bi-Real Net); FLOPs and BOPs count multiply-accumulates"


@dataclass
class LayerStats:
    name: str
    kind: str
    output_shape: list[int]
    params_binary: int = 0
    params_real: int = 0
    bops: int = 0
    flops: int = 0


@dataclass
class Summary:
    layers: list[LayerStats] = field(default_factory=list)
    input_shape: list[int] = field(default_factory=list)
    buffers_real: int = 0

    @property
    def params_binary(self) -> int:
        return sum(layer.params_binary for layer in self.layers)

    @property
    def params_real(self) -> int:
        return sum(layer.params_real for layer in self.layers)

    @property
    def bops(self) -> int:
        return sum(layer.bops for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def ops(self) -> float:
        return self.bops / 64 + self.flops

    @property
    def size_bytes(self) -> float:
        return self.params_binary / 8 + (self.params_real + self.buffers_real) * 4

    @property
    def float32_size_bytes(self) -> int:
        return (self.params_binary + self.params_real + self.buffers_real) * 4

    @property
    def compression(self) -> float:
        return self.float32_size_bytes / self.size_bytes if self.size_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": self.input_shape,
            "params_real": self.params_real,
            "params_binary": self.params_binary,
            "buffers_real": self.buffers_real,
            "bops": self.bops,
            "flops": self.flops,
            "ops": self.ops,
            "size_bytes": self.size_bytes,
            "float32_size_bytes": self.float32_size_bytes,
            "compression": self.compression,
            "convention": OPS_CONVENTION,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        header = ("layer", "type", "output", "bin params", "real params", "BOPs", "FLOPs")
        rows = [
            (
                layer.name,
                layer.kind,
                "x".join(map(str, layer.output_shape)),
                f"{layer.params_binary:,}",
                f"{layer.params_real:,}",
                f"{layer.bops:,}",
                f"{layer.flops:,}",
            )
            for layer in self.layers
        ]
        rows.append(
            ("total", "", "", f"{self.params_binary:,}", f"{self.params_real:,}", f"{self.bops:,}", f"{self.flops:,}")
        )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )

        rule = "-" * len(fmt(header))
        lines = [fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1]), ""]
        lines += [
            f"OPs: {self.ops:,.0f}   ({OPS_CONVENTION})",
            f"BN statistics and other buffers: {self.buffers_real:,} real values",
            f"model size: {_human(self.size_bytes)} (binary weights at 1 bit, the rest at 32 bits); "
            f"float32: {_human(self.float32_size_bytes)}; compression {self.compression:.1f}x",
        ]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n} B"


def _counted_leaf(module: nn.Module) -> bool:
    """Modules counted as one row: binary layers (with their quantizers) and parameter leaves."""
    if isinstance(module, BinaryLayer):
        return True
    if any(True for _ in module.children()):
        return False
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    per_sample = out[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


@torch.no_grad()
def summarize(model: nn.Module, input_shape: Sequence[int]) -> Summary:
    """Count parameters, MACs and size per layer by running one sample through ``model``."""
    summary = Summary(input_shape=list(input_shape))
    stats: dict[int, LayerStats] = {}
    hooks = []
    names = {id(m): n for n, m in model.named_modules()}
    inside_binary: set[int] = set()
    for layer in binary_layers(model):
        inside_binary.update(id(m) for m in layer.modules() if m is not layer)

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        entry = stats[id(module)]
        entry.output_shape = list(out.shape[1:])
        macs = _macs(module, out)
        if isinstance(module, BinaryLayer) and module.fully_binary:
            entry.bops += macs
        else:
            entry.flops += macs

    for module in model.modules():
        if id(module) in inside_binary or not _counted_leaf(module):
            continue
        entry = LayerStats(name=names.get(id(module), ""), kind=type(module).__name__, output_shape=[])
        one_bit_weight = isinstance(module, BinaryLayer) and module.binarizes_weights
        for pname, p in module.named_parameters():
            if one_bit_weight and pname == "weight":
                entry.params_binary += p.numel()
            else:
                entry.params_real += p.numel()
        summary.buffers_real += sum(b.numel() for n, b in module.named_buffers() if b.is_floating_point())
        stats[id(module)] = entry
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # Modules that never ran (e.g. an unused branch) keep their parameter counts.
    summary.layers = list(stats.values())
    return summary
