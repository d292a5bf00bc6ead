"""The ``.bnas`` packed-model file: ``save_packed`` writes it, ``load_packed`` checks and reads it.

File format (``.bnas``, version 1)
----------------------------------
A safetensors file (https://github.com/huggingface/safetensors): a JSON header, then raw
little-endian tensor data; reading it executes no code. Tensors: the inference network's
``state_dict`` (dotted module paths, e.g. ``body.0.op.conv.weight_packed``). Metadata
(string -> string) in the header:

* ``format``: ``"bnas-packed"``;
* ``version``: ``"1"`` (a reader refuses other versions);
* ``genotype``: the genotype YAML; the float skeleton is rebuilt from it with ``bnas.build``;
* ``layers``: a JSON list, one object per replaced module, with ``path`` (dotted module path),
  ``kind`` and the kind's arguments:

  - ``packed_conv2d``: ``in_channels, out_channels, kernel_size, stride, padding, dilation,
    groups, threshold`` (bool), ``folded_bn`` (the BN's path or null), ``activation``,
    ``weight`` (the binarizer names, informative). Tensors: ``weight_packed`` int32
    ``(K, kh, kw, ceil(C/groups/32))`` (bit j of word i = input channel 32*i + j, 1 = +1,
    padding bits 0: the packed format of ``bnas.kernels``), ``scale`` and ``bias`` float32
    ``(K,)``, ``threshold`` float32 ``(C,)`` when ``threshold`` is true;
  - ``packed_linear``: ``in_features, out_features, threshold, folded_bn, activation, weight``;
    ``weight_packed`` int32 ``(K, ceil(F/32))``, ``scale``, ``bias``, optional ``threshold``;
  - ``packed_weight_linear``: real input x 1-bit weights (``in_features, out_features,
    threshold`` (false), ``folded_bn``, ``activation`` (``none``), ``weight``); tensors
    ``weight_packed`` int32 ``(K, ceil(F/32))``, ``scale`` (alpha and the folded BN), ``bias``;
  - ``conv2d`` / ``linear``: a float ``nn.Conv2d`` / ``nn.Linear`` (its usual arguments, plus
    ``bias`` true and ``folded_bn``); tensors ``weight``, ``bias``;
  - ``sign_conv2d`` / ``sign_linear``: the same, applied to ``sign(x - threshold)``;
  - ``identity``: a folded BatchNorm (no tensors).

``bnas_version`` and ``torch_version`` record the writer.

``load_packed`` trusts nothing in the file: the genotype is read by the safe YAML reader, every
layer-table entry must name a layer of that genotype with the same arguments, and every tensor
must have the shape and the dtype its layer implies (packed int32 words re-saved as float32
would otherwise be converted silently, and rounded). Each failure is one line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._version import __version__
from ..atomic import atomic_path
from ..binarize import BinaryConv2d, BinaryLinear
from ..builder import build
from ..errors import BnasError
from ..genotype import Genotype, genotype_from_dict
from ..kernels.dispatch import POINTWISE_PRECISIONS, STEM_PRECISIONS, cpu_backend_name
from ..kernels.int8 import PixelGrid, check_pixel_grid
from ..kernels.thread_budget import PROCESS_BUDGET
from ..yaml_io import parse_yaml_mapping
from .layers import PackedConv2d, PackedLinear, PackedWeightLinear, SignConv2d, SignLinear
from .plan import build_plan
from .program import Program, lower_plan

__all__ = [
    "FORMAT",
    "KINDS",
    "VERSION",
    "ExportError",
    "PackedNetwork",
    "load_packed",
    "load_state",
    "make_layer",
    "save_packed",
    "set_module",
]

FORMAT = "bnas-packed"
VERSION = "1"

_CONV_KINDS = ("packed_conv2d", "conv2d", "sign_conv2d")
_LINEAR_KINDS = ("packed_linear", "packed_weight_linear", "linear", "sign_linear")
KINDS = _CONV_KINDS + _LINEAR_KINDS + ("identity",)


class ExportError(BnasError):
    """A checkpoint, genotype or packed file that cannot be exported or loaded."""


# --------------------------------------------------------------------------------------
# The layer table: one entry per replaced module
# --------------------------------------------------------------------------------------
def conv_args(m: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
    }


def make_layer(entry: Mapping[str, Any]) -> nn.Module:
    """An empty module of the kind a layer-table entry describes (its tensors come later)."""
    kind = entry["kind"]
    if kind == "identity":
        return nn.Identity()
    if kind == "packed_conv2d":
        return PackedConv2d(
            entry["in_channels"],
            entry["out_channels"],
            tuple(entry["kernel_size"]),
            tuple(entry["stride"]),
            tuple(entry["padding"]),
            tuple(entry["dilation"]),
            entry["groups"],
            bool(entry["threshold"]),
        )
    if kind == "packed_linear":
        return PackedLinear(entry["in_features"], entry["out_features"], bool(entry["threshold"]))
    if kind == "packed_weight_linear":
        return PackedWeightLinear(entry["in_features"], entry["out_features"])
    if kind in ("conv2d", "sign_conv2d"):
        args = {
            "in_channels": entry["in_channels"],
            "out_channels": entry["out_channels"],
            "kernel_size": tuple(entry["kernel_size"]),
            "stride": tuple(entry["stride"]),
            "padding": tuple(entry["padding"]),
            "dilation": tuple(entry["dilation"]),
            "groups": entry["groups"],
            "bias": bool(entry["bias"]),
        }
        return nn.Conv2d(**args) if kind == "conv2d" else SignConv2d(**args, threshold=bool(entry["threshold"]))
    if kind in ("linear", "sign_linear"):
        args = {"in_features": entry["in_features"], "out_features": entry["out_features"], "bias": bool(entry["bias"])}
        return nn.Linear(**args) if kind == "linear" else SignLinear(**args, threshold=bool(entry["threshold"]))
    raise ExportError(f"unknown layer kind {kind!r} in the layer table; this bnas reads {', '.join(KINDS)}")


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class PackedNetwork(nn.Module):
    """An inference network whose binary layers run on the packed kernels.

    Always in eval mode (``train()`` keeps it there) and without gradients. ``genotype`` and
    ``layers`` (the layer table) describe it; ``save(path)`` writes the ``.bnas`` file.
    """

    def __init__(self, net: nn.Module, genotype: Genotype | None, layers: list[dict[str, Any]]):
        super().__init__()
        self.net = net
        self.genotype = genotype
        self.layers = layers
        #: run float32 CPU inputs through the fused plan (``bnas.export.plan``); False runs
        #: the module tree as it is (the unfused reference)
        self.fused = True
        #: on the CPU, run each forward on no more of torch's threads than there are cores no
        #: other process is running on (``bnas.kernels.thread_budget``), so that a busy
        #: neighbour does not leave every parallel op waiting for a descheduled thread. torch's
        #: float ops may round differently in the last bit on 1 thread than on 2; set False
        #: for outputs that never depend on the machine's load
        self.adaptive_threads = True
        #: run the fused plan's binary steps and float kernel modules as direct kernel calls
        #: (``bnas.export.program``: the same calls, less Python); False runs the plan's
        #: torch.fx program
        self.lowered = True
        self.stem_precision = "float32"
        self.shortcut_precision = "float32"
        self.head_precision = "float32"
        self.input_grid = None
        self.requires_grad_(False)
        super().train(False)

    @property
    def stem_precision(self) -> str:
        """How the fused plan runs the float convs that read the image (the stem):
        ``"float32"`` (the default: the trained network's arithmetic) or ``"int8"`` (8-bit
        integers, ``bnas.kernels.int8_conv2d`` and ``conv2d_max_pool``; ResNet's 7x7/2 stem and
        its pool run about 2.3-2.4 times faster on AVX-512 VNNI and 4.7-5.6 times on AMX-INT8, and
        Bi-Real ResNet-18 at 224x224 about 1.4 times on AMX). The stem's outputs then differ by the
        quantization of the image and the weights (under 1 % of the output's range), which
        changes some predictions of a binary network (the README measures how many). The
        module tree (``fused = False``) always runs float32."""
        return self.__dict__["_stem_precision"]

    @stem_precision.setter
    def stem_precision(self, value: str) -> None:
        if value not in STEM_PRECISIONS:
            raise ExportError(f"stem_precision {value!r} is not one of {', '.join(STEM_PRECISIONS)}")
        self.__dict__["_stem_precision"] = value

    @property
    def shortcut_precision(self) -> str:
        """How the fused plan runs its 1x1 float convs (Bi-Real's downsample shortcuts, with
        the 2x2 average pool before them): ``"float32"`` (the default) or ``"int8"``, by the
        stem's rules with the (pooled) input map in the image's place
        (``bnas.kernels.pointwise_conv2d(..., precision="int8")``; a conv of more than
        ``bnas.kernels.int8.MAX_TAPS`` input channels stays float32). The shortcut's output
        then differs by the quantization, which changes some predictions, as the int8 stem
        does. The module tree (``fused = False``) always runs float32."""
        return self.__dict__["_shortcut_precision"]

    @shortcut_precision.setter
    def shortcut_precision(self, value: str) -> None:
        if value not in POINTWISE_PRECISIONS:
            raise ExportError(f"shortcut_precision {value!r} is not one of {', '.join(POINTWISE_PRECISIONS)}")
        self.__dict__["_shortcut_precision"] = value

    @property
    def head_precision(self) -> str:
        """How the fused plan runs its float linear layers (the classifier): ``"float32"`` (the
        default) or ``"int8"``, by the stem's rules with each input row in the image's place
        (``bnas.kernels.linear(..., precision="int8")``; a layer of more than
        ``bnas.kernels.int8.MAX_TAPS`` inputs, or of fewer than
        ``bnas.export.plan.INT8_HEAD_MIN_MACS`` multiply-adds per row, where int8 is no faster,
        stays float32). ResNet's 512 -> 1000 head then
        reads 0.5 MB of weights instead of 2 MB. The logits differ by the quantization, which
        can change predictions, as the int8 stem does. The module tree (``fused = False``)
        always runs float32."""
        return self.__dict__["_head_precision"]

    @head_precision.setter
    def head_precision(self, value: str) -> None:
        if value not in POINTWISE_PRECISIONS:
            raise ExportError(f"head_precision {value!r} is not one of {', '.join(POINTWISE_PRECISIONS)}")
        self.__dict__["_head_precision"] = value

    @property
    def input_grid(self) -> PixelGrid | None:
        """The pixel grid ``(scale, zero)`` of the images this network reads, or None (the
        default): every input value is ``(p - zero) * scale`` for a whole ``p`` in [0, 255].
        With ``stem_precision = "int8"`` the int8 stem then quantizes each pixel to itself
        instead of by each image's range, so the image is exact inside the stem (the rules:
        ``bnas.kernels.int8``). For 8-bit images normalized per channel with one mean and std,
        as ``bnas.data`` loads single-channel datasets:
        ``bnas.kernels.int8.pixel_grid(mean, std)``. It changes nothing in float32."""
        return self.__dict__["_input_grid"]

    @input_grid.setter
    def input_grid(self, value: Sequence[float] | None) -> None:
        try:
            self.__dict__["_input_grid"] = check_pixel_grid(value) if value is not None else None
        except ValueError as exc:
            raise ExportError(f"input_grid: {exc}") from exc

    def _plan_key(self) -> tuple[str, str, str, PixelGrid | None]:
        return (self.stem_precision, self.shortcut_precision, self.head_precision, self.input_grid)

    def train(self, mode: bool = True) -> PackedNetwork:
        return super().train(False)  # BN statistics are folded; there is nothing to train

    def plan(self) -> torch.fx.GraphModule | None:
        """The fused program (built once, sharing this network's modules), or None when the
        network cannot be traced."""
        plans = self.__dict__.setdefault("_plans", {})  # kept out of the module tree: not saved
        key = self._plan_key()
        if key not in plans:
            with torch.no_grad():  # folded weights and layouts are constants, not graph nodes
                plans[key] = build_plan(
                    self.net,
                    int8_stem=self.stem_precision == "int8",
                    int8_shortcuts=self.shortcut_precision == "int8",
                    int8_head=self.head_precision == "int8",
                    input_grid=self.input_grid,
                )
        return plans[key]

    def program(self, route: str) -> Program | None:
        """The plan lowered to direct kernel calls for CPU code path ``route``
        (:mod:`bnas.export.program`), made again when a bound call's weights were replaced or
        changed in place; None without a plan or where nothing would be lowered."""
        programs = self.__dict__.setdefault("_programs", {})  # kept out of the module tree
        key = (*self._plan_key(), route)
        program = programs.get(key, programs)  # the dict itself: not lowered yet
        if program is programs or (program is not None and not program.current()):
            plan = self.plan()
            if plan is None:
                return None
            with torch.no_grad():  # the weights' layouts are constants, not graph nodes
                program = programs[key] = lower_plan(plan, route)
        return program

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_programs", None)  # closures over bound kernel calls: made again on the next call
        return state

    def forward(self, x: Tensor) -> Tensor:
        # Few Python operations on the way to a lowered program: after a forward the caches
        # are cold, and each costs 1-3 us there (a context manager about 7), against a Bi-Real
        # ResNet-18 forward of 1-2 ms
        threads = before = torch.get_num_threads()
        on_cpu = x.is_cpu
        if self.adaptive_threads and threads > 1 and on_cpu:
            threads = PROCESS_BUDGET.threads(threads)
        if threads != before:
            torch.set_num_threads(threads)
        try:
            if self.fused and on_cpu and x.dtype == torch.float32:
                program = self.program(cpu_backend_name()) if self.lowered else None
                if program is not None:
                    return program(x)  # without gradients, in C++ or in Python
                plan = self.plan()
                if plan is not None:
                    with torch.no_grad():
                        return plan(x)
            with torch.no_grad():
                return self.net(x)
        finally:
            if threads != before:
                torch.set_num_threads(before)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_packed(self, path)


# --------------------------------------------------------------------------------------
# Writing and reading the file
# --------------------------------------------------------------------------------------
def save_packed(packed: PackedNetwork, path: str | os.PathLike[str]) -> Path:
    """Write ``packed`` to ``path`` (atomically, with the umask's mode) in the ``bnas-packed``
    format. A full disk or an unwritable folder is a one-line ``WriteError``; an existing
    file at ``path`` then stays as it was."""
    from safetensors.torch import save

    if packed.genotype is None:
        raise ExportError("the packed network has no genotype to store; pack a network built with bnas.build")
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in packed.net.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "genotype": packed.genotype.to_yaml(),
        "layers": json.dumps(packed.layers),
        "bnas_version": __version__,
        "torch_version": torch.__version__,
    }
    if path.is_dir():
        raise ExportError(
            f"{path} is an existing folder; the packed model is written to a file path, e.g. {path / 'model.bnas'}"
        )
    # Serialised in memory (the packed model is small), so every failure of the disk is an
    # OSError that atomic_path turns into one line.
    blob = save(tensors, metadata=metadata)
    with atomic_path(path, "packed model") as tmp:
        tmp.write_bytes(blob)
    return path


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"no packed model at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ExportError(
            f"{path}: not a bnas packed model (not a safetensors file: {exc}); write one with `bnas export`"
        ) from None
    if meta.get("format") != FORMAT:
        raise ExportError(
            f"{path}: a safetensors file but not a bnas packed model (format "
            f"{meta.get('format')!r}, expected {FORMAT!r}); write one with `bnas export`"
        )
    if meta.get("version") != VERSION:
        raise ExportError(
            f"{path}: bnas-packed version {meta.get('version')!r}; this bnas reads version {VERSION}, "
            "upgrade bnas or export the model again"
        )
    return meta


def load_packed(path: str | os.PathLike[str]) -> PackedNetwork:
    """Read a ``.bnas`` file written by ``bnas export`` / ``save_packed`` (no unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = _read_header(path)
    for key in ("genotype", "layers"):
        if not isinstance(meta.get(key), str):
            raise ExportError(f"{path}: damaged header (no {key!r} entry); export the model again")
    # The header is untrusted text: the genotype goes through the same safe YAML reader as a
    # genotype file (tags refused, one-line errors), the table through json and _check_entry.
    where = f"{path} (header: genotype)"
    genotype = genotype_from_dict(parse_yaml_mapping(meta["genotype"], where), where)
    try:
        table = json.loads(meta["layers"])
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise ExportError(
            f"{path}: damaged header (the layer table is not JSON: {reason}); export the model again"
        ) from None
    if not isinstance(table, list):
        raise ExportError(
            f"{path}: damaged header (the layer table is a JSON {type(table).__name__}, "
            "expected a list); export the model again"
        )
    net = build(genotype).eval()
    for entry in table:
        _check_entry(net, entry, path, meta.get("bnas_version", "unknown"))
        set_module(net, entry["path"], make_layer(entry))
    left = [n for n, m in net.named_modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    if left:
        raise ExportError(
            f"{path}: the layer table leaves binary layers unconverted ({', '.join(left[:3])}); export the model again"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ExportError(f"{path}: the tensors cannot be read ({_first_line(exc)}); export the model again") from None
    load_state(net, state, f"{path}", exact_dtypes=True)
    return PackedNetwork(net.eval(), genotype, table)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, int, float, bool, str, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_entry(net: nn.Module, entry: Any, file: Path, writer: str) -> None:
    """One layer-table entry must name a layer of the genotype's network, of a kind this bnas
    knows, with the same arguments: so a damaged or hostile table can neither allocate
    tensors the genotype does not imply nor replace the wrong module."""
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("kind"), str)):
        raise ExportError(
            f"{file}: damaged layer table (entry {_short(entry)} is not an object with "
            "'path' and 'kind' strings); export the model again"
        )
    where, kind = entry["path"], entry["kind"]
    if kind not in KINDS:
        raise ExportError(
            f"{file}: unknown packed layer kind {_short(kind)} at layer {_short(where)}; this bnas "
            f"reads {', '.join(KINDS)} (the file was written by bnas {writer}): "
            "upgrade bnas or export the model again"
        )
    try:
        target = net.get_submodule(where)
    except AttributeError:
        raise ExportError(
            f"{file}: the layer table names layer {_short(where)}, which the genotype in the header "
            "does not have; export the model again"
        ) from None
    expected: dict[str, Any] = {}
    if kind == "identity":
        fits = isinstance(target, _BatchNorm)
    elif kind in _CONV_KINDS:
        fits = isinstance(target, nn.Conv2d)
        if isinstance(target, nn.Conv2d):
            expected = conv_args(target)
    else:
        fits = isinstance(target, nn.Linear)
        if isinstance(target, nn.Linear):
            expected = {"in_features": target.in_features, "out_features": target.out_features}
    if not fits:
        raise ExportError(
            f"{file}: the layer table makes {_short(where)} a {kind}, but in the genotype it is a "
            f"{type(target).__name__}; export the model again"
        )
    flags = () if kind == "identity" else ("threshold",) if kind.startswith("packed") else ("threshold", "bias")
    for name in flags:
        if not isinstance(entry.get(name), bool):
            expected[name] = "true or false"
    for name, value in expected.items():
        # json.dumps tells 1 from true and [3, 3] from [3, 3.0], as the layer constructors would not
        if name not in entry or json.dumps(entry[name]) != json.dumps(value):
            raise ExportError(
                f"{file}: the layer table does not fit the genotype: layer {where} ({kind}) has "
                f"{name}={_short(entry.get(name))}, expected {_short(value)}; export the model again"
            )


def load_state(
    net: nn.Module, state: Mapping[str, Tensor], what: str, hint: str = "", exact_dtypes: bool = False
) -> None:
    """``load_state_dict(strict=True)`` with one readable error for every kind of mismatch.

    ``exact_dtypes``: a tensor must also have the dtype the module holds (a ``.bnas`` file),
    since ``load_state_dict`` would silently convert, e.g. packed int32 words re-saved as
    float32 (rounded above 2**24, so different weights); a checkpoint may be converted."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if exact_dtypes and not (missing or unexpected or wrong):
        other = sorted(k for k in own if own[k].dtype != state[k].dtype)
        if other:
            k = other[0]
            role = " (packed sign bits)" if k.endswith("weight_packed") else ""
            more = f"; {len(other) - 1} more tensor(s) of another dtype" if len(other) > 1 else ""
            raise ExportError(
                f"{what}: tensor {k} is {str(state[k].dtype).removeprefix('torch.')}, expected "
                f"{str(own[k].dtype).removeprefix('torch.')}{role}{more}; the file was changed "
                "after export: export the model again"
            )
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} tensor(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape ({k}: {list(state[k].shape)} vs {list(own[k].shape)})")
        raise ExportError(f"{what} does not match the network: {'; '.join(parts)}{hint}")
    net.load_state_dict(state, strict=True)
