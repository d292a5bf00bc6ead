#!/usr/bin/env bash
# One-command GPU check of the CUDA XNOR kernel (issue 17), sized for the lent H200 machine:
#   device  - a CUDA device is visible to torch (else: "no CUDA device" in summary.json, exit 2, nothing else runs)
#   install - the Python packages bnas needs that the machine's python3 lacks, from the wheels in .whl/
#             (pip --no-index --target, nothing fetched), and bnas itself from this checkout (PYTHONPATH)
#   build   - builds the CUDA extension (cuda_backend.load_extension: every sm_80+ GPU's architecture) and the
#             host warp emulator the GPU tests compare with (so the pytest step times tests, not compilers)
#   pytest  - pytest -m gpu on the test files that hold GPU tests (JUnit XML)
#   conv    - benchmarks/cuda_xnor_conv.py --json-out (CUDA-graph timings vs cuDNN fp16, 1-bit mma peak)
#   packed  - benchmarks/packed_model.py --device cuda (JSON lines)
#   profile - where ncu is on PATH: Nsight Compute on one launch of the conv at 256x256x8x8->256
#             (speed of light, occupancy, launch, warp-state and scheduler sections); it never
#             fails the check (ncu cannot read the counters on some machines: see ncu_conv.txt)
# Each step has a timeout, clamped so that all steps together stay inside GPU_CHECK_BUDGET_S
# (default 450 s, under 8 minutes); a failed or timed-out step is recorded and the next one runs.
# Output, at most 8 files (the device tool brings back no more), in ${OUT:-./gpu-check-out}:
#   summary.json (every step's exit code, status and seconds; pytest counts; the benchmark's summary line),
#   log.txt (all steps' output), env.txt, pytest_gpu.xml, cuda_xnor_conv.jsonl, packed_model.jsonl,
#   ncu_conv.txt.
# Exit code: 0 every step passed, 1 some step failed or timed out, 2 no CUDA device.
#
# The device call a session makes (one call; the wheels travel in the ignored folder .whl):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# .whl/ (ignored by .gitignore) is filled here, once, on a machine with pip and a registry, with the packages
# bnas imports that the device image (Python 3.12) lacks, and their own missing needs:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 colorlog==6.12.0
# (typing_extensions: pydantic 2.14 needs >= 4.16, newer than the image may hold. One version of each.)
#
# Environment: OUT (output folder), PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/gpu-check-out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.tsv  # name, rc, status, seconds, timeout
: >"$LOG"
: >"$STEPS"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}  # one build, reused by later steps
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# run_step NAME CAP_SECONDS COMMAND: runs COMMAND (a bash string) under timeout, output to log.txt
run_step() {
  local name=$1 cap=$2 cmd=$3 left t t0 rc status
  left=$((DEADLINE - $(date +%s)))
  if ((left < 5)); then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "" skipped 0 0 >>"$STEPS"
    echo "=== $name: skipped, the ${BUDGET}s budget is spent" >>"$LOG"
    return 0
  fi
  t=$((cap < left ? cap : left))
  echo "=== $name (timeout ${t}s): $cmd" >>"$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$t" bash -c "$cmd" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "=== $name: exit $rc ($status) after $(($(date +%s) - t0))s" >>"$LOG"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$status" "$(($(date +%s) - t0))" "$t" >>"$STEPS"
  return $rc
}

cat >"$WORK/device.py" <<'EOF'
import sys
try:
    import torch
except Exception as exc:  # noqa: BLE001 - any import failure means no usable torch
    print(f"torch does not import: {exc}")
    sys.exit(4)
print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    print("no CUDA device: torch.cuda.is_available() is False")
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB")
EOF

cat >"$WORK/summary.py" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
work, out, reason, start, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
steps = []
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, status, seconds, timeout = line.rstrip("\n").split("\t")
    steps.append({"name": name, "rc": int(rc) if rc else None, "status": status,
                  "seconds": int(seconds), "timeout_s": int(timeout)})
summary = {"ok": bool(steps) and all(s["status"] == "ok" for s in steps) and not reason,
           "reason": reason or None, "budget_s": budget, "steps": steps}
