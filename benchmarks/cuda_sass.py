"""Static SASS report of the CUDA XNOR conv kernel: a baseline revision against the working tree.

Issue 17's targets that need no GPU, measured on the compiled code of both kernels in one run:
the sources of ``bnas/kernels/cuda/`` at ``--baseline-rev`` (default d0fbc15, "today's" kernel)
are extracted with ``git archive`` into a temporary directory; both ``xnor_conv.cu`` are compiled
with nvcc (``-Xptxas -v``, the half/bfloat16 defines torch's extension build uses) and
disassembled with ``cuobjdump -sass``.  For every conv-kernel instantiation (and any other
kernel with BMMA instructions) it reports:

* registers, spill stores / loads and stack frame bytes (from ``-Xptxas -v``);
* the main loop: the range [branch target, backward branch] of the backward branch whose range
  holds the most BMMA (the innermost among equal counts); its instruction count, BMMA count,
  instructions per BMMA, IMAD.MOV* and MOV counts, LDS and LDSM counts; BMMA outside it;
* the epilogue: the instructions after the main loop's backward branch to the end of the
  function, without the trailing ``BRA`` to itself and NOP padding (count and bytes).

Output, JSON lines: one per kernel per version (``"version": "baseline"`` / ``"ours"``), one
``"compare"`` line per kernel present in both (paired by the BMxBN/WMxWN/VW label) with the
ratios and the targets (instructions per BMMA <= 60 % of the baseline's, no IMAD.MOV in the
main loop, no spills, epilogue at most half the baseline's), then one ``"summary"`` line.

    python benchmarks/cuda_sass.py [--baseline-rev d0fbc15] [--arch sm_90a] [--nvcc PATH]
                                   [--cuobjdump PATH] [--source-dir bnas/kernels/cuda]

Exit status 2 (one line on stderr) when nvcc or cuobjdump is missing or the revision is unknown.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = "bnas/kernels/cuda"
KERNEL_SOURCE = "xnor_conv.cu"
DEFAULT_REV = "d0fbc15"
DEFAULT_ARCH = "sm_90a"
# torch.utils.cpp_extension compiles .cu files with these (its COMMON_NVCC_FLAGS; checked in
# tests/test_cuda_sass.py)
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
CONV_TILE_PARAMS = ("BM", "BN", "WM", "WN", "BKW", "STAGES", "VW")
PAIR_PARAMS = ("BM", "BN", "WM", "WN", "VW")
CONV_KERNEL_MARK = "xnor_conv_kernel"

# issue 17's static targets
MAX_INSTR_PER_BMMA_RATIO = 0.60
MAX_EPILOGUE_RATIO = 0.5


class ToolError(RuntimeError):
    """A missing tool or an unknown revision: the script exits 2 with this one-line message."""


class CompileError(RuntimeError):
    """nvcc or cuobjdump failed on a kernel source: the script exits 1."""


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Instr:
    """One SASS instruction as cuobjdump prints it."""

    addr: int
    opcode: str  # with modifiers, e.g. "IMAD.MOV.U32"
    operands: str = ""
    predicate: str = ""  # "" or e.g. "@!P0"

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def branch_target(self) -> int | None:
        """The target address of a direct branch (BRA*), else None."""
        if self.base != "BRA":
            return None
        targets = re.findall(r"0x([0-9a-fA-F]+)", self.operands)
        return int(targets[-1], 16) if targets else None


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+\{?\s*(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNCTION_LINE = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse_sass_line(line: str) -> Instr | None:
    """The instruction on a cuobjdump ``-sass`` line, or None (encoding-only and header lines)."""
    m = _SASS_LINE.match(line)
    if m is None:
        return None
    return Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), (m.group(2) or "").strip())


def split_functions(sass: str) -> dict[str, list[Instr]]:
    """cuobjdump ``-sass`` text -> {mangled function name: instructions in address order}."""
    functions: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in sass.splitlines():
        fm = _FUNCTION_LINE.match(line)
        if fm is not None:
            name = fm.group(1)
            # a name seen twice (several ELF images in one object) keeps its first body
            current = None if name in functions else functions.setdefault(name, [])
            continue
        if current is None:
            continue
        ins = parse_sass_line(line)
        if ins is not None:
            current.append(ins)
    return functions


def parse_ptxas_info(text: str) -> dict[str, dict[str, int]]:
    """``-Xptxas -v`` output -> {mangled name: registers, barriers, stack_frame, spill_stores,
    spill_loads}.  "Used N registers" belongs to the last "Compiling entry function"; the stack
    line belongs to the last "Function properties for"."""
    info: dict[str, dict[str, int]] = {}
    entry = props = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            entry = m.group(1)
            info.setdefault(entry, {})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props is not None:
            info.setdefault(props, {}).update(
                stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
            continue
        m = re.search(r"Used (\d+) registers(?:, used (\d+) barriers)?", line)
        if m and entry is not None:
            info[entry]["registers"] = int(m.group(1))
            if m.group(2) is not None:
                info[entry]["barriers"] = int(m.group(2))
    return info


def demangle(names: Sequence[str], cxxfilt: str | None = None) -> dict[str, str]:
    """{mangled: demangled} with c++filt; a name c++filt cannot demangle (or no c++filt) maps to itself."""
    cxxfilt = cxxfilt or shutil.which("c++filt") or shutil.which("cu++filt")
    if not names or cxxfilt is None:
        return {n: n for n in names}
    proc = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, check=False)
    out = proc.stdout.splitlines()
    if proc.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out, strict=True))


def _short_name(demangled: str) -> str:
    """``void ns::f<ns::T<1, 2> >(ns::Args)`` -> ``f<T<1, 2> >``: no return type, namespaces or arguments."""
    s = re.sub(r"\b[A-Za-z_]\w*::", "", demangled)
    s = re.sub(r"^void\s+", "", s)
    depth = 0
    for i, ch in enumerate(s):  # cut at the first "(" outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return s[:i]
    return s


def template_params(name: str) -> dict[str, int]:
    """Integer template parameters of a kernel name (demangled; a mangled name as fallback).

    ``ConvTile<128, 128, 64, 64, 16, 3, 4>`` -> BM, BN, WM, WN, BKW, STAGES, VW (more arguments
    become p7, p8, ...; ``true``/``false`` count as 1/0); another all-integer template argument
    list -> p0, p1, ...; none -> {}."""
    lists = [(m.group(1), m.group(2)) for m in re.finditer(r"(\w+)<([^<>]*)>", name)]
    if not lists and name.startswith("_Z"):  # not demangled: integer literals L<type><n>E
        ints = [int(v.replace("n", "-")) for v in re.findall(r"L[a-z](n?\d+)E", name)]
        names = CONV_TILE_PARAMS if "ConvTile" in name else ()
        return {(names[i] if i < len(names) else f"p{i}"): v for i, v in enumerate(ints)}
    for tname, args in lists:
        parts = [{"true": "1", "false": "0"}.get(a.strip(), a.strip()) for a in args.split(",")]  # bools as 1/0
        if not parts or not all(re.fullmatch(r"-?\d+[uUlL]*", p) for p in parts):
            continue
        ints = [int(re.sub(r"[uUlL]+$", "", p)) for p in parts]
        names = CONV_TILE_PARAMS if tname == "ConvTile" else ()
        return {(names[i] if i < len(names) else f"p{i}"): v for i, v in enumerate(ints)}
    return {}


def kernel_label(demangled: str) -> tuple[str, str | None]:
    """(short label, pairing key).  A ConvTile kernel: ``128x128/64x64/vw4`` (plus ``/pN=v`` for
    template parameters beyond the seven known ones), paired by BM, BN, WM, WN, VW; any other
    kernel: its short name, paired by that name."""
    params = template_params(demangled)
    if all(k in params for k in PAIR_PARAMS):
        key = "{BM}x{BN}/{WM}x{WN}/vw{VW}".format(**params)
        extra = [f"{k}={v}" for k, v in params.items() if k not in CONV_TILE_PARAMS]
        return "/".join([key, *extra]), key
    short = _short_name(demangled)
    return short, short


def find_main_loop(instrs: Sequence[Instr]) -> tuple[int, int] | None:
    """Indices (first, last) of the main loop: the backward branch (target below its own address)
    whose [target, branch] range holds the most BMMA, the innermost (shortest) among equal
    counts.  None when no backward branch encloses a BMMA."""
    addrs = [ins.addr for ins in instrs]
    is_bmma = [ins.base == "BMMA" for ins in instrs]
    best: tuple[int, int, int, int] | None = None  # (bmma, -length, first, last)
    for last, ins in enumerate(instrs):
        target = ins.branch_target
        if target is None or target >= ins.addr:
            continue
        first = next((i for i, a in enumerate(addrs) if a >= target), None)
        if first is None or first > last:
            continue
        cand = (sum(is_bmma[first : last + 1]), -(last - first), first, last)
        if cand[0] > 0 and (best is None or cand[:2] > best[:2]):
            best = cand
    return None if best is None else (best[2], best[3])


def trim_padding(instrs: Sequence[Instr]) -> list[Instr]:
    """The function without its trailing NOP padding and the final ``BRA`` to itself."""
    end = len(instrs)
    while end > 0 and (instrs[end - 1].base == "NOP" or instrs[end - 1].branch_target == instrs[end - 1].addr):
        end -= 1
    return list(instrs[:end])


def instruction_bytes(instrs: Sequence[Instr]) -> int:
    """Bytes per instruction from the address steps (16 on sm_70+, 8 before)."""
    steps = [b.addr - a.addr for a, b in zip(instrs, instrs[1:], strict=False) if b.addr > a.addr]
    return min(steps) if steps else 16


def count_ops(instrs: Sequence[Instr]) -> dict[str, int]:
    """The opcode counts the report tracks: BMMA, IMAD.MOV* (any), MOV (plain, any modifiers), LDS, LDSM."""
    return {
        "bmma": sum(i.base == "BMMA" for i in instrs),
        # IMAD.MOV.U32 and IMAD.MOV alike (the 272 counted only the .U32 form)
        "imad_mov": sum(i.opcode.startswith("IMAD.MOV") for i in instrs),
        "mov": sum(i.base == "MOV" for i in instrs),
        "lds": sum(i.base == "LDS" for i in instrs),
        "ldsm": sum(i.base == "LDSM" for i in instrs),
    }


def main_loop_stats(instrs: Sequence[Instr], top_opcodes: int = 8) -> dict[str, Any]:
    """The flat per-function figures: totals, main loop, epilogue (loop/epilogue keys are None
    when there is no main loop)."""
    body = trim_padding(instrs)
    stats: dict[str, Any] = {"instructions": len(body), "bmma_total": sum(i.base == "BMMA" for i in body)}
    loop = find_main_loop(body)
    if loop is None:
        stats.update(
            has_main_loop=False,
            loop_start=None,
            loop_end=None,
            loop_instructions=None,
            loop_bmma=None,
            loop_instr_per_bmma=None,
            loop_imad_mov=None,
            loop_mov=None,
            loop_lds=None,
            loop_ldsm=None,
            loop_top_opcodes=None,
            bmma_outside_loop=stats["bmma_total"],
            epilogue_instructions=None,
            epilogue_bytes=None,
        )
        return stats
    first, last = loop
    in_loop = body[first : last + 1]
    ops = count_ops(in_loop)
    epilogue = body[last + 1 :]
    stats.update(
        has_main_loop=True,
        loop_start=hex(body[first].addr),
        loop_end=hex(body[last].addr),
        loop_instructions=len(in_loop),
        loop_bmma=ops["bmma"],
        loop_instr_per_bmma=round(len(in_loop) / ops["bmma"], 3),
        loop_imad_mov=ops["imad_mov"],
        loop_mov=ops["mov"],
        loop_lds=ops["lds"],
        loop_ldsm=ops["ldsm"],
        loop_top_opcodes=dict(Counter(i.opcode for i in in_loop).most_common(top_opcodes)),
        bmma_outside_loop=stats["bmma_total"] - ops["bmma"],
        epilogue_instructions=len(epilogue),
        epilogue_bytes=len(epilogue) * instruction_bytes(instrs),
    )
    return stats


def kernel_reports(sass: str, ptxas: str, cxxfilt: str | None = None) -> list[dict[str, Any]]:
    """One flat record per conv kernel (name contains xnor_conv_kernel) or other kernel with BMMA."""
    functions = split_functions(sass)
    info = parse_ptxas_info(ptxas)
    names = demangle(list(functions), cxxfilt)
    reports = []
    for mangled, instrs in functions.items():
        demangled = names[mangled]
        if CONV_KERNEL_MARK not in mangled and not any(i.base == "BMMA" for i in instrs):
            continue
        label, pair_key = kernel_label(demangled)
        res = info.get(mangled, {})
        spills = (res.get("spill_stores"), res.get("spill_loads"))
        reports.append(
            {
                "kernel": label,
                "pair_key": pair_key,
                "name": demangled,
                "mangled": mangled,
                "template": template_params(demangled),
                "registers": res.get("registers"),
                "spill_stores": spills[0],
                "spill_loads": spills[1],
                "stack_frame": res.get("stack_frame"),
                **main_loop_stats(instrs),
            }
        )
    return reports


# ---------------------------------------------------------------- comparison


def _ratio(ours: float | None, base: float | None) -> float | None:
    if ours is None or not base:
        return None
    return round(ours / base, 4)


def compare(base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Ratios (ours / baseline) and issue 17's static targets for one kernel."""
    ipb = _ratio(ours["loop_instr_per_bmma"], base["loop_instr_per_bmma"])
    epi = _ratio(ours["epilogue_instructions"], base["epilogue_instructions"])
    spill_bytes = None if ours["spill_stores"] is None else ours["spill_stores"] + (ours["spill_loads"] or 0)
    return {
        "kernel": ours["kernel"],
        "baseline_name": base["name"],
        "ours_name": ours["name"],
        "baseline_instr_per_bmma": base["loop_instr_per_bmma"],
        "ours_instr_per_bmma": ours["loop_instr_per_bmma"],
        "instr_per_bmma_ratio": ipb,
        "baseline_loop_imad_mov": base["loop_imad_mov"],
        "ours_loop_imad_mov": ours["loop_imad_mov"],
        "ours_loop_mov": ours["loop_mov"],
        "ours_spill_bytes": spill_bytes,
        "baseline_epilogue_instructions": base["epilogue_instructions"],
        "ours_epilogue_instructions": ours["epilogue_instructions"],
        "epilogue_ratio": epi,
        "baseline_registers": base["registers"],
        "ours_registers": ours["registers"],
        "meets_instr_per_bmma": ipb is not None and ipb <= MAX_INSTR_PER_BMMA_RATIO,
        "meets_no_mov": ours["loop_imad_mov"] == 0,
        "meets_no_spills": spill_bytes == 0,
        "meets_epilogue_halved": epi is not None and epi <= MAX_EPILOGUE_RATIO,
    }


