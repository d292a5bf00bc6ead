"""Latency of a packed network (``bnas.export.pack_model``) against its float model and LCE.

    python benchmarks/packed_model.py --device cpu  [--sizes 32 224] [--threads 1] [--lce-python PY]
    python benchmarks/packed_model.py --device cpu  --genotype G.yaml
    python benchmarks/packed_model.py --device cuda [--batch 256 1]

CPU (issues 5 and 15): Bi-Real ResNet-18 at 32x32 (``bireal_resnet18.yaml``) and 224x224
(``bireal_resnet18_imagenet.yaml``), ``--sizes`` choosing; ``--genotype`` times one other
network instead. Batch 1 by default. Engines: ``built`` = the float model as built and trained
(``bnas.build``, eval mode, float32: binary convs simulated with float convs on signs);
``packed`` (ours) = the packed model on the XNOR-popcount kernels; ``frozen`` = the float twin
with the same BN folding and materialised weights (``bnas.export.freeze_model``), the best a
float deployment of this network does with plain PyTorch; and, with ``--lce-python`` (default:
``$BNAS_LCE_PYTHON``), Larq Compute Engine running the same network built in larq Keras
(``benchmarks/lce_worker.py``, run in that Python as a subprocess; its binary and float MAC
counts are checked against bnas's). Timing is interleaved in rounds: each round gives every
engine in turn (rotating order) one untimed call and ``--block`` timed calls, so all engines
see the same machine load and are timed in the same steady state; figures are the median and
p90 over ``--repeats`` calls per engine.

Every CPU line carries a per-part profile of the packed model (forward hooks on every module
call): ``binary`` (the outermost modules whose class name starts with ``Packed``), ``float``
(every other leaf module but ``nn.Identity``: convs, pools, BN, linear) and ``other`` (the rest
of the call: Python, residual adds, glue), with the top float modules; ``--profile`` adds a
torch.profiler table to stderr. The targets of issue 15 are fields, next to ``meets_*`` booleans computed
from the measured figures.

``int8_stem`` (CPUs with AVX-512 VNNI): a second packed copy with
``stem_precision = "int8"`` (the convs on the image in 8-bit integers, opt-in: it changes the
numbers), timed in the same rounds, with its own ratios, profile and logit difference from the
float32-stem packed model; ``int8_stem_shortcuts``: a third with ``shortcut_precision = "int8"``
as well (the 1x1 shortcut convs in 8-bit integers; networks that have them); ``int8_all``: a
fourth with ``head_precision = "int8"`` too (the classifier in 8-bit integers where it has
``bnas.export.plan.INT8_HEAD_MIN_MACS`` multiply-adds a row: ResNet's 512 -> 1000 head, not the
32x32 network's 512 -> 10, which stays float32);
``int8_all_grid``: a fifth, ``int8_all`` with its stem quantizing on a fixed pixel grid
(``PackedNetwork.input_grid``) instead of each image's range. On CPUs with
AMX-INT8 their int8 layers run on AMX tiles (``int8_unit``). The issue's ``meets_*`` fields
stay those of the default model.

``--peak`` (CPUs with AVX-512 VNNI) first measures one core's float32 FMA and int8 VNNI peaks
(``benchmarks/cpu_peak.py``'s loops) and adds ``float_share_floor``: the float share each
model would have if every float MAC ran at a peak (the packed model: the FMA peak; the int8
twins: the VNNI peak, the faster) and nothing else cost time, beside the binary layers'
measured time. With ``--threads N`` the float work gets N cores' peaks. No kernel can do
better on this CPU, so a floor above the target says the target is out of this CPU's reach (the int8 twins' floor is left out where they run on AMX,
whose peak is not measured).

CUDA (issue 7): baseline = the float model in float16, channels_last, ``cudnn.benchmark`` on;
ours = the packed model on the GPU kernels; CUDA events after warm-up (``cuda_time`` of
``benchmarks/cuda_xnor_conv.py``); batch 256 and 1 by default.

Prints one JSON line per network and batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit, interleaved_times, machine, median_p90  # noqa: E402
from cpu_peak import measure_peaks  # noqa: E402

import bnas  # noqa: E402
from bnas.errors import BnasError  # noqa: E402
from bnas.export import freeze_model, pack_model  # noqa: E402
from bnas.export.plan import ChannelsLastPointwiseConv2d, ImageConv2d, ImageConvMaxPool2d, KernelLinear  # noqa: E402
from bnas.kernels import backend, cpu_backend  # noqa: E402
from bnas.metrics import summarize  # noqa: E402

GENOTYPES = ROOT / "search_spaces" / "genotypes"
SIZES = {32: GENOTYPES / "bireal_resnet18.yaml", 224: GENOTYPES / "bireal_resnet18_imagenet.yaml"}
# The worker's layout for each of the networks; other genotypes have no LCE twin.
LCE_LAYOUTS = {SIZES[32].resolve(): "cifar", SIZES[224].resolve(): "imagenet"}
WORKER = Path(__file__).resolve().parent / "lce_worker.py"
LCE_ENV = "BNAS_LCE_PYTHON"
LCE_MISSING = f"not installed (pass --lce-python PATH or set ${LCE_ENV} to a Python with larq-compute-engine)"
# Issue 15's targets, per input size: packed vs frozen and vs LCE (speed-up, at least), and
# the share of the packed time outside the binary layers (at most).
TARGETS: dict[int, dict[str, float | None]] = {
    32: {"ratio_vs_frozen": 8.0, "ratio_vs_lce": 4.0, "float_share": None},
    224: {"ratio_vs_frozen": 8.0, "ratio_vs_lce": 2.5, "float_share": 0.25},
}
WORKER_SETUP_S = 600.0  # TensorFlow import + conversion: ~15 s on an idle 2-core machine
WORKER_CALL_S = 5.0  # per timed call, on top of a fixed allowance


class BenchmarkError(BnasError):
    """A flag or environment this benchmark cannot run with."""


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics, as a trained network has (a fresh BN is the
    identity, which would hide the cost of nothing but also the folding)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            assert m.running_var is not None
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)


class LceWorker:
    """``benchmarks/lce_worker.py`` in another Python, spoken to over its line protocol."""

    def __init__(self, python: str, layout: str, threads: int, indirect_bgemm: bool = True, xnnpack: bool = False):
        self.python, self.layout = python, layout
        self.name = "LCE " + ("indirect BGEMM" if indirect_bgemm else "default path") + " + XNNPack" * xnnpack
        env = {
            **os.environ,
            "TF_USE_LEGACY_KERAS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "OMP_NUM_THREADS": str(threads),
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": "1",
        }
        cmd = [python, str(WORKER), "--layout", layout, "--threads", str(threads)]
        if not indirect_bgemm:
            cmd.append("--no-indirect-bgemm")
        if xnnpack:
            cmd.append("--xnnpack")
        # stderr to a file: TensorFlow's chatter must never fill a pipe nobody reads.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
            )
        except OSError as exc:
            self.stderr.close()
            raise BenchmarkError(
                f"--lce-python {python}: cannot run it ({exc.strerror}); pass the python of an environment "
                "with larq-compute-engine (pip install 'bnas[lce]'), or leave the flag out to skip LCE"
            ) from exc
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        """The worker's first line (MAC counts, flatbuffer size and ops), once set up."""
        if not self.info:
            self.info = self._reply(WORKER_SETUP_S)
        return self.info

    def time(self, calls: int) -> list[float]:
        """Seconds of each of ``calls`` single-image calls."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"time {calls}\n")
        self.proc.stdin.flush()
        times = self._reply(60.0 + WORKER_CALL_S * calls)["times"]
        return [float(t) for t in times]

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.proc.kill()
            self.proc.wait()
            raise BenchmarkError(
                f"--lce-python {self.python}: the LCE worker ({WORKER.name} --layout {self.layout}) "
                + (f"gave no answer in {timeout:.0f} s" if not ready else f"exited ({self.proc.returncode})")
                + f"; its last message: {self._stderr_tail()}"
            )
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise BenchmarkError(
                f"--lce-python {self.python}: the LCE worker answered {line.strip()[:200]!r}, not a JSON line; "
                f"is {WORKER} the worker of this bnas checkout?"
            ) from exc
        if "error" in reply:
            raise BenchmarkError(
                f"--lce-python {self.python}: the LCE worker failed: {reply['error']}; pass the python of an "
                "environment with tensorflow-cpu 2.16, tf-keras, larq and larq-compute-engine (pip install 'bnas[lce]')"
            )
        return reply

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(none)"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None and not stream.closed:
                stream.close()


def timed_rounds(
    fns: dict[str, Callable[[], Any]], workers: dict[str, LceWorker], repeats: int, block: int
) -> dict[str, list[float]]:
    """Seconds per call of every engine, about ``repeats`` samples each (whole blocks).

    Each round gives every engine, torch functions and LCE workers alike, in a rotating order,
    one untimed call and then ``block`` timed calls in a row: all engines are timed in the
    same steady state (none right after another engine filled the cache with its weights)
    and under the same load."""
    engines: dict[str, Callable[[int], list[float]]] = {}
    for name, fn in fns.items():
        for _ in range(3):  # warm-up
            fn()
        # interleaved_times on one function: one untimed call, then single timed calls
        engines[name] = partial(lambda f, n: interleaved_times({"f": f}, n, warmup=0, burst_seconds=0.0)["f"], fn)
    for name, worker in workers.items():
        worker.time(3)  # warm-up
        engines[name] = partial(lambda w, n: w.time(n + 1)[1:], worker)
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(math.ceil(repeats / block)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += engines[name](block)
    return times


def part_profile(packed: torch.nn.Module, x: torch.Tensor, calls: int, top: int = 5) -> dict[str, Any]:
    """Where a packed call's time goes, from forward hooks on every module call.

    ``binary`` = the outermost called modules whose class name starts with ``Packed`` (a
    fused step holding a ``PackedConv2d`` counts once); ``float`` = every other called leaf
    module outside them but ``nn.Identity`` (a no-op: its call cost is glue); ``other`` = the
    hook-free call time minus both: Python, residual adds, layout glue. The hooks are global
    (``register_module_forward_hook``), so modules of an execution plan kept outside the
    module tree are seen too, and the steps and float kernels a lowered program
    (``bnas.export.program``) calls directly, which are not module calls, through its
    ``call_timer``. Calls come in pairs, one
    without hooks (the real time), one with them (the parts); the faster half of each is kept
    (load spikes dropped) and averaged.
    The hooks' own cost is ``hook_overhead_ms``, left out of the parts."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {m: name for name, m in packed.named_modules()}
    plan = packed.plan() if hasattr(packed, "plan") else None
    if plan is not None:  # modules the fused plan adds (steps, the channels_last pool)
        names.update({m: f"plan.{name}" for name, m in plan.named_modules() if m not in names and name})
    stack: list[tuple[torch.nn.Module, float, str | None]] = []  # module, start, its part if timed
    spent: dict[torch.nn.Module, float] = {}
    kind: dict[torch.nn.Module, str] = {}

    def pre(mod: torch.nn.Module, inp: Any) -> None:
        inside_binary = any(part == "binary" for _, _, part in stack)
        part = None
        if not inside_binary and mod is not packed:  # the root (PackedNetwork) is the whole call
            if type(mod).__name__.startswith("Packed"):
                part = "binary"
            elif not isinstance(mod, torch.nn.Identity) and next(mod.children(), None) is None:
                part = "float"
        stack.append((mod, time.perf_counter(), part))

    def post(mod: torch.nn.Module, inp: Any, out: Any) -> None:
        end = time.perf_counter()
        while stack:
            top_mod, start, part = stack.pop()
            if top_mod is mod:
                if part is not None:
                    spent[mod] = spent.get(mod, 0.0) + end - start
                    kind[mod] = part
                return

    def call_time(module: torch.nn.Module, seconds: float) -> None:
        # a step or float kernel the lowered program calls directly: no module call for the
        # hooks to see (an input it was not bound for goes through the module, and the hooks
        # timed that already)
        if module not in spent:
            spent[module] = seconds
            kind[module] = "binary" if type(module).__name__.startswith("Packed") else "float"

    samples = []
    with torch.no_grad():
        for _ in range(3):
            packed(x)
        program = None
        if getattr(packed, "lowered", False) and x.device.type == "cpu":
            program = packed.program(backend(x.device))
        for _ in range(calls):
            t0 = time.perf_counter()
            packed(x)
            plain = time.perf_counter() - t0
            hooks = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
            spent.clear()
            stack.clear()
            if program is not None:
                program.call_timer = call_time
            try:
                t0 = time.perf_counter()
                packed(x)
                hooked = time.perf_counter() - t0
            finally:
                for h in hooks:
                    h.remove()
                if program is not None:
                    program.call_timer = None
            samples.append((plain, hooked, dict(spent)))
    half = max(1, (len(samples) + 1) // 2)
    # The faster half of the hooked calls gives the parts, the faster half of the plain
    # calls the total: a load spike in either call of a pair drops only that call.
    kept = sorted(samples, key=lambda s: s[1])[:half]
    plain_kept = sorted(s[0] for s in samples)[:half]

    def mean_ms(values: Sequence[float]) -> float:
        return statistics.fmean(values) * 1e3

    total = mean_ms(plain_kept)
    hooked_total = mean_ms([s[1] for s in kept])
    per_module = {m: mean_ms([s[2].get(m, 0.0) for s in kept]) for m in kind}
    binary = sum(t for m, t in per_module.items() if kind[m] == "binary")
    real = sum(t for m, t in per_module.items() if kind[m] == "float")
    other = total - binary - real
    floats = sorted((m for m in kind if kind[m] == "float"), key=lambda m: -per_module[m])
    by_type: dict[str, float] = {}
    for m in floats:
        by_type[type(m).__name__] = by_type.get(type(m).__name__, 0.0) + per_module[m]
    return {
        "calls": calls,
        "calls_kept": len(kept),
        "total_ms": round(total, 4),
        "binary_ms": round(binary, 4),
        "float_ms": round(real, 4),
        "other_ms": round(other, 4),
        "binary_share": round(binary / total, 3),
        "float_share": round((real + other) / total, 3),
        "hooked_total_ms": round(hooked_total, 4),
        "hook_overhead_ms": round(hooked_total - total, 4),
        "binary_modules": len(kind) - len(floats),
        "float_modules": len(floats),
        "float_ms_by_type": {k: round(v, 4) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
        "top_float": [
            {"module": names.get(m, "?"), "type": type(m).__name__, "ms": round(per_module[m], 4)} for m in floats[:top]
        ],
    }


def network_targets(genotype_path: Path, size: int) -> dict[str, float | None]:
    """Issue 15's targets for the two Bi-Real ResNet-18s; none for other networks."""
    if genotype_path.resolve() in LCE_LAYOUTS and size in TARGETS:
        return TARGETS[size]
    return {"ratio_vs_frozen": None, "ratio_vs_lce": None, "float_share": None}


def share_floors(
    peaks: dict[str, dict[str, float]], float_macs: int, record: dict[str, Any], target: float | None, cores: int = 1
) -> dict[str, Any]:
    """``float_share_floor`` of the packed model (float32: the FMA peak) and of its int8 twins
    that run on VNNI (the VNNI peak, as if every float MAC were in int8), the float work
    spread over ``cores`` cores at one core's peak each."""
    floors: dict[str, Any] = {"peaks_gmacs": {name: peak["gmacs"] for name, peak in peaks.items()}, "cores": cores}
    fma, vnni = peaks["float32_fma"]["gmacs"] * cores, peaks["int8_vnni"]["gmacs"] * cores
    floors["packed"] = float_share_floor(float_macs, fma, record["profile"]["binary_ms"], target)
    for name in INT8_TWINS:
        twin = record.get(name)
        if not isinstance(twin, dict):
            continue
        if twin["int8_unit"] != "vnni":
            floors[name] = "runs on AMX, whose peak is not measured"
            continue
        binary_ms = twin["profile"]["binary_ms"]
        floors[name] = float_share_floor(float_macs, vnni, binary_ms, target)
    return floors


def float_share_floor(float_macs: int, gmacs: float, binary_ms: float, target: float | None) -> dict[str, Any]:
    """The float share if all ``float_macs`` ran at ``gmacs`` and took no other time, beside
    ``binary_ms`` of binary layers: a lower bound on the measured share of the same model."""
    float_ms = float_macs / (gmacs * 1e9) * 1e3
    share = float_ms / (float_ms + binary_ms)
    return {
        "float_ms_at_peak": round(float_ms, 4), "binary_ms": binary_ms, "share": round(share, 3),
        "target_reachable": None if target is None else share <= target,
    }  # fmt: skip


def meets(value: float | None, target: float | None, at_least: bool = True) -> bool | None:
    if value is None or target is None:
        return None
    return value >= target if at_least else value <= target


def run_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    peaks = None
    if args.peak:
        if not cpu_backend.int8_supported():
            raise BenchmarkError("--peak measures AVX-512 VNNI, which this CPU lacks; run without --peak")
        peaks = measure_peaks()
    for genotype_path in args.genotypes:
        genotype = bnas.load_genotype(genotype_path)
        size = int(genotype.input[-1])
        layout = LCE_LAYOUTS.get(genotype_path.resolve())
        workers: dict[str, LceWorker] = {}
        lce_note: str | None = None
        try:
            if not args.lce_python:
                lce_note = LCE_MISSING
            elif layout is None:
                lce_note = "no LCE twin of this genotype (lce_worker.py builds the two Bi-Real ResNet-18s only)"
            else:
                # Started first: TensorFlow's import and the conversion overlap with building here.
                workers["lce"] = LceWorker(args.lce_python, layout, args.threads, xnnpack=args.lce_xnnpack)
                if args.lce_default:
                    workers["lce_default"] = LceWorker(
                        args.lce_python, layout, args.threads, indirect_bgemm=False, xnnpack=args.lce_xnnpack
                    )
            run_network(args, genotype_path, genotype, size, workers, lce_note, peaks)
        finally:
            for worker in workers.values():
                worker.close()


def run_network(
    args: argparse.Namespace,
    genotype_path: Path,
    genotype: bnas.Genotype,
    size: int,
    workers: dict[str, LceWorker],
    lce_note: str | None,
    peaks: dict[str, dict[str, float]] | None = None,
) -> None:
    torch.manual_seed(0)
    model = bnas.build(genotype).eval()
    randomize_batchnorm(model)
    packed = pack_model(model)
    frozen = freeze_model(model)
    twins = {name: int8_twin(model, parts) for name, (parts, _) in INT8_TWINS.items()}
    counts = summarize(model, genotype.input)
    macs = {"binary": counts.bops, "float": counts.flops}
    for worker in workers.values():
        worker.wait_ready()
    targets = network_targets(genotype_path, size)
    for batch in args.batch:
        x = torch.randn(batch, *genotype.input)
        with torch.no_grad():
            ref, out = model(x), packed(x)
            same_class = bool((ref.argmax(1) == out.argmax(1)).all())
            err = float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12))
        engines = {"built": partial(model, x), "packed": partial(packed, x), "frozen": partial(frozen, x)}
        for name, (twin, _) in twins.items():
            if twin is not None:
                engines[f"packed_{name}"] = partial(twin, x)
        # LCE runs batch 1 only: at other batches its figures would not compare.
        timed_workers = workers if batch == 1 else {}
        load_before = [round(v, 2) for v in os.getloadavg()]
        with torch.no_grad():
            times = timed_rounds(engines, timed_workers, args.repeats, args.block)
        load_after = [round(v, 2) for v in os.getloadavg()]
        ms = {name: [round(v * 1e3, 3) for v in median_p90(samples)] for name, samples in times.items()}
        base, ours, froz = ms["built"][0], ms["packed"][0], ms["frozen"][0]
        with torch.no_grad():
            parts = part_profile(packed, x, args.profile_calls)
        record: dict[str, Any] = {
            "benchmark": "packed_model", "device": "cpu", "genotype": genotype.name, "size": size, "batch": batch,
            "input": list(genotype.input), "macs": macs,
            "baseline": "float32 model (bnas.build, eval)", "ours": "packed (XNOR kernels)",
            "baseline_ms": base, "ours_ms": ours, "ratio": round(base / ours, 2),
            "frozen_ms": froz, "ratio_vs_frozen": round(froz / ours, 2),
            "p90_ms": {"baseline": ms["built"][1], "ours": ms["packed"][1], "frozen": ms["frozen"][1]},
        }  # fmt: skip
        ratio_vs_lce: float | None = None
        if not workers:
            record["lce"] = lce_note
        elif not timed_workers:
            record["lce"] = f"timed at batch 1 only (this line is batch {batch})"
        for name, worker in timed_workers.items():
            info = worker.wait_ready()
            same = info["binary_macs"] == macs["binary"] and info["float_macs"] == macs["float"]
            record[name] = {
                "engine": worker.name, "ms": ms[name][0], "p90_ms": ms[name][1],
                "binary_macs": info["binary_macs"], "float_macs": info["float_macs"], "same_macs_as_bnas": same,
                "tflite_bytes": info["tflite_bytes"], "ops": info.get("ops"), "threads": info["threads"],
                "xnnpack": info.get("xnnpack"),
                "versions": info.get("versions"), "setup_s": info.get("setup_s"),
            }  # fmt: skip
            record[f"{name}_ms"] = ms[name][0]
            record[f"ratio_vs_{name}"] = round(ms[name][0] / ours, 2)
            if not same:
                print(f"warning: the LCE network of {genotype.name} has {info['binary_macs']:,} binary + "
                      f"{info['float_macs']:,} float MACs, bnas's {macs['binary']:,} + {macs['float']:,}: "
                      "the two engines do not run the same network", file=sys.stderr)  # fmt: skip
        if "lce" in timed_workers:
            ratio_vs_lce = record["ratio_vs_lce"]
        record["profile"] = parts
        for name, (twin, note) in twins.items():
            if twin is None:
                record[name] = note
                continue
            with torch.no_grad():
                out_int8 = twin(x)
                int8_parts = part_profile(twin, x, args.profile_calls)
            int8_ms = ms[f"packed_{name}"][0]
            record[name] = {
                "engine": INT8_TWINS[name][1],
                "int8_unit": "amx" if cpu_backend.amx_int8_enabled() else "vnni",
                "ms": int8_ms, "p90_ms": ms[f"packed_{name}"][1],
                "ratio_vs_frozen": round(froz / int8_ms, 2),
                "ratio_vs_lce": round(ms["lce"][0] / int8_ms, 2) if "lce" in timed_workers else None,
                "ratio_vs_packed": round(ours / int8_ms, 2),
                "float_share": int8_parts["float_share"],
                "profile": int8_parts,
                "max_rel_logit_diff_vs_packed": float((out_int8 - out).abs().max() / out.abs().max().clamp_min(1e-12)),
                "same_class_as_packed": bool((out_int8.argmax(1) == out.argmax(1)).all()),
            }  # fmt: skip
        if peaks is not None:
            record["float_share_floor"] = share_floors(
                peaks, macs["float"], record, targets["float_share"], args.threads
            )
        record.update({
            "threads": args.threads,
            "load_average": {"before": load_before, "after": load_after},
            "load_average_1min": [load_before[0], load_after[0]],
            "target_ratio_vs_frozen": targets["ratio_vs_frozen"],
            "target_ratio_vs_lce": targets["ratio_vs_lce"],
            "target_float_share": targets["float_share"],
            "meets_ratio_vs_frozen": meets(record["ratio_vs_frozen"], targets["ratio_vs_frozen"]),
            "meets_ratio_vs_lce": meets(ratio_vs_lce, targets["ratio_vs_lce"]),
            "meets_float_share": meets(parts["float_share"], targets["float_share"], at_least=False),
            "max_rel_logit_diff": err, "same_class": same_class, "repeats": len(times["packed"]), "block": args.block,
            "backend": backend("cpu"), "machine": machine(),
        })  # fmt: skip
        emit(record)
        if args.profile:
            profile(packed, x)


