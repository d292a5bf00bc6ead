"""Grouped binary convs of small groups on float maps against the packed path, and the networks
they serve.

    python benchmarks/grouped_conv.py [--threads 1] [--repeats 60] [--no-network] [--backend cpu-avx2]

DARTS's ``sep_conv`` and ``dil_conv`` are depthwise convs (one channel a group) followed by
1x1 convs; EBNAS's cells have grouped convs of 4 and 8 channels a group. On the packed path
each group's few bits sit in a 32-bit word of their own. ``cpu_backend.grouped_conv_call``
reads the float map instead, output channels in SIMD lanes. For each such shape of
``darts_v2_binary`` and ``ebnas_cifar10`` (batch 1, 32x32 CIFAR input), baseline = the packed
path as a plan step on float input makes it (``pack_signs`` by groups, then
``conv2d_packed_fused`` with scale and bias), ours = ``grouped_conv_fused`` on the same map.
Both run interleaved in rounds (``common.interleaved_times``), and each line says whether the
outputs are equal bit for bit. With the networks (the default), one more line each times the
packed network (random BatchNorm statistics, batch 1) against its float model as built.

``--backend`` runs another CPU code path this machine has (``cpu-avx2``: its float-map kernel
has 8 lanes). Prints one JSON line per shape, network and thread count: medians and p90 in ms, the ratio
baseline / ours, and the load average before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit, interleaved_times, load_average, machine, median_p90  # noqa: E402
from packed_model import randomize_batchnorm  # noqa: E402

import bnas  # noqa: E402
from bnas.export import pack_model  # noqa: E402
from bnas.kernels import backend, cpu_backend, use_backend  # noqa: E402
from bnas.kernels.packing import pack_weights_reference  # noqa: E402

# (network or None, channels, groups, map size, geometry (kh, kw, sh, sw, ph, pw, dh, dw))
SHAPES = [
    ("darts_v2_binary", 36, 36, 32, (3, 3, 1, 1, 1, 1, 1, 1)),
    ("darts_v2_binary", 36, 36, 32, (3, 3, 2, 2, 1, 1, 1, 1)),
    ("darts_v2_binary", 72, 72, 16, (3, 3, 1, 1, 1, 1, 1, 1)),
    ("darts_v2_binary", 144, 144, 8, (3, 3, 1, 1, 1, 1, 1, 1)),
    ("darts_v2_binary", 36, 36, 32, (5, 5, 1, 1, 2, 2, 1, 1)),
    ("darts_v2_binary", 36, 36, 32, (3, 3, 1, 1, 2, 2, 2, 2)),
    ("ebnas_cifar10", 56, 14, 32, (3, 3, 1, 1, 1, 1, 1, 1)),
    ("ebnas_cifar10", 56, 14, 32, (5, 5, 1, 1, 2, 2, 1, 1)),
    ("ebnas_cifar10", 56, 14, 32, (3, 3, 1, 1, 2, 2, 2, 2)),
    ("ebnas_cifar10", 112, 14, 16, (3, 3, 1, 1, 1, 1, 1, 1)),
    ("ebnas_cifar10", 224, 14, 8, (3, 3, 1, 1, 1, 1, 1, 1)),  # 16 channels a group: stays packed in networks
    (None, 64, 4, 32, (3, 3, 1, 1, 1, 1, 1, 1)),  # 16 channels a group
]
NETWORKS = ["darts_v2_binary", "ebnas_cifar10"]


def _record(name: str, base: list[float], ours: list[float], identical: bool, loads: list[float]) -> dict[str, Any]:
    (b, b90), (o, o90) = median_p90(base), median_p90(ours)
    return {
        "baseline_ms": round(b * 1e3, 4),
        "ours_ms": round(o * 1e3, 4),
        "ratio": round(b / o, 3),
        "p90_ms": {"baseline": round(b90 * 1e3, 4), "ours": round(o90 * 1e3, 4)},
        "outputs_identical": identical,
        "load_average_1min": loads,
        "benchmark": "grouped_conv",
        "case": name,
    }


def measure_shape(
    channels: int, groups: int, size: int, geometry: tuple[int, ...], threads: int, repeats: int
) -> dict[str, Any]:
    route = backend(torch.device("cpu"))
    generator = torch.Generator().manual_seed(channels + size)
    x = torch.randn(1, channels, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    per_group = channels // groups
    wp = pack_weights_reference(torch.randn(channels, per_group, *geometry[:2], generator=generator), groups)
    scale, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    call, head, tail = cpu_backend.grouped_conv_call(wp, per_group, geometry, scale, bias, route)
    lanes = cpu_backend.lane_weights(wp, groups, route)
    static = (channels, channels, *geometry, groups, scale, bias)
    conv, conv_head, conv_tail = cpu_backend.fused_conv_call(lanes, static, route)
    pack = cpu_backend.pack_signs_call(route)

    def packed_path() -> Any:
        return conv(pack(x, groups, threads), *conv_head, None, True, False, False, *conv_tail, threads)

    def on_float_map() -> Any:
        return call(x, *head, None, True, False, False, *tail, threads)

    identical = bool(torch.equal(packed_path()[0], on_float_map()[0]))
    start = load_average()
    times = interleaved_times({"packed": packed_path, "float map": on_float_map}, repeats)
    record = _record(
        f"{channels}x{size}x{size}, {groups} groups, {geometry[0]}x{geometry[1]}/{geometry[2]}, dilation {geometry[6]}",
        times["packed"], times["float map"], identical, [start, load_average()],
    )  # fmt: skip
    record.update(
        baseline="pack_signs by groups + conv2d_packed_fused (the packed path)",
        ours="grouped_conv_fused on the float map",
        threads=threads,
        route=route,
    )
    return record


def measure_network(name: str, threads: int, repeats: int) -> dict[str, Any]:
    genotype = bnas.load_genotype(ROOT / "search_spaces" / "genotypes" / f"{name}.yaml")
    torch.manual_seed(0)
    model = bnas.build(genotype).eval()
    randomize_batchnorm(model)
    packed = pack_model(model)
    packed.adaptive_threads = False
    x = torch.randn(1, *genotype.input)
    with torch.no_grad():
        packed(x)
        program = packed.program(backend(x.device))
        on_map = sum(getattr(i, "on_float_map", False) for i in program._instructions) if program else 0
        start = load_average()
        times = interleaved_times({"float": lambda: model(x), "packed": lambda: packed(x)}, repeats)
        same_class = bool(torch.equal(model(x).argmax(1), packed(x).argmax(1)))
    record = _record(f"{name}, 1x3x32x32", times["float"], times["packed"], same_class, [start, load_average()])
    del record["outputs_identical"]  # float and packed differ by float rounding; the class must not
    record.update(
        baseline="the float model as built (eval mode)",
        ours=f"the packed network (its program, {on_map} grouped steps on float maps)",
        threads=threads,
        same_class=same_class,
        route=backend(x.device),
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--no-network", action="store_true", help="only the per-shape kernels")
    parser.add_argument("--backend", help="a CPU code path of this machine (default: its fastest)")
    args = parser.parse_args(argv)
    if not cpu_backend.supported_backends():
        raise SystemExit("no CPU kernel extension: nothing to time")
    if args.backend is not None and args.backend not in cpu_backend.supported_backends():
        parser.error(f"--backend: {args.backend} is not one of {', '.join(cpu_backend.supported_backends())}")
    with use_backend(args.backend or backend()):
        return run(args)


def run(args: argparse.Namespace) -> int:
    for threads in args.threads:
        torch.set_num_threads(threads)
        for network, channels, groups, size, geometry in SHAPES:
            record = measure_shape(channels, groups, size, geometry, threads, args.repeats)
            record.update(network=network, channels_per_group=channels // groups)
            record["machine"] = {k: v for k, v in machine().items() if k != "threads"}
            emit(record)
        for name in [] if args.no_network else NETWORKS:
            record = measure_network(name, threads, max(5, args.repeats // 6))
            record["machine"] = {k: v for k, v in machine().items() if k != "threads"}
            emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
