"""``bnas export GENOTYPE CHECKPOINT --format onnx --out model.onnx``: the inference network in
standard ONNX (extra ``[onnx]``: onnx, onnxruntime).

What is written is the deployable twin (:func:`~bnas.export.deploy.deploy_twin`): every fully
binary layer is ``Sign`` (as ``sign(sign(x) + 0.5)``, so sign(0) = +1) then ``Conv`` / ``Gemm``
with +-1 float weights, then ``Mul`` / ``Add`` by per-channel constants holding alpha and the
folded BatchNorm; every other layer is its float ONNX operator. The file is for portability,
not speed: ONNX has no 1-bit type, so the +-1 weights take 32 bits each and a runtime computes
float convolutions (the packed ``.bnas`` file and LCE's flatbuffer are the fast, small forms).

The exporter is torch.onnx's TorchScript-based one (``dynamo=False``): torch's dynamo exporter
needs onnxscript and onnx-ir, which need ml_dtypes >= 0.5, and tensorflow 2.16 (the ``[lce]``
extra) pins ml-dtypes 0.3, so the two cannot share one environment.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..genotype import Genotype
from .deploy import deploy_twin, require
from .format import ExportError

__all__ = ["OPSET", "to_onnx"]

log = logging.getLogger(__name__)
FMT = "onnx"
OPSET = 17  # onnxruntime 1.16 and later run it; nothing here needs a newer operator


def to_onnx(model: nn.Module, out: str | os.PathLike[str], input_shape: tuple[int, ...] | None = None) -> Path:
    """Write the trained ``model``'s inference network as ONNX at ``out`` (atomically); the
    batch dimension of input ``input`` (N, C, H, W) and output ``logits`` is dynamic."""
    onnx = require("onnx", "onnx", FMT)
    genotype = getattr(model, "genotype", None)
    if input_shape is None:
        if not isinstance(genotype, Genotype):
            raise ExportError("bnas export --format onnx: the network has no genotype; pass its input shape (C, H, W)")
        input_shape = tuple(genotype.input)
    net, _ = deploy_twin(model)
    example = torch.zeros(1, *input_shape)
    path = Path(out)
    with atomic_path(path, "ONNX model") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ExportError(
                f"bnas export --format onnx: torch.onnx could not export the network "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from exc
        onnx.checker.check_model(str(tmp))
    return path