# the int8 twins timed beside the packed model: record key -> (what runs in int8 besides the
# stem, the engine's description)
INT8_TWINS = {
    "int8_stem": ((), "packed, stem in int8 (PackedNetwork.stem_precision = 'int8'; opt-in)"),
    "int8_stem_shortcuts": (
        ("shortcuts",),
        "packed, stem and 1x1 shortcuts in int8 (stem_precision and shortcut_precision = 'int8'; opt-in)",
    ),
    "int8_all": (
        ("shortcuts", "head"),
        "packed, stem, 1x1 shortcuts and classifier in int8 (stem_, shortcut_ and head_precision = 'int8'; opt-in)",
    ),
    "int8_all_grid": (
        ("shortcuts", "head", "grid"),
        "packed, int8_all with the stem on a pixel grid (PackedNetwork.input_grid = INPUT_GRID; opt-in)",
    ),
}

#: the pixel grid of the int8_all_grid twin: 8-bit pixels p as (p - 127) * 8 / 255, which spans
#: the benchmark's normal inputs (it times the same work as any grid: no per-image range)
INPUT_GRID = (8 / 255, 127.0)


def int8_twin(model: torch.nn.Module, parts: tuple[str, ...]) -> tuple[Any, str | None]:
    """Another packed copy of ``model`` whose plan runs the image convs in int8, and the 1x1
    shortcut convs and the classifier where ``parts`` names them, or None and why not (no such
    layer, or no AVX-512 VNNI kernel: the reference would time PyTorch)."""
    if not cpu_backend.int8_supported():
        return None, "not timed: this CPU has no AVX-512 VNNI (the int8 kernels)"
    twin = pack_model(model)
    twin.stem_precision = "int8"
    if "shortcuts" in parts:
        twin.shortcut_precision = "int8"
    if "head" in parts:
        twin.head_precision = "int8"
    if "grid" in parts:
        twin.input_grid = INPUT_GRID
    plan = twin.plan()
    modules = list(plan.modules()) if plan is not None else []
    if not any(isinstance(m, (ImageConv2d, ImageConvMaxPool2d)) and m.precision == "int8" for m in modules):
        return None, "not timed: no float conv reads the image in this network's plan"
    if "shortcuts" in parts and not any(
        isinstance(m, ChannelsLastPointwiseConv2d) and m.precision == "int8" for m in modules
    ):
        return None, "not timed: no 1x1 float conv in this network's plan"
    # a head under INT8_HEAD_MIN_MACS stays float32 (the twin is then int8_stem_shortcuts' numbers)
    if "head" in parts and not any(isinstance(m, KernelLinear) for m in modules):
        return None, "not timed: no float linear layer in this network's plan"
    return twin, None


