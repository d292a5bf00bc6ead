"""How long `bnas export --format lce` takes, with and without autograph's transpiling.

Keras and its SavedModel export pass every subclassed layer's ``call`` through TensorFlow's
autograph; bnas's export leaves its own, larq's and tf-keras's layers out of it
(``bnas.export.lce._without_autograph``). This times ``to_lce`` both ways on shipped
genotypes, each export in a fresh process as a ``bnas export`` command runs it (autograph
caches what it transpiled, so only a process's first export pays in full). Runs alternate
(baseline, ours, ours, baseline, ...) so load from other processes hits both alike.

    python benchmarks/lce_export.py [--genotypes digits_small kim2020_bnas_a bireal_resnet18] [--rounds 3]

Prints one JSON line per genotype: the median and p90 seconds of each, the ratio of the
medians, and whether the two flatbuffers are the same byte for byte. Needs the ``[lce]`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, load_average, machine, median_p90

ROOT = Path(__file__).resolve().parents[1]
GENOTYPES = ROOT / "search_spaces" / "genotypes"


def export_once(genotype: str, transpile: bool, out: Path) -> float:
    """Seconds for one ``to_lce`` of ``genotype`` (seeded weights) in this process."""
    import torch

    import bnas
    from bnas.export import lce

    torch.manual_seed(0)
    model = bnas.build(bnas.load_genotype(GENOTYPES / f"{genotype}.yaml")).eval()
    lce.import_lce()  # TensorFlow's import is not the export's time
    if transpile:  # the baseline: autograph transpiles every layer, as before
        lce._without_autograph = contextlib.nullcontext  # type: ignore[assignment]
    start = time.perf_counter()
    lce.to_lce(model, out)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genotypes", nargs="+", default=["digits_small", "kim2020_bnas_a", "bireal_resnet18"])
    parser.add_argument("--rounds", type=int, default=3, help="exports of each kind per genotype")
    parser.add_argument("--child", nargs=3, metavar=("GENOTYPE", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        genotype, mode, out = args.child
        print(json.dumps({"seconds": export_once(genotype, mode == "baseline", Path(out))}), flush=True)
        return 0
    for genotype in args.genotypes:
        seconds: dict[str, list[float]] = {"baseline": [], "ours": []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for mode in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):
                    out = Path(tmp) / f"{mode}.tflite"
                    child = subprocess.run(
                        [sys.executable, __file__, "--child", genotype, mode, str(out)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if child.returncode != 0:
                        raise SystemExit(f"{genotype} ({mode}): the export failed:\n{child.stderr[-2000:]}")
                    seconds[mode].append(json.loads(child.stdout.strip().splitlines()[-1])["seconds"])
            same = (Path(tmp) / "baseline.tflite").read_bytes() == (Path(tmp) / "ours.tflite").read_bytes()
        base_median, base_p90 = median_p90(seconds["baseline"])
        ours_median, ours_p90 = median_p90(seconds["ours"])
        emit(
            {
                "benchmark": "lce_export",
                "genotype": genotype,
                "baseline": "autograph transpiles every layer",
                "baseline_s_median": round(base_median, 3),
                "baseline_s_p90": round(base_p90, 3),
                "ours_s_median": round(ours_median, 3),
                "ours_s_p90": round(ours_p90, 3),
                "speedup": round(base_median / ours_median, 2),
                "same_flatbuffer": same,
                "rounds": args.rounds,
                "load_average": load_average(),
                **machine(),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
