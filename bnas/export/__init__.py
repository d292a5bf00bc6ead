"""Trained binary network -> packed inference network that runs on the XNOR-popcount kernels.

``pack_model(model)`` converts an in-memory network; ``bnas export GENOTYPE CHECKPOINT --out
model.bnas`` does the same for a checkpoint and writes a file; ``load_packed(path)`` reads it
back as an inference module.

One job per module:

* :mod:`~bnas.export.layers`: the packed inference layers (``PackedConv2d``, ``PackedLinear``,
  ``PackedWeightLinear``) and the float layers on signs (``SignConv2d``, ``SignLinear``);
* :mod:`~bnas.export.folding`: which BatchNorm folds into which layer (torch.fx tracing);
* :mod:`~bnas.export.convert`: ``pack_model``, ``freeze_model`` and ``export`` (what becomes
  what);
* :mod:`~bnas.export.plan`: how a packed network runs on the CPU (one torch.fx program,
  residual adds and sign packing fused into the binary convs, channels_last glue);
* :mod:`~bnas.export.program`: the plan lowered to direct kernel calls, replayed in C++
  where every call is one the extension's runner makes;
* :mod:`~bnas.export.torch_ops`: which of the plan's PyTorch ops the runner makes too;
* :mod:`~bnas.export.format`: the ``.bnas`` file (``save_packed``, ``load_packed``, the layer
  table and every check on reading);
"""

from __future__ import annotations

from .convert import export, freeze_model, pack_model
from .folding import find_bn_folds
from .format import FORMAT, KINDS, VERSION, ExportError, PackedNetwork, load_packed, save_packed
from .layers import PackedConv2d, PackedLinear, PackedWeightLinear, SignConv2d, SignLinear
from .layers import _as_channel_view as _as_channel_view  # scripts/check_packed_mnist.py

__all__ = [
    "FORMAT",
    "KINDS",
    "VERSION",
    "ExportError",
    "PackedConv2d",
    "PackedLinear",
    "PackedWeightLinear",
    "PackedNetwork",
    "SignConv2d",
    "SignLinear",
    "export",
    "find_bn_folds",
    "freeze_model",
    "load_packed",
    "pack_model",
    "save_packed",
]