def profile(packed: torch.nn.Module, x: torch.Tensor) -> None:
    """The torch.profiler table of the packed model (stderr): the aten ops between the
    binary layers (the per-part split is in every JSON line)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    calls = 20
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function("packed_forward"):
                packed(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


def run_cuda(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise BenchmarkError(
            "packed_model.py --device cuda: torch sees no CUDA device here; run it on a machine with "
            "an NVIDIA GPU (sm_80 or newer for the tensor-core kernel), or use --device cpu"
        )
    from cuda_xnor_conv import cuda_time

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = backend(device)
    if name != "cuda-tensor-core":
        print(
            f"warning: the packed model runs on the {name!r} backend on this GPU, not the tensor-core kernel",
            file=sys.stderr,
        )
    for genotype_path in args.genotypes:
        genotype = bnas.load_genotype(genotype_path)
        torch.manual_seed(0)
        model = bnas.build(genotype).eval()
        randomize_batchnorm(model)
        packed = pack_model(model).to(device)
        half = bnas.build(genotype).eval()
        half.load_state_dict(model.state_dict())
        half = half.to(device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
        for batch in args.batch:
            x = torch.randn(batch, *genotype.input, device=device)
            xh = x.half().contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref, out = half(xh).float(), packed(x)
                agree = float((ref.argmax(1) == out.argmax(1)).float().mean())
                base = cuda_time(partial(half, xh), repeats=args.repeats)
                ours = cuda_time(partial(packed, x), repeats=args.repeats)
            emit({
                "benchmark": "packed_model", "device": "cuda", "genotype": genotype.name, "batch": batch,
                "input": list(genotype.input), "baseline": "float16 channels_last model (cudnn.benchmark)",
                "ours": "packed (XNOR kernels), float32 real layers",
                "baseline_ms": round(base * 1e3, 4), "ours_ms": round(ours * 1e3, 4), "ratio": round(base / ours, 2),
                "class_agreement_vs_fp16": agree, "repeats": args.repeats, "backend": name, "machine": machine(),
            })  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--sizes", type=int, nargs="+", choices=sorted(SIZES), default=sorted(SIZES),
        help="input sizes: 32 = bireal_resnet18.yaml, 224 = bireal_resnet18_imagenet.yaml (default both)",
    )  # fmt: skip
    p.add_argument("--genotype", type=Path, help="time this genotype YAML instead of --sizes' networks")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (cpu: 1; cuda: 256 1)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per engine")
    p.add_argument("--block", type=int, default=5, help="cpu: calls per engine per interleaved round")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads; LCE's num_threads)")
    p.add_argument(
        "--lce-python", default=os.environ.get(LCE_ENV),
        help=f"cpu: the Python of an environment with larq-compute-engine, to time LCE too (default ${LCE_ENV})",
    )  # fmt: skip
    p.add_argument("--lce-default", action="store_true", help="cpu: also time LCE's default binary conv path")
    p.add_argument("--lce-xnnpack", action="store_true", help="cpu: LCE runs its float ops on TFLite's XNNPack")
    p.add_argument("--profile-calls", type=int, default=30, help="cpu: packed calls of the per-part profile")
    p.add_argument("--profile", action="store_true", help="cpu: also print a torch.profiler table (stderr)")
    p.add_argument(
        "--peak", action="store_true",
        help="cpu: measure one core's FMA and VNNI peaks first and add float_share_floor, the float work at "
        "--threads cores' peaks (AVX-512 VNNI CPUs)",
    )  # fmt: skip
    args = p.parse_args(argv)
    for flag in ("repeats", "block", "threads", "profile_calls"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.batch is None:
        args.batch = [1] if args.device == "cpu" else [256, 1]
    args.genotypes = [args.genotype] if args.genotype else [SIZES[s] for s in dict.fromkeys(args.sizes)]
    (run_cpu if args.device == "cpu" else run_cuda)(args)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BnasError as exc:
        sys.exit(f"error: {exc}")
