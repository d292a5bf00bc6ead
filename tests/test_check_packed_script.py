"""scripts/check_packed_mnist.py on a network trained for one epoch: it exports the run, runs the
packed model on every test image with the stem, shortcuts and head in the precisions asked for, and
reports how many classes agree with the trained model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnas.cli import main
from bnas.kernels import cpu_backend

# threaded kernel paths: two torch threads (conftest.kernel_threads)
pytestmark = pytest.mark.usefixtures("kernel_threads")

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SMALL = ROOT / "search_spaces" / "genotypes" / "digits_small.yaml"
LINE = re.compile(
    r"digits_small \(digits, stem (\w+), shortcuts (\w+), head (\w+(?: \(kept float32: under INT8_HEAD_MIN_MACS\))?)"
    r"(, on the pixel grid)?\): same class on (\d+)/(\d+) test images; "
    r"largest relative logit difference \S+; test accuracy trained ([\d.]+)%, packed ([\d.]+)%"
)
ROUNDED = re.compile(
    r"with the weights of its (\d+) image conv\(s\) rounded per output channel to 8 bits, 12 bits, 16 bits "
    r"\(the image exact\) it predicts its own class on (\d+)/359, (\d+)/359, (\d+)/359"
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("check_packed") / "run"
    assert main(["-q", "eval", str(DIGITS_SMALL), "--dataset", "digits", "--epochs", "1", "--out", str(run)]) == 0
    return run


def _check(run: Path, *flags: str) -> tuple[tuple[str, ...], str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_packed_mnist.py"), str(DIGITS_SMALL), str(run),
         "--dataset", "digits", *flags],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = LINE.search(proc.stdout)
    assert match, proc.stdout
    return match.groups(), proc.stdout


@pytest.mark.slow
def test_float32_packed_model_keeps_the_classes(trained_run: Path) -> None:
    (stem, shortcuts, head, grid, same, total, trained, packed), out = _check(trained_run)
    assert grid is None
    assert "rounded per output channel" not in out  # the int8 stem's scale lines only when it is asked
    assert (stem, shortcuts, head) == ("float32", "float32", "float32")
    # every class here; one image may flip on another CPU, whose float rounding trains another net
    assert int(total) == 359 and int(same) >= int(total) - 1
    assert abs(float(trained) - float(packed)) <= 0.3


@pytest.mark.slow
@pytest.mark.skipif(not cpu_backend.int8_supported(), reason="the int8 kernels run on AVX-512 VNNI CPUs only")
def test_int8_stem_shortcuts_and_head_are_reported_as_asked(trained_run: Path) -> None:
    flags = ("--stem-precision", "int8", "--shortcut-precision", "int8", "--head-precision", "int8")
    (stem, shortcuts, head, grid, same, total, _, _), out = _check(trained_run, *flags)
    assert grid is None
    # digits_small's 64 -> 10 head is under INT8_HEAD_MIN_MACS: the plan keeps it float32, and says so
    assert (stem, shortcuts, head) == ("int8", "int8", "int8 (kept float32: under INT8_HEAD_MIN_MACS)")
    assert int(total) == 359 and int(same) >= 340  # quantization may move a few classes, not many
    rounded = ROUNDED.search(out)
    assert rounded, out
    convs, at8, at12, at16 = map(int, rounded.groups())
    assert convs == 1  # digits_small's 3x3 stem conv is its one float conv on the image
    assert 340 <= at8 <= 359 and at16 >= 358  # 16-bit weights err by about 1e-5 of the largest


@pytest.mark.slow
@pytest.mark.skipif(not cpu_backend.int8_supported(), reason="the int8 kernels run on AVX-512 VNNI CPUs only")
def test_int8_stem_on_the_pixel_grid_is_reported_as_asked(trained_run: Path) -> None:
    (stem, _, _, grid, same, total, _, _), out = _check(trained_run, "--stem-precision", "int8", "--input-grid")
    assert (stem, grid) == ("int8", ", on the pixel grid")
    assert int(total) == 359 and int(same) >= 340
    # the digits' 16 levels are exact on the grid: only the stem weights' rounding is left, so the
    # classes are about those of the trained model with its stem weights rounded to 8 bits
    rounded = ROUNDED.search(out)
    assert rounded, out
    assert abs(int(same) - int(rounded.group(2))) <= 2
