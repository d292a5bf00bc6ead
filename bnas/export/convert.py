"""A trained binary network -> a packed inference network (``pack_model``), its float twin
(``freeze_model``), and ``export``: a checkpoint of a genotype -> a ``.bnas`` file.

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
* A binary linear layer with real activations (the quantizer is ``none`` or switched off,
  e.g. the first layer of ``bnn_mlp_2048``) whose binarized weights are exactly
  ``alpha * sign(W)`` per output becomes a ``PackedWeightLinear``: 1-bit weights, real input,
  ``scale = alpha * gamma / sqrt(var + eps)``. A conv with real activations keeps a float conv
  with the materialised weights ``alpha * sign(W)`` (first convs are small: 500 weights in
  ``binary_lenet5``); one with binary activations and real weights keeps a float conv on
  ``sign(x - threshold)``.
* Everything else (stem, head, shortcuts, pools, unfolded BNs) is the float module of the
  genotype, unchanged.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..binarize import BinaryConv2d, BinaryLinear
from ..builder import build
from ..genotype import Genotype, load_genotype
from ..kernels import pack_weights
from ..train import load_checkpoint
from .folding import LAYER_TYPES, bn_affine, find_bn_folds
from .format import ExportError, PackedNetwork, conv_args, load_state, make_layer, save_packed, set_module

__all__ = ["export", "freeze_model", "load_trained", "pack_model", "split_signs"]


def _alpha(layer: BinaryConv2d | BinaryLinear, out_features: int) -> Tensor:
    a = layer.kernel_quantizer.scale(layer.weight.detach())
    if a is None:
        return torch.ones(out_features, dtype=torch.float64)
    return a.detach().double().reshape(-1).expand(out_features).clone()


def split_signs(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(signs, scale)`` with ``signs * scale == weight`` exactly, one magnitude per output
    channel (a binarized layer's weights: alpha, times a folded BN scale), else None."""
    w = weight.detach()
    signs = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    scale = w.abs().flatten(1).amax(1)
    return (signs, scale) if torch.equal(signs * scale.view((-1,) + (1,) * (w.dim() - 1)), w) else None


def _convert(
    layer: nn.Conv2d | nn.Linear, bn: _BatchNorm | None, path: str, bn_path: str | None, packed: bool = True
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The inference module for one conv / linear (with its BN folded), and its table entry;
    None when a plain float layer has no BN to fold (it is kept as it is). ``packed=False``
    keeps binary layers as float convs on signs (the float twin)."""
    is_conv = isinstance(layer, nn.Conv2d)
    k = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    binary = layer if isinstance(layer, (BinaryConv2d, BinaryLinear)) else None
    # as the layer computes in eval mode; both False for a float layer
    acts = binary is not None and binary.binarizes_input
    weights = binary is not None and binary.binarizes_weights
    if binary is None and bn is None:
        return None
    s, t = (
        bn_affine(bn) if bn is not None else (torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
    )
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(k, dtype=torch.float64)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    threshold = binary is not None and acts and binary.input_quantizer.name == "rsign"
    entry: dict[str, Any] = {"path": path, "folded_bn": bn_path}
    if binary is not None:
        entry.update(
            activation=binary.input_quantizer.name if acts else "none",
            weight=binary.kernel_quantizer.name if weights else "none",
        )
    args = conv_args(layer) if isinstance(layer, nn.Conv2d) else {"in_features": layer.in_features, "out_features": k}
    entry.update(args)
    new: Any  # a PackedConv2d, PackedLinear, PackedWeightLinear, SignConv2d, SignLinear, Conv2d or Linear
    if binary is not None and acts and weights and packed:
        entry.update(kind="packed_conv2d" if is_conv else "packed_linear", threshold=threshold)
        new = make_layer(entry)
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        with torch.no_grad():
            new.weight_packed.copy_(pack_weights(layer.weight.detach().float().cpu(), groups))
            new.scale.copy_((_alpha(binary, k) * s).float())
            new.bias.copy_((b * s + t).float())
            if threshold:
                new.threshold.copy_(binary.input_quantizer.threshold.detach())
        return new, entry
    real_input = binary is not None and weights and not acts and packed and not is_conv
    split = split_signs(binary.binary_weight().double().cpu()) if real_input and binary is not None else None
    if split is not None:
        # real input, weights +-alpha: the weights go to 1 bit, alpha and the BN to the epilogue
        signs, alpha = split
        entry.update(kind="packed_weight_linear", threshold=False)
        new = make_layer(entry)
        with torch.no_grad():
            new.weight_packed.copy_(pack_weights(signs.float()))
            new.scale.copy_((alpha * s).float())
            new.bias.copy_((b * s + t).float())
        return new, entry
    # A float layer: weights as the forward uses them, BN folded into them.
    with torch.no_grad():
        w = binary.binary_weight() if binary is not None and weights else layer.weight
        w = w.detach().double() * s.view(shape)
    kind = ("sign_conv2d" if acts else "conv2d") if is_conv else ("sign_linear" if acts else "linear")
    entry.update(kind=kind, bias=True, threshold=threshold)
    new = make_layer(entry)
    with torch.no_grad():
        new.weight.copy_(w.float())
        new.bias.copy_((b * s + t).float())
        if binary is not None and threshold:
            new.threshold.copy_(binary.input_quantizer.threshold.detach())
    return new, entry


def _convert_in_place(net: nn.Module, packed: bool = True) -> list[dict[str, Any]]:
    folds = find_bn_folds(net)
    table: list[dict[str, Any]] = []
    for path, layer in list(net.named_modules()):
        if not isinstance(layer, LAYER_TYPES):
            continue
        bn_path = folds.get(path)
        bn = cast(_BatchNorm, net.get_submodule(bn_path)) if bn_path else None  # find_bn_folds checked it
        converted = _convert(layer, bn, path, bn_path, packed)
        if converted is None:
            continue
        module, entry = converted
        set_module(net, path, module)
        table.append(entry)
        if bn_path:
            set_module(net, bn_path, nn.Identity())
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


def load_trained(genotype: Genotype | str | os.PathLike[str], checkpoint: str | os.PathLike[str]) -> nn.Module:
    """Build ``genotype`` and load ``checkpoint`` (a trainer checkpoint or a state_dict), in
    eval mode on the CPU; the same reading and messages as ``bnas export`` to ``.bnas``."""
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
    load_state(
        model,
        state,
        f"checkpoint {ckpt}",
        f"; is it a checkpoint of genotype {genotype.name!r} ({genotype.source or 'in memory'})?",
    )
    return model.cpu().float().eval()


def export(
    genotype: Genotype | str | os.PathLike[str], checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]
) -> tuple[PackedNetwork, Path]:
    """Build ``genotype``, load ``checkpoint`` (a trainer checkpoint with ``model``, or a
    plain state_dict), pack it and write ``out``."""
    packed = pack_model(load_trained(genotype, checkpoint))
    return packed, save_packed(packed, out)
