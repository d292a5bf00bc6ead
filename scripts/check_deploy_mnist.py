"""Export a network trained with `bnas eval` on MNIST three ways (`bnas export --format bnas`,
`lce`, `onnx`) and run every MNIST test image through each file and through the trained PyTorch
model: identical predicted classes, the largest logit difference, test accuracy, file sizes.

    python scripts/check_deploy_mnist.py GENOTYPE.yaml RUN_DIR [--data-root P] [--keep DIR]

Needs the [lce] and [onnx] extras. Prints one line per format, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bnas
from bnas.data import load_dataset
from bnas.export.deploy import load_trained
from bnas.export.verify import compare, run_exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("genotype")
    parser.add_argument("run", help="folder of a `bnas eval` run (holds model.pt)")
    parser.add_argument("--data-root")
    parser.add_argument("--keep", help="write the exported files here (default: a temporary folder)")
    args = parser.parse_args()
    genotype = bnas.load_genotype(args.genotype)
    weights = Path(args.run) / "model.pt"
    model = load_trained(genotype, weights)
    data = load_dataset("mnist", args.data_root)
    xs, ys = zip(*data.loader("test", 1000), strict=True)
    x, y = torch.cat(xs), torch.cat(ys).numpy()
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()
    result: dict[str, object] = {
        "genotype": genotype.name,
        "test_images": len(x),
        "pytorch_test_acc": float((ref.argmax(1) == y).mean()),
        "checkpoint_bytes": weights.stat().st_size,
        "load_average_1m": os.getloadavg()[0],
    }
    print(f"{genotype.name}: PyTorch test accuracy {result['pytorch_test_acc']:.4f} on {len(x)} MNIST test images")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for fmt, suffix in (("bnas", "bnas"), ("lce", "tflite"), ("onnx", "onnx")):
            path = folder / f"{genotype.name}.{suffix}"
            start = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "bnas",
                "export",
                args.genotype,
                str(weights),
                "--format",
                fmt,
                "--out",
                str(path),
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            export_s = time.perf_counter() - start
            if fmt == "bnas":
                packed = bnas.load_packed(path)
                with torch.no_grad():
                    out = torch.cat([packed(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()
            else:
                out = run_exported(path, fmt, x, batch_size=1000)
            agreement = compare(ref, out)
            size = path.stat().st_size
            result[fmt] = {
                "bytes": size,
                "export_s": round(export_s, 1),
                "same_class": agreement.same_class,
                "max_abs_logit_diff": agreement.max_abs_diff,
                "max_rel_logit_diff": agreement.max_rel_diff,
                "images_beyond_1e-4": int(
                    ((np.abs(out - ref) / np.abs(ref).max(1, keepdims=True)).max(1) >= 1e-4).sum()
                ),
                "test_acc": float((out.argmax(1) == y).mean()),
            }
            print(f"  {fmt:5s} {size:>12,} B  export {export_s:5.1f} s  {agreement.line()}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
