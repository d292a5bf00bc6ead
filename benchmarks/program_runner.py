"""A packed network's lowered program replayed in C++ against the same program in Python.

    python benchmarks/program_runner.py [--threads 1 2] [--repeats 60] [--sizes 32 224]
                                        [--genotypes fashion_searched example_cells ...]
                                        [--backend cpu-avx2]

``bnas.export.program.Program`` runs a packed network's plan as a list of direct kernel calls.
Where every call is one the extension's ``ProgramRunner`` can make, the program replays them
in C++, with no Python frame, argument conversion or check between two kernels. Baseline = the
same program with ``program.native_enabled = False`` (each call made from Python, as before
the runner), ours = the runner; both through ``PackedNetwork.__call__``, batch 1, interleaved
in rounds (``common.interleaved_times``, 3 untimed calls before each burst). Networks:
Bi-Real ResNet-18 at 32x32 (``bireal_resnet18.yaml``) and 224x224
(``bireal_resnet18_imagenet.yaml``) in float32 and, on CPUs with AVX-512 VNNI, in the opt-in
int8 configuration of ``benchmarks/packed_model.py``'s ``int8_all_grid`` twin. ``--genotypes``
times shipped genotypes (``search_spaces/genotypes/NAME.yaml``) in float32 instead (or as well,
with ``--sizes``): cell networks and plain CNNs, whose float glue (BatchNorm, pools, the sums
and concatenations of cell nodes) the runner makes as PyTorch's own ops. Each line says whether
the two outputs are equal bit for bit (they must be: the same calls). ``--backend`` runs another
CPU code path this machine has (``cpu-avx2``, ``cpu-popcnt``: there the stem, shortcuts,
global pool and classifier are PyTorch's ops, in the runner as well).

Prints one JSON line per network, precision and thread count: medians and p90 in ms, the
ratio baseline / ours, the time saved per call, and the load average before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402
from packed_model import INPUT_GRID, randomize_batchnorm  # noqa: E402

import bnas  # noqa: E402
from bnas.export import PackedNetwork, pack_model  # noqa: E402
from bnas.kernels import backend, cpu_backend, use_backend  # noqa: E402

GENOTYPES = ROOT / "search_spaces" / "genotypes"
NETWORKS = {32: "bireal_resnet18", 224: "bireal_resnet18_imagenet"}


def packed_network(name: str, int8: bool) -> tuple[PackedNetwork, torch.Tensor]:
    genotype = bnas.load_genotype(GENOTYPES / f"{name}.yaml")
    torch.manual_seed(0)
    model = bnas.build(genotype).eval()
    randomize_batchnorm(model)
    packed = pack_model(model)
    if int8:
        packed.stem_precision = packed.shortcut_precision = packed.head_precision = "int8"
        packed.input_grid = INPUT_GRID
    packed.adaptive_threads = False  # the thread count asked for, in both
    return packed, torch.randn(1, *genotype.input)


def measure(name: str, int8: bool, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    packed, x = packed_network(name, int8)
    torch.set_num_threads(threads)
    with torch.no_grad():
        packed(x)  # lowers the plan and runs it in Python: the runner takes this layout from now on
        program = packed.program(backend(x.device))
        if program is None or not program.native:
            raise SystemExit(f"{name}: no program to replay in C++ on this CPU ({backend(x.device)})")

        def run(native: bool) -> Any:
            def call() -> torch.Tensor:
                program.native_enabled = native
                return packed(x)

            return call

        outputs = [run(False)(), run(True)()]
        load_start = load_average()
        times = interleaved_times({"python": run(False), "runner": run(True)}, args.repeats, untimed=3)
        load_end = load_average()
    (base, base_p90), (ours, ours_p90) = median_p90(times["python"]), median_p90(times["runner"])
    return {
        "benchmark": "program_runner",
        "genotype": name,
        "input": list(x.shape[1:]),
        "precision": "int8 stem on a pixel grid, shortcuts and head" if int8 else "float32",
        "threads": threads,
        "baseline": "the lowered program, each kernel call and PyTorch op made from Python (native_enabled = False)",
        "ours": "the same calls replayed in C++ (ProgramRunner)",
        "baseline_ms": round(base * 1e3, 4),
        "ours_ms": round(ours * 1e3, 4),
        "ratio": round(base / ours, 3),
        "saved_ms": round((base - ours) * 1e3, 4),
        "p90_ms": {"baseline": round(base_p90 * 1e3, 4), "ours": round(ours_p90 * 1e3, 4)},
        "outputs_identical": bool(torch.equal(outputs[0], outputs[1])),
        "route": backend(x.device),
        "load_average_1min": [load_start, load_end],
        "repeats": args.repeats,
        "machine": {k: v for k, v in machine().items() if k != "threads"},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", choices=sorted(NETWORKS), help="Bi-Real ResNet-18 inputs (default: both)"
    )
    parser.add_argument("--genotypes", nargs="+", default=[], help="shipped genotypes to time in float32")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--backend", help="a CPU code path of this machine (default: its fastest)")
    args = parser.parse_args(argv)
    if args.backend is not None and args.backend not in cpu_backend.supported_backends():
        parser.error(f"--backend: {args.backend} is not one of {', '.join(cpu_backend.supported_backends())}")
    for name in args.genotypes:
        if not (GENOTYPES / f"{name}.yaml").is_file():
            parser.error(f"--genotypes: no {name}.yaml in {GENOTYPES}")
    sizes = args.sizes if args.sizes is not None else ([] if args.genotypes else sorted(NETWORKS))
    precisions = [False, True] if cpu_backend.int8_supported() and args.backend in (None, "cpu-avx512") else [False]
    runs = [(NETWORKS[size], int8) for size in sizes for int8 in precisions]
    with use_backend(args.backend or backend()):
        for name, int8 in [*runs, *((name, False) for name in args.genotypes)]:
            for threads in args.threads:
                emit(measure(name, int8, threads, args))


if __name__ == "__main__":
    main()
