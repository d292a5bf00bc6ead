"""``bnas export ... --verify N``: run images through an exported file, in LCE's interpreter or
onnxruntime, and through the trained PyTorch model; report how often they predict the same
class and the largest logit difference."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .deploy import require
from .format import ExportError

__all__ = ["Agreement", "compare", "run_exported", "verify"]


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How an exported model's logits compare with the PyTorch model's on ``images`` inputs."""

    images: int
    same_class: int
    #: largest |exported - pytorch| over every logit
    max_abs_diff: float
    #: largest |exported - pytorch| of an image over that image's largest |pytorch logit|
    max_rel_diff: float

    @property
    def share(self) -> float:
        return self.same_class / self.images if self.images else 1.0

    def line(self) -> str:
        return (
            f"same class on {self.same_class}/{self.images} images ({100 * self.share:.2f}%); "
            f"largest logit difference {self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} of the image's largest logit)"
        )


def compare(ref: np.ndarray, out: np.ndarray) -> Agreement:
    """The agreement of ``out`` with ``ref``, both (N, classes)."""
    if ref.shape != out.shape:
        raise ExportError(f"--verify: the exported model gives logits of shape {out.shape}, PyTorch {ref.shape}")
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1e-12)
    return Agreement(
        images=int(ref.shape[0]),
        same_class=int((ref.argmax(1) == out.argmax(1)).sum()),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        max_rel_diff=float((diff / scale).max()) if diff.size else 0.0,
    )


def _runner(path: Path, fmt: str, threads: int) -> Any:
    """A function from an (N, C, H, W) float32 array to logits, for the exported file."""
    if fmt == "lce":
        from .lce import import_lce

        import_lce()
        interpreter_module = require("larq_compute_engine.tflite.python.interpreter", "lce", "lce")
        interpreter = interpreter_module.Interpreter(path.read_bytes(), num_threads=threads)

        def run_lce(x: np.ndarray) -> np.ndarray:
            if x.ndim == 4:
                x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # the flatbuffer takes NHWC
            return np.asarray(interpreter.predict(x))

        return run_lce
    if fmt == "onnx":
        ort = require("onnxruntime", "onnx", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {"input": x})[0])

        return run_onnx
    raise ExportError(f"--verify: no runner for format {fmt!r}; expected lce or onnx")


def run_exported(
    path: str | os.PathLike[str], fmt: str, x: Tensor, batch_size: int = 256, threads: int | None = None
) -> np.ndarray:
    """Logits of the exported file at ``path`` for NCHW images ``x``."""
    run = _runner(Path(path), fmt, threads or max(1, torch.get_num_threads()))
    outs = [run(x[i : i + batch_size].float().cpu().numpy()) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def verify(model: nn.Module, path: str | os.PathLike[str], fmt: str, x: Tensor, batch_size: int = 256) -> Agreement:
    """Run ``x`` through the exported file and through ``model`` (eval mode, CPU)."""
    model = model.eval()
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
    return compare(ref, run_exported(path, fmt, x, batch_size))
