"""Export a network trained with `bnas eval` and compare the packed model with it on every
MNIST test image: same predicted class, largest relative logit difference, file sizes.

    python scripts/check_packed_mnist.py GENOTYPE.yaml RUN_DIR [--data-root P]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import bnas
from bnas.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("genotype")
    parser.add_argument("run", help="folder of a `bnas eval` run (holds model.pt)")
    parser.add_argument("--data-root")
    args = parser.parse_args()
    genotype = bnas.load_genotype(args.genotype)
    weights = Path(args.run) / "model.pt"
    with tempfile.TemporaryDirectory() as tmp:
        packed_path = Path(tmp) / "model.bnas"
        subprocess.run([sys.executable, "-m", "bnas", "export", args.genotype, str(weights), "--out", str(packed_path)], check=True)
        model = bnas.build(genotype)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        packed = bnas.load_packed(packed_path)
        data = load_dataset("mnist", args.data_root)
        same = total = 0
        worst = 0.0
        with torch.no_grad():
            for x, y in data.loader("test", 1000):
                a, b = model(x), packed(x)
                same += (a.argmax(1) == b.argmax(1)).sum().item()
                total += len(y)
                worst = max(worst, ((a - b).abs() / a.abs().clamp_min(1e-6)).max().item())
        size, float_size = os.path.getsize(packed_path), os.path.getsize(weights)
    print(f"{genotype.name}: same class on {same}/{total} test images; largest relative logit difference {worst:.2e}; "
          f"packed file {size:,} B vs float weights {float_size:,} B ({float_size / size:.1f}x smaller)")


if __name__ == "__main__":
    main()