try:
    root = ET.parse(os.path.join(out, "pytest_gpu.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    summary["pytest"] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    # every GPU test skipped (say, the GPU is below sm_80) passes pytest but checks nothing
    summary["pytest"]["ran"] = summary["pytest"]["tests"] - summary["pytest"]["skipped"]
    summary["ok"] = summary["ok"] and summary["pytest"]["ran"] > 0
except (OSError, ET.ParseError) as exc:
    summary["pytest"] = {"missing": str(exc)}
    summary["ok"] = False
for key, name in (("cuda_xnor_conv", "cuda_xnor_conv.jsonl"), ("packed_model", "packed_model.jsonl")):
    try:
        lines = [json.loads(l) for l in open(os.path.join(out, name)) if l.startswith("{")]
    except (OSError, ValueError) as exc:
        summary[key] = {"missing": str(exc)}
        continue
    if key == "cuda_xnor_conv":
        summary[key] = next((l for l in lines if l.get("summary")), {"missing": "no summary line"})
        summary[key].pop("machine", None)
    else:
        keep = ("genotype", "batch", "baseline_ms", "ours_ms", "ratio", "class_agreement_vs_fp16", "backend")
        summary[key] = [{k: l.get(k) for k in keep} for l in lines]
for line in open(os.path.join(work, "env_gpu.txt")) if os.path.exists(os.path.join(work, "env_gpu.txt")) else []:
    summary.setdefault("device", []).append(line.strip())
with open(os.path.join(out, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=1)
print(json.dumps({k: summary[k] for k in ("ok", "reason")}))
EOF

cat >"$WORK/build.py" <<'EOF'
# the CUDA extension (nvcc) and, beside it, the host warp emulator the GPU tests compare with (g++)
import sys, threading, time
import torch
from bnas.kernels import cuda_backend as cb, emulator
failed = []
def build_emulator():
    t = time.time()
    try:
        emulator.load_emulator()
        print(f"emulator built in {time.time() - t:.0f} s")
    except Exception as exc:  # noqa: BLE001 - reported, the step fails
        failed.append(f"emulator: {exc}")
thread = threading.Thread(target=build_emulator)
thread.start()
t = time.time()
try:
    ext = cb.load_extension()
    archs = cb.build_architectures(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    print(f"CUDA extension {ext.__file__} built in {time.time() - t:.0f} s for {archs}")
except RuntimeError as exc:
    failed.append(f"CUDA extension: {exc}")
thread.join()
for line in failed:
    print("build failed:", line[-4000:])
sys.exit(1 if failed else 0)
EOF

finish() {  # finish REASON EXIT_CODE
  "$PY" "$WORK/summary.py" "$WORK" "$OUT" "$1" "$START" "$BUDGET" 2>>"$LOG" || python3 "$WORK/summary.py" \
    "$WORK" "$OUT" "$1" "$START" "$BUDGET" 2>>"$LOG" || echo "gpu_check: could not write summary.json" >&2
  echo "gpu_check: $(($(date +%s) - START))s, exit $2; see $OUT/summary.json" >&2
  exit "$2"
}

# --- device: fail fast and plainly when there is no GPU ---------------------------------------------
{
  echo "repo commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | head -n 20
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1
run_step device 60 "\"$PY\" \"$WORK/device.py\" | tee \"$WORK/env_gpu.txt\"; exit \${PIPESTATUS[0]}"
case $? in
  0) cat "$WORK/env_gpu.txt" >>"$OUT/env.txt" ;;
  3) finish "no CUDA device: torch sees none ($PY)" 2 ;;
  *) finish "no usable torch in $PY (see log.txt)" 2 ;;
esac

# --- install: carried wheels (no network there), bnas from this checkout --------------------------------
SITE=$WORK/site
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  export PYTHONPATH="$SITE:$PYTHONPATH"
  run_step install 60 "\"$PY\" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
--target \"$SITE\" \"$REPO\"/.whl/*.whl && \"$PY\" -c 'import bnas, pydantic; print(\"bnas\", bnas.__version__, \
bnas.__file__, \"pydantic\", pydantic.VERSION)'"
else
  run_step install 60 "echo 'no .whl/ folder: nothing to install'; \"$PY\" -c 'import bnas; print(bnas.__file__)'"
fi
"$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|pydantic|optuna|pytest) ' >>"$OUT/env.txt"

# --- build: one extension for the architectures of all visible sm_80+ GPUs -----------------------------
run_step build 240 "\"$PY\" \"$WORK/build.py\""

# --- pytest -m gpu, on the files that hold GPU tests (collecting the whole suite imports every extra) ---
GPU_TESTS=$(grep -l -E 'mark\.gpu' tests/test_*.py | tr '\n' ' ')
run_step pytest 150 "\"$PY\" -m pytest -m gpu -q -p no:cacheprovider --junitxml=\"$OUT/pytest_gpu.xml\" $GPU_TESTS"

# --- benchmarks ------------------------------------------------------------------------------------------
run_step conv 150 "\"$PY\" benchmarks/cuda_xnor_conv.py --json-out \"$OUT/cuda_xnor_conv.jsonl\" >/dev/null"
run_step packed 120 "\"$PY\" benchmarks/packed_model.py --device cuda >\"$OUT/packed_model.jsonl\""

# --- profile: where the kernel's time goes, for the next change (launch 4 of the conv kernel is a
# warm-up call of the timed packed-output conv; launches 1-3 check it against the reference)
if command -v ncu >/dev/null; then
  run_step profile 90 "ncu --clock-control none -k regex:xnor_conv_kernel --launch-skip 3 --launch-count 1 \
--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
\"$PY\" benchmarks/cuda_xnor_conv.py --shapes 256x256x8x8:256 --repeats 1 --batches 1 >\"$OUT/ncu_conv.txt\" 2>&1 \
|| echo 'ncu could not profile the kernel: see ncu_conv.txt'"
else
  echo "=== profile: skipped, no ncu on PATH" >>"$LOG"
fi

if awk -F'\t' '$3 != "ok" { bad = 1 } END { exit !bad }' "$STEPS"; then
  finish "" 1
fi
finish "" 0