TARGETS = ("meets_instr_per_bmma", "meets_no_mov", "meets_no_spills", "meets_epilogue_halved")


def pair_kernels(
    baseline: list[dict[str, Any]], ours: list[dict[str, Any]]
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(pairs, baseline kernels without a counterpart, ours without one).  Every ours kernel whose
    pair key a baseline kernel has is compared with it (variants such as split-K share a key)."""
    by_key = {}
    for rec in baseline:
        by_key.setdefault(rec["pair_key"], rec)
    pairs = [(by_key[o["pair_key"]], o) for o in ours if o["pair_key"] in by_key]
    used = {o["pair_key"] for o in ours}
    return pairs, [b for b in baseline if b["pair_key"] not in used], [o for o in ours if o["pair_key"] not in by_key]


# ---------------------------------------------------------------- tools and builds


def find_nvcc(explicit: str | None = None) -> str:
    if explicit:
        if shutil.which(explicit) is None:
            raise ToolError(f"nvcc not found at {explicit}")
        return explicit
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [str(Path(home) / "bin" / "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise ToolError("nvcc not found (pass --nvcc, set CUDA_HOME or put nvcc on PATH)")


def find_cuobjdump(explicit: str | None = None, nvcc: str | None = None) -> str:
    if explicit:
        if shutil.which(explicit) is None:
            raise ToolError(f"cuobjdump not found at {explicit}")
        return explicit
    candidates = []
    spec = importlib.util.find_spec("triton")  # triton ships cuobjdump; no import of triton needed
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "cuobjdump"))
    home = os.environ.get("CUDA_HOME")
    if home:
        candidates.append(str(Path(home) / "bin" / "cuobjdump"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise ToolError("cuobjdump not found (pass --cuobjdump, install triton or put the CUDA toolkit's bin on PATH)")


def gencode(arch: str) -> list[str]:
    """``sm_90a`` -> ``-gencode arch=compute_90a,code=sm_90a``."""
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+[a-z]?)", arch)
    if m is None:
        raise ToolError(f"unknown --arch {arch!r} (expected e.g. sm_80 or sm_90a)")
    return ["-gencode", f"arch=compute_{m.group(1)},code=sm_{m.group(1)}"]


def extract_revision(rev: str, dest: Path, repo: Path = REPO) -> Path:
    """The kernel sources at ``rev`` (``git archive``) under ``dest``; returns their directory."""
    git = shutil.which("git")
    if git is None:
        raise ToolError("git not found (needed to extract the baseline revision)")
    proc = subprocess.run(
        [git, "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ToolError(f"unknown revision {rev!r} in {repo} (a full clone is needed for the baseline)")
    commit = proc.stdout.strip()
    proc_b = subprocess.run(
        [git, "-C", str(repo), "archive", "--format=tar", commit, KERNEL_DIR], capture_output=True, check=False
    )
    if proc_b.returncode != 0:
        raise ToolError(f"revision {rev} has no {KERNEL_DIR}: {proc_b.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(proc_b.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    return dest / KERNEL_DIR


def compile_and_dump(source_dir: Path, out_dir: Path, arch: str, nvcc: str, cuobjdump: str) -> tuple[str, str]:
    """(cuobjdump -sass text, ptxas -v text) of ``source_dir/xnor_conv.cu``."""
    obj = out_dir / (KERNEL_SOURCE + ".o")
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        *gencode(arch),
        "-Xptxas",
        "-v",
        *TORCH_NVCC_DEFINES,
        "-c",
        str(source_dir / KERNEL_SOURCE),
        "-o",
        str(obj),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompileError(f"nvcc failed on {source_dir / KERNEL_SOURCE}:\n{proc.stderr[-3000:]}")
    dump = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=False)
    if dump.returncode != 0:
        raise CompileError(f"cuobjdump -sass {obj} failed:\n{dump.stderr[-2000:]}")
    return dump.stdout, proc.stdout + proc.stderr


def nvcc_version(nvcc: str) -> str | None:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def analyze(source_dir: Path, arch: str, nvcc: str, cuobjdump: str) -> list[dict[str, Any]]:
    """Kernel records of the kernel sources in ``source_dir``."""
    with tempfile.TemporaryDirectory(prefix="cuda_sass_") as tmp:
        sass, ptxas = compile_and_dump(source_dir, Path(tmp), arch, nvcc, cuobjdump)
    return kernel_reports(sass, ptxas)


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-rev", default=DEFAULT_REV)
    ap.add_argument("--arch", default=DEFAULT_ARCH, help="sm_90a (default), sm_80, ...")
    ap.add_argument("--nvcc")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--source-dir", type=Path, default=REPO / KERNEL_DIR, help="our kernel sources")
    args = ap.parse_args(argv)
    try:
        gencode(args.arch)
        nvcc = find_nvcc(args.nvcc)
        cuobjdump = find_cuobjdump(args.cuobjdump, nvcc)
        if not (args.source_dir / KERNEL_SOURCE).is_file():
            raise ToolError(f"no {KERNEL_SOURCE} in {args.source_dir}")
        with tempfile.TemporaryDirectory(prefix="cuda_sass_base_") as tmp:
            base_dir = extract_revision(args.baseline_rev, Path(tmp))
            baseline = analyze(base_dir, args.arch, nvcc, cuobjdump)
        ours = analyze(args.source_dir, args.arch, nvcc, cuobjdump)
    except ToolError as exc:
        print(f"cuda_sass: {exc}", file=sys.stderr)
        return 2
    except CompileError as exc:  # nvcc's own message follows
        print(f"cuda_sass: {exc}", file=sys.stderr)
        return 1

    common = {"benchmark": "cuda_sass", "arch": args.arch, "nvcc": nvcc_version(nvcc)}
    for version, records in (("baseline", baseline), ("ours", ours)):
        for rec in records:
            emit(
                {
                    **common,
                    "version": version,
                    "source": args.baseline_rev if version == "baseline" else str(args.source_dir),
                    **rec,
                }
            )
    pairs, base_only, ours_only = pair_kernels(baseline, ours)
    compared = [compare(b, o) for b, o in pairs]
    for cmp in compared:
        emit({**common, "version": "compare", "baseline_rev": args.baseline_rev, **cmp})
    summary: dict[str, Any] = {
        **common,
        "version": "summary",
        "baseline_rev": args.baseline_rev,
        "kernels": [
            {
                k: c[k]
                for k in (
                    "kernel",
                    "instr_per_bmma_ratio",
                    "ours_loop_imad_mov",
                    "ours_spill_bytes",
                    "epilogue_ratio",
                    *TARGETS,
                )
            }
            for c in compared
        ],
        "baseline_only": [b["kernel"] for b in base_only],
        "ours_only": [o["kernel"] for o in ours_only],
    }
    for target in TARGETS:  # over all paired kernels
        summary[target] = bool(compared) and all(c[target] for c in compared)
    summary["meets_all"] = all(summary[t] for t in TARGETS)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
