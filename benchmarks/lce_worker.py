"""Larq Compute Engine (LCE) twin of bnas's Bi-Real ResNet-18, timed on request (issue 15).

Run with the Python of a virtual environment that has tensorflow, tf-keras, larq and
larq-compute-engine (it imports neither torch nor bnas)::

    TF_USE_LEGACY_KERAS=1 /path/to/lce-venv/bin/python benchmarks/lce_worker.py --layout cifar

It builds the network of ``search_spaces/genotypes/bireal_resnet18.yaml`` (``--layout cifar``:
3x32x32, 3x3 real stem conv + BN, 10 classes) or ``bireal_resnet18_imagenet.yaml``
(``--layout imagenet``: 3x224x224, 7x7/2 conv + BN, 3x3/2 max-pool, 1000 classes) in larq
Keras: 16 Bi-Real units (sign -> binary 3x3 conv -> BN, + real shortcut; the downsampling
shortcut is a 2x2 avg-pool + real 1x1 conv + BN), global average pool, dense. Weights and BN
statistics are random (timing only). The binary convs pad with +1 (``pad_values=1.0``), LCE's
fast path. The model is converted with LCE's converter and run by LCE's interpreter, batch 1.

Protocol (stdin/stdout, one JSON object per line):

* after setup: ``{"ready": true, "binary_macs": ..., "float_macs": ..., "tflite_bytes": ...,
  "ops": {op type: count}, ...}``, or ``{"error": "..."}`` and exit code 1;
* ``time N`` -> ``{"times": [N per-call seconds]}`` (``time.perf_counter`` around each call);
* ``quit`` (or end of input) -> exit 0.

Anything else TensorFlow prints goes to stderr: stdout carries only the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

# larq needs Keras 2 (tf-keras); TensorFlow reads this when it is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LAYOUTS: dict[str, dict[str, Any]] = {
    # input (H, W, C), classes, stem: (kernel, stride), max-pool after the stem
    "cifar": {"input": (32, 32, 3), "classes": 10, "stem": (3, 1), "max_pool": False},
    "imagenet": {"input": (224, 224, 3), "classes": 1000, "stem": (7, 2), "max_pool": True},
}
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of the first unit)
UNITS_PER_STAGE = 4


def build_model(layout: str, seed: int = 0) -> Any:
    """The Bi-Real ResNet-18 of ``layout`` as a larq Keras model (channels last)."""
    import larq as lq  # type: ignore[import-not-found,import-untyped,unused-ignore]
    import numpy as np
    import tensorflow as tf  # type: ignore[import-not-found,import-untyped,unused-ignore]

    keras = tf.keras
    spec = LAYOUTS[layout]
    tf.random.set_seed(seed)

    def bn(x: Any) -> Any:
        # PyTorch's BatchNorm2d epsilon, as in the bnas network.
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    def bireal_unit(x: Any, width: int, stride: int) -> Any:
        out = lq.layers.QuantConv2D(
            width,
            3,
            strides=stride,
            padding="same",
            pad_values=1.0,
            input_quantizer="ste_sign",
            kernel_quantizer="ste_sign",
            kernel_constraint="weight_clip",
            use_bias=False,
        )(x)
        out = bn(out)
        shortcut = x
        if stride != 1 or x.shape[-1] != width:
            # Bi-Real's downsample: 2x2 avg-pool + real 1x1 conv + BN (all sizes here are even).
            if stride == 2:
                shortcut = keras.layers.AveragePooling2D(2, 2)(shortcut)
            shortcut = bn(keras.layers.Conv2D(width, 1, use_bias=False)(shortcut))
        return keras.layers.Add()([out, shortcut])

    inputs = keras.Input(shape=spec["input"])
    kernel, stride = spec["stem"]
    x = bn(keras.layers.Conv2D(64, kernel, strides=stride, padding="same", use_bias=False)(inputs))
    if spec["max_pool"]:
        x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    for width, first_stride in STAGES:
        for i in range(UNITS_PER_STAGE):
            x = bireal_unit(x, width, first_stride if i == 0 else 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(spec["classes"])(x)
    model = keras.Model(inputs, outputs, name=f"bireal_resnet18_{layout}")

    # Non-trivial BN statistics, as a trained network has (bnas's benchmark does the same).
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.random(c) + 0.5, rng.random(c) - 0.5, rng.random(c) - 0.5, rng.random(c) + 0.5])
    return model


def count_macs(model: Any) -> tuple[int, int]:
    """(binary, float) multiply-accumulates of one image, counted as bnas counts them: convs
    and dense layers only (BN, pools and adds are not counted), biases not counted."""
    import larq as lq  # type: ignore[import-not-found,import-untyped,unused-ignore]
    import tensorflow as tf  # type: ignore[import-not-found,import-untyped,unused-ignore]

    binary = real = 0
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            kh, kw, c_in, c_out = (int(d) for d in layer.kernel.shape)
            _, h, w, _ = layer.output.shape
            macs = int(h) * int(w) * kh * kw * c_in * c_out
            is_binary = (
                isinstance(layer, lq.layers.QuantConv2D)
                and layer.input_quantizer is not None
                and layer.kernel_quantizer is not None
            )
            if is_binary:
                binary += macs
            else:
                real += macs
        elif isinstance(layer, tf.keras.layers.Dense):
            c_in, c_out = (int(d) for d in layer.kernel.shape)
            real += c_in * c_out
    return binary, real


def tflite_op_counts(flatbuffer: bytes) -> dict[str, int]:
    """Operators in the flatbuffer's main graph by type (builtin names, or the custom code of
    LCE's ops such as LceBconv2d / LceQuantize)."""
    from tensorflow.lite.python import schema_py_generated as schema  # type: ignore[import-not-found,import-untyped,unused-ignore]

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(flatbuffer, 0)
    kinds = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode()
        if custom:
            kinds.append(custom.decode())
        else:
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            kinds.append(names.get(builtin, str(builtin)))
    graph = model.Subgraphs(0)
    counts: dict[str, int] = {}
    for i in range(graph.OperatorsLength()):
        kind = kinds[graph.Operators(i).OpcodeIndex()]
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def serve(interpreter: Any, input_shape: Sequence[int], commands: IO[str], replies: IO[str], seed: int = 0) -> None:
    """Answer ``time N`` / ``quit`` lines until ``quit`` or end of input."""
    import numpy as np

    rng = np.random.default_rng(seed)
    predict = interpreter.interpreter.predict  # the wrapper's call, without the per-call numpy concatenation
    while True:
        line = commands.readline()
        if not line:
            return
        words = line.split()
        if words == ["quit"]:
            return
        if len(words) == 2 and words[0] == "time" and words[1].isdigit():
            x = rng.standard_normal((1, *input_shape), dtype=np.float32)
            times = []
            for _ in range(int(words[1])):
                t0 = time.perf_counter()
                predict([x])
                times.append(time.perf_counter() - t0)
            reply: dict[str, Any] = {"times": times}
        else:
            reply = {"error": f"unknown command {line.strip()!r}: expected 'time N' or 'quit'"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="cifar")
    p.add_argument("--threads", type=int, default=1, help="LCE interpreter threads")
    p.add_argument(
        "--indirect-bgemm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LCE's indirect BGEMM binary conv kernel (default on); --no-indirect-bgemm: LCE's default path",
    )
    p.add_argument("--xnnpack", action="store_true", help="run the float ops on TFLite's XNNPack delegate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    # The protocol owns the real stdout; anything else (TensorFlow, the MLIR converter, C
    # libraries writing to fd 1) is sent to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        t0 = time.perf_counter()
        import larq_compute_engine as lce  # type: ignore[import-not-found,import-untyped,unused-ignore]
        import tensorflow as tf  # type: ignore[import-not-found,import-untyped,unused-ignore]
        from larq_compute_engine.tflite.python.interpreter import Interpreter  # type: ignore[import-not-found,import-untyped,unused-ignore]

        model = build_model(args.layout, args.seed)
        binary_macs, float_macs = count_macs(model)
        flatbuffer = lce.convert_keras_model(model)
        interpreter = Interpreter(
            flatbuffer,
            num_threads=args.threads,
            use_reference_bconv=False,
            use_indirect_bgemm=args.indirect_bgemm,
            use_xnnpack=args.xnnpack,
        )
        ready: dict[str, Any] = {
            "ready": True,
            "layout": args.layout,
            "input": list(LAYOUTS[args.layout]["input"]),
            "binary_macs": binary_macs,
            "float_macs": float_macs,
            "tflite_bytes": len(flatbuffer),
            "threads": args.threads,
            "indirect_bgemm": args.indirect_bgemm,
            "xnnpack": args.xnnpack,
            "versions": {"tensorflow": tf.__version__, "larq_compute_engine": getattr(lce, "__version__", "?")},
        }
        try:
            ready["ops"] = tflite_op_counts(flatbuffer)
        except Exception as exc:  # the op table is informative only: a schema change must not stop the timing
            print(f"lce_worker: no op counts ({exc})", file=sys.stderr)
        ready["setup_s"] = round(time.perf_counter() - t0, 2)
    except Exception as exc:
        replies.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        replies.flush()
        raise
    replies.write(json.dumps(ready) + "\n")
    replies.flush()
    serve(interpreter, LAYOUTS[args.layout]["input"], sys.stdin, replies, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
