"""Trained binary network -> packed inference network that runs on the XNOR-popcount kernels.

``pack_model(model)`` converts an in-memory network; ``bnas export GENOTYPE CHECKPOINT --out
model.bnas`` does the same for a checkpoint and writes a file; ``load_packed(path)`` reads it
back as an inference module.

What becomes what
-----------------
* A ``BinaryConv2d`` / ``BinaryLinear`` whose activations AND weights are binarized becomes a
  packed layer: weights packed to 1 bit (``bnas.kernels.pack_weights``), the input packed on
  the fly (``x - threshold`` first for ``rsign``), and a per-output-channel epilogue
  ``out = dot * scale + bias`` where ``scale`` is the weight binarizer's alpha (1 for
  ``sign``) and ``bias`` the conv bias.
* A BatchNorm that provably consumes only that layer's output (a torch.fx trace shows the
  layer's single user is the BN; where tracing fails, the known structures ``nn.Sequential``
  and ``ConvUnit`` are used) is folded into the epilogue:
  ``scale = alpha * gamma / sqrt(var + eps)``, ``bias = (b - mean) * gamma / sqrt(var + eps) + beta``,
  and replaced by the identity. A BN that cannot be proven to follow the layer directly (e.g.
  after a max-pool) stays in float. Real ``nn.Conv2d`` / ``nn.Linear`` layers directly followed
  by a BN get the same fold into their float weights.
* A binary layer with real activations (the quantizer is ``none`` or switched off) keeps a
  float conv with the materialised weights ``alpha * sign(W)``; one with binary activations
  and real weights keeps a float conv on ``sign(x - threshold)``.
* Everything else (stem, head, shortcuts, pools, unfolded BNs) is the float module of the
  genotype, unchanged.

File format (``.bnas``, version 1)
----------------------------------
A safetensors file (https://github.com/huggingface/safetensors): a JSON header, then raw
little-endian tensor data; reading it executes no code. Tensors: the inference network's
``state_dict`` (dotted module paths, e.g. ``body.0.op.conv.weight_packed``). Metadata
(string -> string) in the header:

* ``format``: ``"bnas-packed"``;
* ``version``: ``"1"`` (a reader refuses other versions);
* ``genotype``: the genotype YAML; the float skeleton is rebuilt from it with ``bnas.build``;
* ``layers``: a JSON list, one object per replaced module, with ``path`` (dotted module path),
  ``kind`` and the kind's arguments:

  - ``packed_conv2d``: ``in_channels, out_channels, kernel_size, stride, padding, dilation,
    groups, threshold`` (bool), ``folded_bn`` (the BN's path or null), ``activation``,
    ``weight`` (the binarizer names, informative). Tensors: ``weight_packed`` int32
    ``(K, kh, kw, ceil(C/groups/32))`` (bit j of word i = input channel 32*i + j, 1 = +1,
    padding bits 0: the packed format of ``bnas.kernels``), ``scale`` and ``bias`` float32
    ``(K,)``, ``threshold`` float32 ``(C,)`` when ``threshold`` is true;
  - ``packed_linear``: ``in_features, out_features, threshold, folded_bn, activation, weight``;
    ``weight_packed`` int32 ``(K, ceil(F/32))``, ``scale``, ``bias``, optional ``threshold``;
  - ``conv2d`` / ``linear``: a float ``nn.Conv2d`` / ``nn.Linear`` (its usual arguments, plus
    ``bias`` true and ``folded_bn``); tensors ``weight``, ``bias``;
  - ``sign_conv2d`` / ``sign_linear``: the same, applied to ``sign(x - threshold)``;
  - ``identity``: a folded BatchNorm (no tensors).

``bnas_version`` and ``torch_version`` record the writer.

``load_packed`` trusts nothing in the file: the genotype is read by the safe YAML reader, every
layer-table entry must name a layer of that genotype with the same arguments, and every tensor
must have the shape and the dtype its layer implies (packed int32 words re-saved as float32
would otherwise be converted silently, and rounded). Each failure is one line naming the file.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .atomic import atomic_path, check_writable_file
from .binarize import BinaryConv2d, BinaryLinear, sign
from .errors import BnasError
from .genotype import Genotype, genotype_from_dict, load_genotype
from .train import load_checkpoint
from .yaml_io import parse_yaml_mapping

__all__ = [
    "FORMAT",
    "VERSION",
    "ExportError",
    "PackedConv2d",
    "PackedLinear",
    "SignConv2d",
    "SignLinear",
    "PackedNetwork",
    "pack_model",
    "freeze_model",
    "save_packed",
    "load_packed",
    "export",
    "add_export_arguments",
    "run_export",
]

FORMAT = "bnas-packed"
VERSION = "1"


class ExportError(BnasError):
    """A checkpoint, genotype or packed file that cannot be exported or loaded."""


# --------------------------------------------------------------------------------------
# Inference layers
# --------------------------------------------------------------------------------------
def _pack_input(x: Tensor, groups: int) -> Tensor:
    """Signs of float NCHW ``x`` packed NHWC. A channels_last tensor (what the CPU kernel
    writes) is already NHWC in memory: packing its rows of C/groups channels gives the same
    words without the NCHW copy the generic packer would make."""
    from .kernels import pack_signs

    if x.dim() == 4 and x.is_cpu and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w * groups, c // groups)
        return pack_signs(rows).reshape(n, h, w, -1)
    return pack_signs(x, groups)


def _as_channel_view(v: Tensor, dims: int) -> Tensor:
    return v.view((1, -1) + (1,) * (dims - 2))


class PackedConv2d(nn.Module):
    """``conv2d(sign(x - threshold), sign(W)) * scale + bias`` by XNOR-popcount."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int, threshold: bool):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        words = -(-(in_channels // groups) // 32)
        self.register_buffer("weight_packed", torch.zeros(out_channels, *self.kernel_size, words, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels))
        self.register_buffer("threshold", torch.zeros(in_channels) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        from .kernels import xnor_conv2d_packed

        if self.threshold is not None:
            x = x - _as_channel_view(self.threshold.to(x.dtype), x.dim())
        out = xnor_conv2d_packed(_pack_input(x, self.groups), self.weight_packed, self.in_channels, self.kernel_size,
                                 self.stride, self.padding, self.dilation, self.groups, self.scale, self.bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"threshold={self.threshold is not None}")


class PackedLinear(nn.Module):
    """``linear(sign(x - threshold), sign(W)) * scale + bias`` by XNOR-popcount."""

    def __init__(self, in_features: int, out_features: int, threshold: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_packed", torch.zeros(out_features, -(-in_features // 32), dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))
        self.register_buffer("threshold", torch.zeros(in_features) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        from .kernels import pack_signs, xnor_linear_packed

        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise RuntimeError(f"packed linear expects (N, {self.in_features}) inputs, got {tuple(x.shape)}")
        if self.threshold is not None:
            x = x - self.threshold.to(x.dtype)
        out = xnor_linear_packed(pack_signs(x), self.weight_packed, self.in_features, self.scale, self.bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, threshold={self.threshold is not None}"


class SignConv2d(nn.Conv2d):
    """A float conv on ``sign(x - threshold)``: binary activations, real weights."""

    def __init__(self, *args: Any, threshold: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.in_channels) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - _as_channel_view(self.threshold.to(x.dtype), x.dim())
        return super().forward(sign(x))


class SignLinear(nn.Linear):
    """A float linear layer on ``sign(x - threshold)``: binary activations, real weights."""

    def __init__(self, *args: Any, threshold: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.in_features) if threshold else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x - self.threshold.to(x.dtype)
        return super().forward(sign(x))


def _conv_args(m: nn.Conv2d) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation), "groups": m.groups}


def _make_layer(entry: Mapping[str, Any]) -> nn.Module:
    """An empty module of the kind a layer-table entry describes (its tensors come later)."""
    kind = entry["kind"]
    if kind == "identity":
        return nn.Identity()
    if kind == "packed_conv2d":
        return PackedConv2d(entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]),
                            tuple(entry["stride"]), tuple(entry["padding"]), tuple(entry["dilation"]),
                            entry["groups"], bool(entry["threshold"]))
    if kind == "packed_linear":
        return PackedLinear(entry["in_features"], entry["out_features"], bool(entry["threshold"]))
    if kind in ("conv2d", "sign_conv2d"):
        args = dict(in_channels=entry["in_channels"], out_channels=entry["out_channels"],
                    kernel_size=tuple(entry["kernel_size"]), stride=tuple(entry["stride"]),
                    padding=tuple(entry["padding"]), dilation=tuple(entry["dilation"]), groups=entry["groups"],
                    bias=bool(entry["bias"]))
        return nn.Conv2d(**args) if kind == "conv2d" else SignConv2d(**args, threshold=bool(entry["threshold"]))
    if kind in ("linear", "sign_linear"):
        args = dict(in_features=entry["in_features"], out_features=entry["out_features"], bias=bool(entry["bias"]))
        return nn.Linear(**args) if kind == "linear" else SignLinear(**args, threshold=bool(entry["threshold"]))
    raise ExportError(f"unknown layer kind {kind!r} in the layer table; this bnas reads {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------
# Which BatchNorm directly and only consumes which layer
# --------------------------------------------------------------------------------------
_LAYER_TYPES = (nn.Conv2d, nn.Linear)  # BinaryConv2d / BinaryLinear are subclasses


class _Tracer(torch.fx.Tracer):
    """Stops at convs, linears and BNs, so they appear as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LAYER_TYPES + (_BatchNorm,)) or super().is_leaf_module(m, qualname)


def _foldable_bn(bn: nn.Module, layer: nn.Module) -> bool:
    """A BN in eval mode uses its running statistics; it folds when it has them and matches."""
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(layer, nn.Conv2d):
        return isinstance(bn, nn.BatchNorm2d) and bn.num_features == layer.out_channels and layer.padding_mode == "zeros"
    return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features


def _pairs_from_graph(root: nn.Module, graph: torch.fx.Graph) -> dict[str, str]:
    modules = dict(root.named_modules())
    calls: dict[str, int] = {}
    attr_uses: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attr_uses.append(str(node.target))
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(modules.get(src.target), _LAYER_TYPES):
            continue
        # The layer's output goes nowhere else, and neither module is reused or read directly.
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if any(a == t or a.startswith(t + ".") for a in attr_uses for t in (src.target, node.target)):
            continue
        if _foldable_bn(modules[node.target], modules[src.target]):
            pairs[src.target] = node.target
    return pairs


def _structural_pairs(module: nn.Module) -> dict[str, str] | None:
    """Pairs in modules whose dataflow is known without tracing, else None."""
    from .ops.conv_unit import ConvUnit

    if type(module) is nn.Sequential:
        children = list(module.named_children())
        return {a: b for (a, ma), (b, mb) in zip(children, children[1:])
                if isinstance(ma, _LAYER_TYPES) and _foldable_bn(mb, ma)}
    if type(module) is ConvUnit and module.order == "conv_bn_act" and _foldable_bn(module.bn, module.conv):
        return {"conv": "bn"}  # forward: self.bn(self.conv(x)), the conv's output used once
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
        if not isinstance(child, _LAYER_TYPES + (_BatchNorm,)):
            pairs.update(find_bn_folds(child, f"{prefix}{name}."))
    return pairs


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------
def _bn_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """BN in eval mode as ``y * s + t`` per channel (float64 for the fold)."""
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    s = gamma * inv
    return s, beta - bn.running_mean.double() * s


def _alpha(layer: BinaryConv2d | BinaryLinear, out_features: int) -> Tensor:
    a = layer.kernel_quantizer.scale(layer.weight.detach())
    if a is None:
        return torch.ones(out_features, dtype=torch.float64)
    return a.detach().double().reshape(-1).expand(out_features).clone()


def _binary_flags(layer: nn.Module) -> tuple[bool, bool]:
    """(activations binarized, weights binarized) as the layer computes in eval mode."""
    if not isinstance(layer, (BinaryConv2d, BinaryLinear)):
        return False, False
    acts = layer.input_quantizer.enabled and layer.input_quantizer.name != "none"
    weights = layer.kernel_quantizer.enabled and layer.kernel_quantizer.name != "none"
    return acts, weights


def _convert(layer: nn.Module, bn: _BatchNorm | None, path: str, bn_path: str | None,
             packed: bool = True) -> tuple[nn.Module, dict[str, Any]] | None:
    """The inference module for one conv / linear (with its BN folded), and its table entry;
    None when a plain float layer has no BN to fold (it is kept as it is). ``packed=False``
    keeps binary layers as float convs on signs (the float twin)."""
    is_conv = isinstance(layer, nn.Conv2d)
    k = layer.out_channels if is_conv else layer.out_features
    acts, weights = _binary_flags(layer)
    if not (acts or weights or isinstance(layer, (BinaryConv2d, BinaryLinear))) and bn is None:
        return None
    s, t = _bn_affine(bn) if bn is not None else (torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(k, dtype=torch.float64)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    threshold = acts and layer.input_quantizer.name == "rsign"
    entry: dict[str, Any] = {"path": path, "folded_bn": bn_path}
    if isinstance(layer, (BinaryConv2d, BinaryLinear)):
        entry.update(activation=layer.input_quantizer.name if acts else "none",
                     weight=layer.kernel_quantizer.name if weights else "none")
    args = _conv_args(layer) if is_conv else {"in_features": layer.in_features, "out_features": k}
    entry.update(args)
    if acts and weights and packed:
        entry.update(kind="packed_conv2d" if is_conv else "packed_linear", threshold=threshold)
        new = _make_layer(entry)
        from .kernels import pack_weights

        with torch.no_grad():
            new.weight_packed.copy_(pack_weights(layer.weight.detach().float().cpu(), layer.groups if is_conv else 1))
            new.scale.copy_((_alpha(layer, k) * s).float())
            new.bias.copy_((b * s + t).float())
            if threshold:
                new.threshold.copy_(layer.input_quantizer.threshold.detach())
        return new, entry
    # A float layer: weights as the forward uses them, BN folded into them.
    with torch.no_grad():
        w = layer.binary_weight() if weights else layer.weight
        w = w.detach().double() * s.view(shape)
    kind = ("sign_conv2d" if acts else "conv2d") if is_conv else ("sign_linear" if acts else "linear")
    entry.update(kind=kind, bias=True, threshold=threshold)
    new = _make_layer(entry)
    with torch.no_grad():
        new.weight.copy_(w.float())
        new.bias.copy_((b * s + t).float())
        if threshold:
            new.threshold.copy_(layer.input_quantizer.threshold.detach())
    return new, entry


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class PackedNetwork(nn.Module):
    """An inference network whose binary layers run on the packed kernels.

    Always in eval mode (``train()`` keeps it there) and without gradients. ``genotype`` and
    ``layers`` (the layer table) describe it; ``save(path)`` writes the ``.bnas`` file.
    """

    def __init__(self, net: nn.Module, genotype: Genotype | None, layers: list[dict[str, Any]]):
        super().__init__()
        self.net = net
        self.genotype = genotype
        self.layers = layers
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "PackedNetwork":
        return super().train(False)  # BN statistics are folded; there is nothing to train

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.net(x)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_packed(self, path)


def _convert_in_place(net: nn.Module, packed: bool = True) -> list[dict[str, Any]]:
    folds = find_bn_folds(net)
    table: list[dict[str, Any]] = []
    for path, layer in list(net.named_modules()):
        if not isinstance(layer, _LAYER_TYPES):
            continue
        bn_path = folds.get(path)
        bn = net.get_submodule(bn_path) if bn_path else None
        converted = _convert(layer, bn, path, bn_path, packed)
        if converted is None:
            continue
        module, entry = converted
        _set_module(net, path, module)
        table.append(entry)
        if bn_path:
            _set_module(net, bn_path, nn.Identity())
            table.append({"path": bn_path, "kind": "identity"})
    return table


def pack_model(model: nn.Module) -> PackedNetwork:
    """Convert a trained network (left unchanged) into a packed inference network.

    The network is copied to the CPU in eval mode; binary layers become packed layers,
    BatchNorms that directly follow a conv are folded (see the module docstring).
    """
    net = copy.deepcopy(model).cpu().float().eval()
    table = _convert_in_place(net)
    return PackedNetwork(net, getattr(model, "genotype", None), table)


def freeze_model(model: nn.Module) -> PackedNetwork:
    """The float twin of :func:`pack_model`: the same BN folding and materialised weights,
    but binary layers stay float convs on ``sign(x)`` (a fair float baseline, and a way to
    check the packed kernels against float arithmetic on the same folded network)."""
    net = copy.deepcopy(model).cpu().float().eval()
    table = _convert_in_place(net, packed=False)
    return PackedNetwork(net, getattr(model, "genotype", None), table)


# --------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------
def save_packed(packed: PackedNetwork, path: str | os.PathLike[str]) -> Path:
    """Write ``packed`` to ``path`` (atomically, with the umask's mode) in the ``bnas-packed``
    format. A full disk or an unwritable folder is a one-line ``WriteError``; an existing
    file at ``path`` then stays as it was."""
    from safetensors.torch import save

    import bnas

    if packed.genotype is None:
        raise ExportError("the packed network has no genotype to store; pack a network built with bnas.build")
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in packed.net.state_dict().items()}
    metadata = {"format": FORMAT, "version": VERSION, "genotype": packed.genotype.to_yaml(),
                "layers": json.dumps(packed.layers), "bnas_version": bnas.__version__,
                "torch_version": torch.__version__}
    if path.is_dir():
        raise ExportError(f"{path} is an existing folder; the packed model is written to a file "
                          f"path, e.g. {path / 'model.bnas'}")
    # Serialised in memory (the packed model is small), so every failure of the disk is an
    # OSError that atomic_path turns into one line.
    blob = save(tensors, metadata=metadata)
    with atomic_path(path, "packed model") as tmp:
        tmp.write_bytes(blob)
    return path


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"no packed model at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: not a bnas packed model (not a safetensors file: {exc}); "
                          "write one with `bnas export`") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: a safetensors file but not a bnas packed model (format "
                          f"{meta.get('format')!r}, expected {FORMAT!r}); write one with `bnas export`")
    if meta.get("version") != VERSION:
        raise ExportError(f"{path}: bnas-packed version {meta.get('version')!r}; this bnas reads version {VERSION}, "
                          "upgrade bnas or export the model again")
    return meta


def load_packed(path: str | os.PathLike[str]) -> PackedNetwork:
    """Read a ``.bnas`` file written by ``bnas export`` / ``save_packed`` (no unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .builder import build

    path = Path(path)
    meta = _read_header(path)
    for key in ("genotype", "layers"):
        if not isinstance(meta.get(key), str):
            raise ExportError(f"{path}: damaged header (no {key!r} entry); export the model again")
    # The header is untrusted text: the genotype goes through the same safe YAML reader as a
    # genotype file (tags refused, one-line errors), the table through json and _check_entry.
    where = f"{path} (header: genotype)"
    genotype = genotype_from_dict(parse_yaml_mapping(meta["genotype"], where), where)
    try:
        table = json.loads(meta["layers"])
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise ExportError(f"{path}: damaged header (the layer table is not JSON: {reason}); "
                          "export the model again") from None
    if not isinstance(table, list):
        raise ExportError(f"{path}: damaged header (the layer table is a JSON {type(table).__name__}, "
                          "expected a list); export the model again")
    net = build(genotype).eval()
    for entry in table:
        _check_entry(net, entry, path, meta.get("bnas_version", "unknown"))
        _set_module(net, entry["path"], _make_layer(entry))
    left = [n for n, m in net.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    if left:
        raise ExportError(f"{path}: the layer table leaves binary layers unconverted ({', '.join(left[:3])}); "
                          "export the model again")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ExportError(f"{path}: the tensors cannot be read ({_first_line(exc)}); "
                          "export the model again") from None
    _load_state(net, state, f"{path}", exact_dtypes=True)
    return PackedNetwork(net.eval(), genotype, table)


_CONV_KINDS = ("packed_conv2d", "conv2d", "sign_conv2d")
_LINEAR_KINDS = ("packed_linear", "linear", "sign_linear")
KINDS = _CONV_KINDS + _LINEAR_KINDS + ("identity",)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, int, float, bool, str, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_entry(net: nn.Module, entry: Any, file: Path, writer: str) -> None:
    """One layer-table entry must name a layer of the genotype's network, of a kind this bnas
    knows, with the same arguments: so a damaged or hostile table can neither allocate
    tensors the genotype does not imply nor replace the wrong module."""
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("kind"), str)):
        raise ExportError(f"{file}: damaged layer table (entry {_short(entry)} is not an object with "
                          "'path' and 'kind' strings); export the model again")
    where, kind = entry["path"], entry["kind"]
    if kind not in KINDS:
        raise ExportError(f"{file}: unknown packed layer kind {_short(kind)} at layer {_short(where)}; this bnas "
                          f"reads {', '.join(KINDS)} (the file was written by bnas {writer}): "
                          "upgrade bnas or export the model again")
    try:
        target = net.get_submodule(where)
    except AttributeError:
        raise ExportError(f"{file}: the layer table names layer {_short(where)}, which the genotype in the header "
                          "does not have; export the model again") from None
    if kind == "identity":
        expected: dict[str, Any] = {}
        fits = isinstance(target, _BatchNorm)
    elif kind in _CONV_KINDS:
        fits = isinstance(target, nn.Conv2d)
        expected = _conv_args(target) if fits else {}
    else:
        fits = isinstance(target, nn.Linear)
        expected = {"in_features": target.in_features, "out_features": target.out_features} if fits else {}
    if not fits:
        raise ExportError(f"{file}: the layer table makes {_short(where)} a {kind}, but in the genotype it is a "
                          f"{type(target).__name__}; export the model again")
    flags = () if kind == "identity" else ("threshold",) if kind.startswith("packed") else ("threshold", "bias")
    for name in flags:
        if not isinstance(entry.get(name), bool):
            expected[name] = "true or false"
    for name, value in expected.items():
        # json.dumps tells 1 from true and [3, 3] from [3, 3.0], as the layer constructors would not
        if name not in entry or json.dumps(entry[name]) != json.dumps(value):
            raise ExportError(f"{file}: the layer table does not fit the genotype: layer {where} ({kind}) has "
                              f"{name}={_short(entry.get(name))}, expected {_short(value)}; export the model again")


def _load_state(net: nn.Module, state: Mapping[str, Tensor], what: str, hint: str = "",
                exact_dtypes: bool = False) -> None:
    """``load_state_dict(strict=True)`` with one readable error for every kind of mismatch.

    ``exact_dtypes``: a tensor must also have the dtype the module holds (a ``.bnas`` file),
    since ``load_state_dict`` would silently convert, e.g. packed int32 words re-saved as
    float32 (rounded above 2**24, so different weights); a checkpoint may be converted."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if exact_dtypes and not (missing or unexpected or wrong):
        other = sorted(k for k in own if own[k].dtype != state[k].dtype)
        if other:
            k = other[0]
            role = " (packed sign bits)" if k.endswith("weight_packed") else ""
            more = f"; {len(other) - 1} more tensor(s) of another dtype" if len(other) > 1 else ""
            raise ExportError(f"{what}: tensor {k} is {str(state[k].dtype).removeprefix('torch.')}, expected "
                              f"{str(own[k].dtype).removeprefix('torch.')}{role}{more}; the file was changed "
                              "after export: export the model again")
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} tensor(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape ({k}: {list(state[k].shape)} vs {list(own[k].shape)})")
        raise ExportError(f"{what} does not match the network: {'; '.join(parts)}{hint}")
    net.load_state_dict(state, strict=True)


def export(genotype: Genotype | str | os.PathLike[str], checkpoint: str | os.PathLike[str],
           out: str | os.PathLike[str]) -> tuple[PackedNetwork, Path]:
    """Build ``genotype``, load ``checkpoint`` (a trainer checkpoint with ``model``, or a
    plain state_dict), pack it and write ``out``."""
    from .builder import build

    if not isinstance(genotype, Genotype):
        genotype = load_genotype(genotype)
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise ExportError(f"no checkpoint at {ckpt}")
    # the trainer's reader: weights_only, and one line for random, empty or truncated bytes
    # (torch's unpickler raises IndexError and the like on those, and its own advice,
    # weights_only=False, would run a hostile file's code)
    state = load_checkpoint(ckpt, advice="pass the checkpoint.pt or model.pt that `bnas eval` wrote")
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ExportError(f"{ckpt}: expected a state_dict or a trainer checkpoint with a 'model' entry")
    model = build(genotype)
    _load_state(model, state, f"checkpoint {ckpt}",
                f"; is it a checkpoint of genotype {genotype.name!r} ({genotype.source or 'in memory'})?")
    packed = pack_model(model)
    return packed, save_packed(packed, out)


# --------------------------------------------------------------------------------------
# CLI: bnas export
# --------------------------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("genotype", help="genotype YAML file the checkpoint was trained from")
    p.add_argument("checkpoint", help="checkpoint.pt (trainer checkpoint) or model.pt (state_dict) from bnas eval")
    p.add_argument("--out", required=True, help="packed model file to write (e.g. model.bnas)")


def run_export(args: argparse.Namespace) -> int:
    # before reading the checkpoint: --out is a file, and its folder must take one
    check_writable_file(Path(args.out), "--out", example="model.bnas")
    packed, path = export(args.genotype, args.checkpoint, args.out)
    kinds: dict[str, int] = {}
    for entry in packed.layers:
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB; {summary}); "
          f"checkpoint {Path(args.checkpoint).stat().st_size / 1024:.1f} KiB")
    return 0
