"""Time per training step: a binary network vs the same network with binarization off.

Both are measured in the same run (interleaved repeats), so the ratio is comparable even on
a noisy machine. Prints one JSON line per network.

On CPU the step is timed as ``bnas eval`` runs it: after ``tune_cpu_allocator()``, which the
trainer calls (glibc otherwise maps fresh pages for every large tensor, and ``sign(W)`` of a
4096x4096 layer is one each step). ``--untuned-allocator`` measures glibc's defaults instead.

    python benchmarks/train_step.py [--device cpu] [--repeats 10] [--untuned-allocator]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, median_time  # noqa: E402

import bnas  # noqa: E402
from bnas.binarize import clip_latent_weights  # noqa: E402
from bnas.train import Recipe, make_optimizer, task_loss, tune_cpu_allocator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NETWORKS = {"binarynet_mlp": 100, "bireal_resnet18": 32, "bnn_mlp_2048": 100}


def step_fn(genotype: bnas.Genotype, binarize: bool, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = bnas.build(genotype, binarize=binarize).to(device).train()
    recipe = Recipe.from_dict(genotype.training)
    optimizer = make_optimizer(model, recipe)
    x = torch.randn(batch, *genotype.input, device=device)
    y = torch.randint(0, genotype.num_classes, (batch,), device=device)

    def step() -> None:
        loss = task_loss(model(x), y, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS))
    parser.add_argument(
        "--untuned-allocator", action="store_true", help="keep glibc's malloc defaults (the trainer tunes them)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    tuned = device.type == "cpu" and not args.untuned_allocator and tune_cpu_allocator()
    for name in args.networks:
        genotype = bnas.load_genotype(REPO / "search_spaces" / "genotypes" / f"{name}.yaml")
        batch = NETWORKS.get(name, 32)
        binary = step_fn(genotype, True, batch, device)
        real = step_fn(genotype, False, batch, device)
        # Interleave rounds so that machine noise hits both alike.
        t_bin, t_real = [], []
        for _ in range(3):
            t_bin.append(median_time(binary, repeats=max(1, args.repeats // 3), warmup=2))
            t_real.append(median_time(real, repeats=max(1, args.repeats // 3), warmup=2))
        tb, tr = sorted(t_bin)[1], sorted(t_real)[1]
        emit(
            {
                "benchmark": "train_step",
                "network": name,
                "batch": batch,
                "input": list(genotype.input),
                "device": str(device),
                "baseline": "same network, binarization off",
                "baseline_ms": round(tr * 1e3, 2),
                "ours_ms": round(tb * 1e3, 2),
                "ratio_binary_over_float": round(tb / tr, 3),
                "allocator_tuned": tuned,
                **machine(),
            }
        )


if __name__ == "__main__":
    main()
