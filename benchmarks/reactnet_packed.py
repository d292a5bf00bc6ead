"""ReActNet's binary layers packed: RSign's thresholds against plain signs.

    python benchmarks/reactnet_packed.py [--sizes 32 224] [--variants rsign rsign_rprelu]
                                         [--threads 1] [--repeats 60]

ReActNet (Liu et al., ECCV 2020) binarizes with RSign, ``sign(x - threshold)`` with a learned
threshold per channel, and puts RPReLU (a shift, a PReLU, a shift per channel) after each
unit. Its twin here is Bi-Real ResNet-18 (``bireal_resnet18.yaml`` at 32x32,
``bireal_resnet18_imagenet.yaml`` at 224x224) with every unit binarized so
(``binarize: reactnet``), without RPReLU (``rsign``: each unit's output is packed against the
next conv's thresholds in the conv's epilogue) or with it after every unit (``rsign_rprelu``:
each conv packs its input against its thresholds in one pass). Timed interleaved in one run,
batch 1: baseline = the packed Bi-Real network (plain signs), ours = the packed ReActNet twin,
and beside them the twin's float model as built (eval). The twin's BatchNorm statistics,
thresholds and RPReLU parameters are random (seeded), so the thresholds move real signs.

Prints one JSON line per size, variant and thread count: medians and p90 in ms, the ratio
baseline / ours (1.0: the thresholds cost nothing), the float model's time and its ratio to
ours, whether both packed networks run as native programs, and whether the packed twin
predicts the float model's class (and how far its logits are from the float model's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402
from packed_model import randomize_batchnorm  # noqa: E402

import bnas  # noqa: E402
from bnas.export import PackedNetwork, pack_model  # noqa: E402
from bnas.genotype import Genotype, genotype_from_dict  # noqa: E402
from bnas.kernels import backend  # noqa: E402
from bnas.ops.common import RPReLU  # noqa: E402

GENOTYPES = ROOT / "search_spaces" / "genotypes"
NETWORKS = {32: "bireal_resnet18", 224: "bireal_resnet18_imagenet"}
VARIANTS = ("rsign", "rsign_rprelu")


def reactnet_twin(name: str, rprelu: bool) -> Genotype:
    """Shipped genotype ``name`` with every Bi-Real unit binarized as ReActNet does (and RPReLU
    after each)."""
    spec = yaml.safe_load((GENOTYPES / f"{name}.yaml").read_text())
    for op in spec["body"]:
        if op["op"] == "bireal_block":
            op["binarize"] = "reactnet"
            if rprelu:
                op["activation"] = "rprelu"
    spec["name"] = f"{name}_reactnet"
    return genotype_from_dict(spec)


def randomize_reactnet(model: torch.nn.Module, seed: int) -> None:
    """Random BatchNorm statistics, RSign thresholds and RPReLU parameters, as a trained
    network has them (zeros would make RSign a plain sign and RPReLU a PReLU)."""
    randomize_batchnorm(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            threshold = getattr(m, "threshold", None)
            if isinstance(threshold, torch.nn.Parameter):
                threshold.copy_((torch.rand(threshold.shape, generator=gen) - 0.5) * 0.4)
            if isinstance(m, RPReLU):
                for p in (m.shift_in, m.shift_out):
                    p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.2)
                m.slope.copy_(torch.rand(m.slope.shape, generator=gen) * 0.5)


def packed_of(model: torch.nn.Module) -> PackedNetwork:
    packed = pack_model(model)
    packed.adaptive_threads = False  # the thread count asked for, in every engine
    return packed


def measure(size: int, variant: str, threads: int, repeats: int) -> dict[str, Any]:
    genotype = bnas.load_genotype(GENOTYPES / f"{NETWORKS[size]}.yaml")
    twin_genotype = reactnet_twin(NETWORKS[size], rprelu=variant == "rsign_rprelu")
    torch.manual_seed(0)
    bireal = bnas.build(genotype).eval()
    randomize_batchnorm(bireal)
    twin = bnas.build(twin_genotype).eval()
    randomize_reactnet(twin, seed=1)
    packed_bireal, packed_twin = packed_of(bireal), packed_of(twin)
    x = torch.randn(1, *genotype.input, generator=torch.Generator().manual_seed(2))
    torch.set_num_threads(threads)
    with torch.no_grad():
        float_out, twin_out = twin(x), packed_twin(x)
        packed_bireal(x)
        route = backend(x.device)
        programs = {
            name: packed.program(route) for name, packed in (("bireal", packed_bireal), ("reactnet", packed_twin))
        }
        calls = {
            "bireal packed": lambda: packed_bireal(x),
            "reactnet packed": lambda: packed_twin(x),
            "reactnet float model": lambda: twin(x),
        }
        load_start = load_average()
        times = interleaved_times(calls, repeats, untimed=3)
        load_end = load_average()
    (base, base_p90), (ours, ours_p90) = median_p90(times["bireal packed"]), median_p90(times["reactnet packed"])
    float_ms, float_p90 = median_p90(times["reactnet float model"])
    return {
        "benchmark": "reactnet_packed",
        "genotype": twin_genotype.name,
        "input": list(x.shape[1:]),
        "variant": variant,
        "threads": threads,
        "baseline": f"{genotype.name} packed (plain signs)",
        "ours": "its ReActNet twin packed (RSign thresholds"
        + (", RPReLU after each unit)" if "rprelu" in variant else ")"),
        "baseline_ms": round(base * 1e3, 4),
        "ours_ms": round(ours * 1e3, 4),
        "ratio": round(base / ours, 3),
        "float_model_ms": round(float_ms * 1e3, 4),
        "float_model_over_ours": round(float_ms / ours, 2),
        "p90_ms": {
            "baseline": round(base_p90 * 1e3, 4),
            "ours": round(ours_p90 * 1e3, 4),
            "float_model": round(float_p90 * 1e3, 4),
        },
        "native_programs": {name: program is not None and program.native for name, program in programs.items()},
        "same_class_as_float_model": bool(torch.equal(twin_out.argmax(1), float_out.argmax(1))),
        "max_abs_logit_difference": float((twin_out - float_out).abs().max()),
        "load_average_1min": [load_start, load_end],
        "repeats": repeats,
        "route": route,
        "machine": {k: v for k, v in machine().items() if k != "threads"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)
    for size in args.sizes:
        for variant in args.variants:
            for threads in args.threads:
                emit(measure(size, variant, threads, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
