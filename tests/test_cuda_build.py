"""The CUDA extension is built for every GPU architecture of the machine (no GPU needed).

On a machine with GPUs of different compute capabilities, ``load_extension`` must build ONE
extension holding a cubin per distinct architecture >= 8.0 (else the other GPUs would get
"no kernel image is available"), named after that set so that builds for different sets do
not collide in torch's extension cache; GPUs below 8.0 stay refused."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.utils.cpp_extension

from bnas.kernels import cuda_backend as cb

GENCODE = re.compile(r"^-gencode=arch=compute_(\d+),code=sm_(\d+)$")


def fake_gpus(monkeypatch: pytest.MonkeyPatch, capabilities: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Pretends torch sees GPUs of ``capabilities`` and nvcc is there; returns the list that
    collects the keyword arguments of every torch.utils.cpp_extension.load call."""

    def capability(device: Any = None) -> tuple[int, int]:
        if device is None:
            index = 0
        elif isinstance(device, int):
            index = device
        else:
            index = torch.device(device).index or 0
        return capabilities[index]

    calls: list[dict[str, Any]] = []

    def load(**kwargs: Any) -> object:
        calls.append(kwargs)
        return object()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(cb, "_nvcc", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(cb, "_toolkit_paths", lambda: ([], []))
    monkeypatch.setattr(cb, "_extension", None)
    monkeypatch.setattr(cb, "_build_error", None)
    return calls


def gencodes(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    return [m.groups() for flag in kwargs["extra_cuda_cflags"] if (m := GENCODE.match(flag))]


def test_mixed_machine_builds_one_extension_for_each_architecture(monkeypatch):
    calls = fake_gpus(monkeypatch, [(8, 0), (9, 0), (8, 0), (7, 5)])
    ext = cb.load_extension()
    assert len(calls) == 1
    kwargs = calls[0]
    assert sorted(gencodes(kwargs)) == [("80", "80"), ("90", "90")]
    # no other arch flag slips in (torch adds its own list only when none is given)
    assert [f for f in kwargs["extra_cuda_cflags"] if "arch" in f or "code=" in f] == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    assert kwargs["name"] == "bnas_xnor_cuda_sm80_90"
    assert kwargs["name"] != cb.extension_name([(8, 0)])
    # built once, cached: a second device of the machine gets the same extension
    assert cb.load_extension("cuda:1") is ext
    assert len(calls) == 1


def test_single_architecture_build_keeps_its_name(monkeypatch):
    calls = fake_gpus(monkeypatch, [(9, 0)])
    cb.load_extension()
    assert gencodes(calls[0]) == [("90", "90")]
    assert calls[0]["name"] == "bnas_xnor_cuda_sm90"
    # build_extension still takes one capability tuple, as the compile test calls it
    cb.build_extension((8, 0))
    assert gencodes(calls[1]) == [("80", "80")]
    assert calls[1]["name"] == "bnas_xnor_cuda_sm80"
    cb.build_extension([(9, 0), (8, 0), (9, 0)])
    assert gencodes(calls[2]) == [("80", "80"), ("90", "90")]


def test_architecture_sets_have_distinct_names():
    names = {cb.extension_name(s) for s in ([(8, 0)], [(9, 0)], [(8, 0), (9, 0)], [(8, 0), (8, 6)], [(8, 6)])}
    assert len(names) == 5
    assert cb.extension_name([(9, 0), (8, 0)]) == cb.extension_name([(8, 0), (9, 0), (8, 0)])
    with pytest.raises(ValueError):
        cb.extension_name([])


def test_devices_below_8_0_are_refused(monkeypatch):
    calls = fake_gpus(monkeypatch, [(7, 5), (8, 6)])
    with pytest.raises(RuntimeError, match="below 8.0"):
        cb.load_extension("cuda:0")
    assert calls == []
    # the sm_86 GPU of the same machine builds, for itself only
    cb.load_extension("cuda:1")
    assert gencodes(calls[0]) == [("86", "86")]
    assert cb.build_architectures([(7, 0), (7, 5), (8, 0), (12, 0), (8, 0)]) == [(8, 0), (12, 0)]


# nvcc itself given load_extension's flags for a mixed machine (one object, a cubin per
# architecture): tests/test_cuda_compile.py::test_torch_extension_builds_and_loads.
