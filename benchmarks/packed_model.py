"""Latency of a packed network (``bnas.export.pack_model``) against its float model.

    python benchmarks/packed_model.py --device cpu  [--genotype G.yaml] [--batch 1] [--threads 2]
    python benchmarks/packed_model.py --device cuda [--batch 256 1]

CPU (issue 5): batch 1 by default; baseline = the float model as built and trained
(``bnas.build``, eval mode, float32: binary convs simulated with float convs on signs); ours =
the packed model on the XNOR-popcount kernels. Also reported: ``frozen_ms``, the float twin
with the same BN folding and materialised weights (``bnas.export.freeze_model``), i.e. the
best a float deployment of this network does with plain PyTorch. Float and packed calls are
interleaved, and each figure is the median over ``--repeats`` calls, so both see the same
machine load. ``--profile`` adds a torch.profiler table of the packed model to stderr.

CUDA (issue 7): baseline = the float model in float16, channels_last, ``cudnn.benchmark`` on;
ours = the packed model on the GPU kernels; CUDA events after warm-up (``cuda_time`` of
``benchmarks/cuda_xnor_conv.py``); batch 256 and 1 by default.

Prints one JSON line per batch size: baseline_ms, ours_ms, ratio (baseline / ours), machine,
kernel backend, shapes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402

import bnas  # noqa: E402
from bnas.export import freeze_model, pack_model  # noqa: E402
from bnas.kernels import backend  # noqa: E402

DEFAULT_GENOTYPE = ROOT / "search_spaces" / "genotypes" / "bireal_resnet18.yaml"


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics, as a trained network has (a fresh BN is the
    identity, which would hide the cost of nothing but also the folding)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)


def run_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    genotype = bnas.load_genotype(args.genotype)
    torch.manual_seed(0)
    model = bnas.build(genotype).eval()
    randomize_batchnorm(model)
    packed = pack_model(model)
    frozen = freeze_model(model)
    for batch in args.batch:
        x = torch.randn(batch, *genotype.input)
        with torch.no_grad():
            ref, out = model(x), packed(x)
            same_class = bool((ref.argmax(1) == out.argmax(1)).all())
            err = float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12))
            load_start = load_average()
            times = interleaved_times({"built": lambda: model(x), "packed": lambda: packed(x), "frozen": lambda: frozen(x)},
                                      args.repeats, burst_seconds=0.0)
        (base, base_p90), (ours, ours_p90), (froz, froz_p90) = (median_p90(times[k]) for k in ("built", "packed", "frozen"))
        emit({
            "benchmark": "packed_model", "device": "cpu", "genotype": genotype.name, "batch": batch,
            "input": list(genotype.input), "baseline": "float32 model (bnas.build, eval)", "ours": "packed (XNOR kernels)",
            "baseline_ms": round(base * 1e3, 3), "ours_ms": round(ours * 1e3, 3), "ratio": round(base / ours, 2),
            "frozen_ms": round(froz * 1e3, 3), "ratio_vs_frozen": round(froz / ours, 2),
            "p90_ms": {"baseline": round(base_p90 * 1e3, 3), "ours": round(ours_p90 * 1e3, 3), "frozen": round(froz_p90 * 1e3, 3)},
            "load_average_1min": [load_start, load_average()],
            "max_rel_logit_diff": err, "same_class": same_class, "repeats": args.repeats,
            "backend": backend("cpu"), "machine": machine(),
        })
        if args.profile:
            profile(packed, x)


def profile(packed: torch.nn.Module, x: torch.Tensor) -> None:
    """Where the packed model's time goes: per-module-kind wall time (forward hooks, which
    also cover the kernels, a pybind call the profiler does not name) and the aten table."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    totals: dict[str, float] = {}
    starts: dict[int, float] = {}
    hooks = []
    leaves = [m for m in packed.modules() if not list(m.children())]
    for m in leaves:
        hooks.append(m.register_forward_pre_hook(lambda mod, inp: starts.__setitem__(id(mod), time.perf_counter())))
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out: totals.__setitem__(type(mod).__name__, totals.get(type(mod).__name__, 0.0)
                                                     + time.perf_counter() - starts[id(mod)])))
    calls = 20
    t0 = time.perf_counter()
    for _ in range(calls):
        packed(x)
    wall = (time.perf_counter() - t0) / calls
    for h in hooks:
        h.remove()
    print(f"packed model, mean {wall * 1e3:.3f} ms per call; time per module kind (ms per call):", file=sys.stderr)
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16s} {t / calls * 1e3:8.3f}", file=sys.stderr)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function("packed_forward"):
                packed(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


def run_cuda(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("packed_model.py --device cuda: torch sees no CUDA device here; run it on a machine with "
                         "an NVIDIA GPU (sm_80 or newer for the tensor-core kernel), or use --device cpu")
    from cuda_xnor_conv import cuda_time

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = backend(device)
    if name != "cuda-tensor-core":
        print(f"warning: the packed model runs on the {name!r} backend on this GPU, not the tensor-core kernel",
              file=sys.stderr)
    genotype = bnas.load_genotype(args.genotype)
    torch.manual_seed(0)
    model = bnas.build(genotype).eval()
    randomize_batchnorm(model)
    packed = pack_model(model).to(device)
    half = bnas.build(genotype).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(device=device, dtype=torch.float16, memory_format=torch.channels_last)
    for batch in args.batch:
        x = torch.randn(batch, *genotype.input, device=device)
        xh = x.half().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref, out = half(xh).float(), packed(x)
            agree = float((ref.argmax(1) == out.argmax(1)).float().mean())
            base = cuda_time(lambda: half(xh), repeats=args.repeats)
            ours = cuda_time(lambda: packed(x), repeats=args.repeats)
        emit({
            "benchmark": "packed_model", "device": "cuda", "genotype": genotype.name, "batch": batch,
            "input": list(genotype.input), "baseline": "float16 channels_last model (cudnn.benchmark)",
            "ours": "packed (XNOR kernels), float32 real layers",
            "baseline_ms": round(base * 1e3, 4), "ours_ms": round(ours * 1e3, 4), "ratio": round(base / ours, 2),
            "class_agreement_vs_fp16": agree, "repeats": args.repeats, "backend": name, "machine": machine(),
        })


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--genotype", default=str(DEFAULT_GENOTYPE), help="genotype YAML (default bireal_resnet18)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (cpu: 1; cuda: 256 1)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per figure")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--profile", action="store_true", help="cpu: print where the packed model's time goes (stderr)")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = [1] if args.device == "cpu" else [256, 1]
    (run_cpu if args.device == "cpu" else run_cuda)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
