"""A packed network's plan lowered to a flat list of calls, for the CPU kernels.

The plan (:mod:`bnas.export.plan`) is a torch.fx program of module calls. Beside its kernel,
each binary step costs a module call, the step's checks, the dispatch to a code path, a
weight-cache lookup and a read of the thread count in Python: several microseconds a step,
against kernels of 20-100 us for a Bi-Real ResNet-18 at 32x32, and time that does not shrink
with more threads.

:func:`lower_plan` turns the plan into a :class:`Program`: every step that reads packed input
(the plan chains them), or float input it packs itself (against its conv's threshold per
channel, if it has one), becomes one direct call of the extension, its weights in the
kernel's layout, its geometry and epilogue bound once. The float modules on the kernels (the
stem, the 1x1 shortcuts, the global average pool and the classifier) become direct calls too,
each with its weights' layout bound: their Python dispatch cost 25-45 us a call, a third of a
1x1 shortcut's time at 224x224. On code paths without those AVX-512 kernels they run
PyTorch's ops, and are bound as those ops. Every other node runs as in the plan. A call then reads the thread
count once; a bound step checks only that the residual has the output's shape (a broadcast add
goes through the step itself), and a bound float call that its input has the dtype, layout and
channels it was bound for (any other input goes through the module). The calls and their
arguments are the plan's, so the outputs are equal bit for bit.

The plan's float glue between those calls is PyTorch's own ops: BatchNorm in inference, the
sums and concatenations of cell nodes, pads, slices, pools, activations and flatten
(:mod:`bnas.export.torch_ops`). Such a node runs in Python as in the plan, and names the ATen
call the runner makes for it. The stem is PyTorch's conv below ``FLOAT_STEM_KERNEL_MIN_MACS``
per image, in Python and in the runner alike. The channels-last max-pool and the 1x1 convs
are kernel calls too; a 1x1 conv makes its input channels_last first, as its module does.

Where every instruction is such a call (or takes one tensor of a call's pair), the program
also runs in C++ (the extension's ``ProgramRunner``, csrc/program_runner.h): the same calls
with the same arguments and no Python between them. That is 0.08-0.31 ms less per Bi-Real
ResNet-18 forward at 32x32 and 224x224, on one thread or two, and 1.2-3x faster for the
shipped cell networks and small CNNs (``benchmarks/program_runner.py``). An input takes that
route once an input of its dtype, shape and strides has run through the Python instructions
without a bound call falling back to its module.

A program is made for one code path; ``PackedNetwork`` runs it while that is the path its
input takes and every bound call still holds the weights it was bound to (the same tensors,
unchanged in place), and lowers the plan again otherwise.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.fx
from torch import Tensor, nn

from ..kernels import cpu_backend
from ..kernels.dispatch import CPU_BACKENDS
from ..kernels.int8 import MAX_TAPS
from .layers import PackedLinear, PackedWeightLinear
from .plan import (
    FLOAT_STEM_KERNEL_MIN_MACS,
    ChannelsLastMaxPool2d,
    ChannelsLastPointwiseConv2d,
    GlobalAvgPool2d,
    ImageConv2d,
    ImageConvMaxPool2d,
    KernelLinear,
    PackedStep,
)
from .torch_ops import TorchOp, torch_op

__all__ = ["Program", "lower_plan"]

# An instruction computes one node's value from the values before it and the thread count.
Instruction = Callable[[list[Any], int], Any]
# A tensor a bound call was made with, and where its module holds it: (the module's
# _parameters or _buffers, the name, the tensor).
Held = tuple[dict[str, Any], str, Tensor | None]


def _held(owner: nn.Module, name: str) -> Held:
    """``owner.name``'s current object and where the module keeps it: its parameters, its
    buffers, or (a flag such as ``training``) its ``__dict__``."""
    store: dict[str, Any]
    if name in owner._parameters:
        store = owner._parameters
    elif name in owner._buffers:
        store = owner._buffers
    else:
        store = owner.__dict__
    return store, name, store.get(name)


class _BoundStep:
    """A :class:`PackedStep` as one call of the extension: on packed input, or on float input
    it packs first (one call more; against the conv's threshold, if it has one). A grouped
    conv of small groups (a depthwise one: one channel a group) without a threshold reads its
    float input as it is, output channels in SIMD lanes (``cpu_backend.grouped_conv_call``:
    the packed path's outputs bit for bit)."""

    def __init__(self, step: PackedStep, route: str, x_slot: int, residual_slot: int | None):
        fused = step.fused()
        self.module, self.fused = step, fused
        buffers = step.conv._buffers
        #: the tensors the call was made with; the packed weights went into a layout of their
        #: own, so they must also be unchanged in place (scale, bias and the thresholds are read
        #: at every call): a float input's threshold, and the one the packed output is packed
        #: against (its reader's)
        names = ("weight_packed", "scale", "bias") + (() if step.packed_input else ("threshold",))
        self.held: list[Held] = [(buffers, name, buffers.get(name)) for name in names]
        self.threshold = None if step.packed_input else buffers.get("threshold")
        reader = step.threshold_reader if step.pack_output else None
        pack_threshold = None
        if reader is not None:
            self.held.append(_held(reader, "threshold"))
            pack_threshold = self.held[-1][2]
        rprelu: list[Tensor] = []  # the epilogue's RPReLU parameters, read at every call
        if step.rprelu is not None:
            for name in ("shift_in", "slope", "shift_out"):
                self.held.append(_held(step.rprelu, name))
                rprelu.append(cast(Tensor, self.held[-1][2]))
        #: a grouped conv of small groups (depthwise: one channel a group) on float input runs
        #: on the float map, channels in SIMD lanes (cpu_backend.grouped_conv_call), not on a
        #: packed word per group
        self.on_float_map = (
            not step.packed_input
            and self.threshold is None
            and cpu_backend.grouped_on_float_map(fused.in_channels, fused.out_channels, fused.groups, route)
        )
        # the groups to pack a float input in first; 0: it comes packed, or the call reads it as it is
        self.pack_groups = 0 if step.packed_input or self.on_float_map else fused.groups
        self.pack = cpu_backend.pack_signs_call(route)
        self.unchanged = [(fused.wp, fused.wp._version)]
        if self.on_float_map:
            self.call, self.head, self.tail = cpu_backend.grouped_conv_call(
                fused.wp, fused.in_channels // fused.groups, fused.geometry, fused.scale, fused.bias, route,
                pack_threshold, rprelu,
            )  # fmt: skip
        else:
            lanes = cpu_backend.lane_weights(fused.wp, fused.groups, route)
            static = (fused.in_channels, fused.out_channels, *fused.geometry, fused.groups, fused.scale, fused.bias)
            self.call, self.head, self.tail = cpu_backend.fused_conv_call(lanes, static, route, pack_threshold, rprelu)
        self.x_slot, self.residual_slot = x_slot, residual_slot
        self.float_output, self.pack_output = step.float_output, step.pack_output
        self.into_residual = step.into_residual
        self.fallbacks = 0  # calls that went through the module

    def native_call(self) -> tuple[str, list[int], tuple[Any, ...], int]:
        """(kind, input slots, arguments, take) of this call for the extension's ``ProgramRunner``."""
        flags = (self.float_output, self.pack_output, self.into_residual)
        slots = [self.x_slot, -1 if self.residual_slot is None else self.residual_slot]
        if self.on_float_map:
            return "grouped_conv_fused", slots, (*self.head, *flags, *self.tail), -1
        return "conv2d_packed_fused", slots, (*self.head, *flags, *self.tail, self.pack_groups, self.threshold), -1

    def _module(self, x: Any, residual: Any) -> Any:
        self.fallbacks += 1
        return self.module(x) if residual is None else self.module(x, residual)

    def __call__(self, env: list[Any], threads: int) -> Any:
        x, residual = env[self.x_slot], None
        xp = x
        if self.pack_groups or self.on_float_map:
            if not _float_cpu(x, 4, self.fused.in_channels):
                return self._module(x, None if self.residual_slot is None else env[self.residual_slot])
            if self.pack_groups:
                xp = self.pack(x, self.pack_groups, threads, self.threshold)
        if self.residual_slot is not None:
            residual = env[self.residual_slot]
            if self.on_float_map:  # a float (N, C, H, W) input
                shape = (x.shape[0], self.fused.out_channels, *self.fused.output_size(x.shape[2], x.shape[3]))
            else:
                shape = self.fused.output_shape(xp)
            if residual.dtype != torch.float32 or residual.shape != shape:
                return self._module(x, residual)  # a broadcast add: the step's own path
            residual = residual.contiguous(memory_format=torch.channels_last)  # no copy when it is
        out, packed = self.call(
            xp, *self.head, residual, self.float_output, self.pack_output,
            self.into_residual and residual is not None, *self.tail, threads,
        )  # fmt: skip
        if self.float_output and self.pack_output:
            return out, packed
        return out if self.float_output else packed


class _BoundKernel:
    """A float plan module of one input on the CPU kernels as one direct call: ``call(x,
    threads)`` from ``bnas.kernels.cpu_backend``'s ``*_call`` functions, made with the module's
    weight (``owner.weight``, in a layout of the kernel's unless ``layout_bound`` is False) and
    bias (read at every call). An input that ``accepts`` refuses goes through the module, which
    checks it and says what is wrong."""

    def __init__(
        self,
        module: nn.Module,
        slot: int,
        call: cpu_backend.KernelCall,
        accepts: Callable[[Tensor], bool],
        owner: nn.Module | None = None,
        layout_bound: bool = True,
    ):
        self.module, self.slot, self.call, self.accepts = module, slot, call, accepts
        self.fallbacks = 0  # calls that went through the module
        self.held: list[Held] = []
        self.unchanged: list[tuple[Tensor, int]] = []
        if owner is not None:
            self.held = [_held(owner, "weight"), _held(owner, "bias")]
            weight = self.held[0][2]  # a layout made from it: in-place changes count too
            if weight is not None and layout_bound:
                self.unchanged = [(weight, weight._version)]

    def __call__(self, env: list[Any], threads: int) -> Any:
        x = env[self.slot]
        if self.accepts(x):
            return self.call(x, threads)
        self.fallbacks += 1
        return self.module(x)

    def native_call(self) -> tuple[str, list[int], tuple[Any, ...], int]:
        """(kind, input slots, arguments, take) of this call for the extension's ``ProgramRunner``."""
        return self.call.kind, [self.slot], self.call.args, self.call.take


class _GetItem:
    """``env[source][index]``: one tensor of a call that returns two."""

    __slots__ = ("source", "index")

    def __init__(self, source: int, index: int):
        self.source, self.index = source, index

    def __call__(self, env: list[Any], threads: int) -> Any:
        return env[self.source][self.index]


class _TorchCall:
    """A plan node of PyTorch's own ops that the runner also makes (:mod:`bnas.export.torch_ops`):
    in Python it runs as the plan runs it (``run``: the module or function call)."""

    __slots__ = ("run", "op", "module", "held")

    def __init__(self, run: Instruction, op: TorchOp, module: nn.Module | None):
        self.run, self.op, self.module = run, op, module
        #: what the call holds; it binds no layout, so it reads their values at every call
        self.held: list[Held] = [_held(owner, name) for owner, name in op.holds]

    def __call__(self, env: list[Any], threads: int) -> Any:
        return self.run(env, threads)

    def native_call(self) -> tuple[str, list[int], tuple[Any, ...], int]:
        """(kind, input slots, arguments, take) of this call for the extension's ``ProgramRunner``."""
        return self.op.kind, self.op.slots, self.op.args, -1


def _float_cpu(x: Any, rank: int, channels: int | None = None) -> bool:
    """A float32 CPU tensor of ``rank`` dimensions, with ``channels`` in dimension 1 if given."""
    return (
        isinstance(x, Tensor)
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() == rank
        and (channels is None or x.shape[1] == channels)
    )


def _cpu_float32(weight: Tensor, bias: Tensor | None) -> bool:
    """Weights the kernels take as they are: float32 on the CPU, one bias per output or none
    (anything else goes through the module, whose checks name the problem)."""
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and (
            bias is None
            or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.shape == weight.shape[:1])
        )
    )


def _bind_kernel(module: nn.Module, slot: int, route: str) -> _BoundKernel | None:
    """``module`` as a direct kernel call on code path ``route``, or None where its kernel does
    not run there (it then runs as a module)."""
    channels_last = torch.channels_last
    if isinstance(module, (PackedLinear, PackedWeightLinear)):  # kernels of every CPU code path
        return _bind_binary_linear(module, slot, route)
    if type(module) is ChannelsLastMaxPool2d:  # its kernel runs on every CPU code path
        pool = cpu_backend.max_pool_call(module.kernel_size, module.stride, module.padding, route, module.pack_output)
        return _BoundKernel(
            module, slot, pool, lambda x: _float_cpu(x, 4) and x.is_contiguous(memory_format=channels_last)
        )
    if route != "cpu-avx512":  # elsewhere these modules run PyTorch's ops: the runner makes them too
        return _bind_pytorch_float(module, slot, route)
    if isinstance(module, GlobalAvgPool2d):
        return _BoundKernel(
            module, slot, cpu_backend.global_avg_pool_call(route),
            lambda x: _float_cpu(x, 4) and x.shape[2] * x.shape[3] > 0 and x.is_contiguous(memory_format=channels_last),
        )  # fmt: skip
    if isinstance(module, ChannelsLastPointwiseConv2d):
        conv = module.conv
        if not _cpu_float32(conv.weight, conv.bias):
            return None
        channels = conv.weight.shape[1]
        if module.precision == "int8" and (channels > MAX_TAPS or not cpu_backend.int8_supported()):
            return None
        call = cpu_backend.pointwise_conv_call(
            conv.weight, conv.bias, module.pool, module.ceil_mode, module.stride, route, module.precision
        )
        return _BoundKernel(module, slot, call, lambda x: _float_cpu(x, 4, channels), conv)  # channels_last in the call
    if isinstance(module, KernelLinear):
        layer = module.linear
        if not _cpu_float32(layer.weight, layer.bias) or layer.weight.dim() != 2:
            return None
        features = layer.in_features
        if module.precision == "int8":
            if features > MAX_TAPS or not cpu_backend.int8_supported():
                return None
            return _BoundKernel(
                module, slot, cpu_backend.int8_linear_call(layer.weight, layer.bias, route),
                lambda x: _float_cpu(x, 2, features) and x.shape[0] > 0 and x.is_contiguous(), layer,
            )  # fmt: skip
        return _BoundKernel(
            module, slot, cpu_backend.linear_rows_call(layer.weight, layer.bias, route),
            lambda x: _float_cpu(x, 2, features) and 1 <= x.shape[0] <= cpu_backend.LINEAR_ROWS_MAX_BATCH
            and x.is_contiguous(), layer,
        )  # fmt: skip
    if isinstance(module, (ImageConv2d, ImageConvMaxPool2d)):
        return _bind_image_conv(module, slot)
    return None


def _bind_pytorch_float(module: nn.Module, slot: int, route: str) -> _BoundKernel | None:
    """A float plan module in float32 on code path ``route`` (not cpu-avx512), where its
    dispatch runs PyTorch's own ops, as a call of those ops in the runner: ``torch.conv2d``
    (the stem: the image made channels_last, then the conv), ``torch.pointwise_conv`` (the
    shortcut: channels_last, the 2x2/2 average pool if it has one, the 1x1 conv),
    ``conv2d_max_pool`` (ResNet's stem and its pool, and the pooled map's packed signs),
    ``torch.linear`` and ``torch.mean_hw`` (the global pool of an (N, C, H, W) map). In Python
    the module runs as it is. Such a call binds no layout: it holds the weights and reads them
    at every call. None for anything else (int8 precisions run references in Python)."""

    def bound(call: cpu_backend.KernelCall, accepts: Callable[[Tensor], bool], owner: nn.Module) -> _BoundKernel:
        # no layout made from the weights: PyTorch reads them at every call
        return _BoundKernel(module, slot, call, accepts, owner, layout_bound=False)

    def run(x: Tensor, threads: int) -> Any:
        return module(x)

    if isinstance(module, GlobalAvgPool2d):
        call = cpu_backend.KernelCall("torch.mean_hw", (), run)
        return _BoundKernel(module, slot, call, lambda x: _float_cpu(x, 4))
    if getattr(module, "precision", "float32") != "float32":
        return None
    if isinstance(module, ChannelsLastPointwiseConv2d):
        conv = module.conv
        if not _cpu_float32(conv.weight, conv.bias):
            return None
        channels = conv.weight.shape[1]
        args = (conv.weight, conv.bias, module.pool, module.ceil_mode, module.stride)
        return bound(
            cpu_backend.KernelCall("torch.pointwise_conv", args, run), lambda x: _float_cpu(x, 4, channels), conv
        )
    if isinstance(module, KernelLinear):
        layer = module.linear
        if not _cpu_float32(layer.weight, layer.bias) or layer.weight.dim() != 2:
            return None
        features = layer.in_features
        call = cpu_backend.KernelCall("torch.linear", (layer.weight, layer.bias), run)
        return bound(call, lambda x: _float_cpu(x, 2, features), layer)
    if isinstance(module, (ImageConv2d, ImageConvMaxPool2d)):
        conv = module.conv
        if not _cpu_float32(conv.weight, conv.bias):
            return None
        channels = conv.weight.shape[1]
        if isinstance(module, ImageConv2d):
            stem = (conv.weight, conv.bias, list(module.stride), list(module.padding))
            call = cpu_backend.KernelCall("torch.conv2d", stem, run)
        else:
            pool = [*module.kernel_size, *module.stride, *module.padding]
            geometry = (*module.conv_stride, *module.conv_padding, *pool)
            stem_pool = (conv.weight, conv.bias, *geometry, module.pack_output, cpu_backend.isa_of(route))
            call = cpu_backend.KernelCall("conv2d_max_pool", stem_pool, run)
        return bound(call, lambda x: _float_cpu(x, 4, channels) and x.shape[0] > 0, conv)
    return None


def _bind_binary_linear(module: PackedLinear | PackedWeightLinear, slot: int, route: str) -> _BoundKernel | None:
    """A binary linear layer on float (N, F) rows as one direct call: its signs packed (against
    its threshold per feature, if it has one) and the XNOR-popcount linear (``PackedLinear``),
    or real rows times 1-bit weights (``PackedWeightLinear``). Its scale, bias and threshold are
    read at every call; the packed weights went into a layout of their own, so they must also
    be unchanged in place."""
    features = module.in_features
    wp = module.weight_packed
    if isinstance(module, PackedLinear):
        call = cpu_backend.packed_linear_call(wp, features, module.scale, module.bias, route, module.threshold)
    else:
        call = cpu_backend.real_binary_linear_call(wp, features, module.scale, module.bias, route)
    bound = _BoundKernel(module, slot, call, lambda x: _float_cpu(x, 2, features) and x.is_contiguous())
    bound.held = [_held(module, name) for name in ("weight_packed", "scale", "bias", "threshold")]
    bound.unchanged = [(wp, wp._version)]
    return bound


def _bind_image_conv(module: ImageConv2d | ImageConvMaxPool2d, slot: int) -> _BoundKernel | None:
    conv = module.conv
    _, channels, kh, kw = conv.weight.shape
    if not _cpu_float32(conv.weight, conv.bias):
        return None
    if module.precision == "int8" and (channels * kh * kw > MAX_TAPS or not cpu_backend.int8_supported()):
        return None
    if isinstance(module, ImageConvMaxPool2d):
        stride, padding = module.conv_stride, module.conv_padding
        pool = (module.kernel_size, module.stride, module.padding)
        call = cpu_backend.image_conv_call(
            conv.weight, conv.bias, stride, padding, module.precision, pool, module.pack_output, module.grid
        )
        if not module.pack_output:
            call = call.taking(0)  # the pooled map alone

        def accepts(x: Any) -> bool:
            return _float_cpu(x, 4, channels) and x.shape[0] > 0

    else:
        call = cpu_backend.image_conv_call(
            conv.weight, conv.bias, module.stride, module.padding, module.precision, grid=module.grid
        ).taking(0)
        if module.precision == "float32":
            call = _small_stem_or(call, module)

        def accepts(x: Any) -> bool:
            return _float_cpu(x, 4, channels) and x.shape[0] > 0

    bound = _BoundKernel(module, slot, call, accepts, conv)
    if module.grid is not None and conv.bias is not None:  # the call holds a bias made from it
        bound.unchanged.append((conv.bias, conv.bias._version))
    return bound


def _small_stem_or(kernel: cpu_backend.KernelCall, stem: ImageConv2d) -> cpu_backend.KernelCall:
    """``kernel`` (the stem's image_conv_nhwc call) where an image makes ``stem`` a float32 stem of
    at least ``FLOAT_STEM_KERNEL_MIN_MACS`` multiply-adds; below, the stem's own PyTorch conv,
    in the runner too (its ``image_conv_nhwc_or_conv2d`` makes the same choice)."""
    conv = stem.conv

    def call(x: Tensor, threads: int) -> Any:
        return stem.forward(x) if stem.small_float_stem(x) else kernel(x, threads)

    args = (*kernel.args, conv.weight, conv.bias, FLOAT_STEM_KERNEL_MIN_MACS)
    return cpu_backend.KernelCall("image_conv_nhwc_or_conv2d", args, call, kernel.take)


# Input layouts (dtype, device, shape, strides) a program remembers as run through in Python
# without a fallback, for its runner; past this many it keeps the ones it has.
NATIVE_INPUTS_MAX = 64


class Program:
    """The plan's nodes in order, each an instruction on the list of values before it; a value
    is dropped after its last use, as the plan's generated code does. ``program(x)`` returns
    what the plan returns for ``x``.

    When every instruction is a direct kernel call or takes one tensor of a call's pair, and
    the plan returns one value, the program is also replayed in C++ (the extension's
    ``ProgramRunner``: the same calls with the same arguments, no Python between them). An
    input runs there once an input of its dtype, device, shape and strides has run through the
    Python instructions with every bound call taking its direct path (none fell back to its
    module), since then every value after it has the shape and layout that call was bound
    for; other inputs run in Python. ``native_enabled = False`` runs everything in Python."""

    def __init__(
        self,
        route: str,
        instructions: Sequence[Instruction | None],
        drops: Sequence[tuple[int, ...]],
        output: Callable[[list[Any]], Any],
        steps: Sequence[_BoundStep],
        kernels: Sequence[_BoundKernel] = (),
        output_slot: int | None = None,
        torch_calls: Sequence[_TorchCall] = (),
    ):
        self.route = route
        self._instructions, self._drops, self._output = list(instructions), list(drops), output
        self._steps = list(steps)
        self._kernels = list(kernels)
        self._runner, self._runner_modules = _native_runner(self._instructions, self._drops, output_slot)
        #: replay the program in C++ where it can (see the class's docstring)
        self.native_enabled = True
        # what current() checks, flat: it runs before every forward, when the forward before
        # has pushed Python's objects out of the caches (per bound call and check it cost
        # 2 us there, against 0.5 us warm)
        bound: list[_BoundStep | _BoundKernel] = [*self._steps, *self._kernels]
        self._held = [held for call in (*bound, *torch_calls) for held in call.held]
        self._unchanged = [unchanged for call in bound for unchanged in call.unchanged]
        if self._runner is not None:  # current() checks in C: 8 us against 13 us in Python, cold
            self._runner.watch_versions(self._unchanged)
            self._still_held = type(self._runner).still_held
        #: called as ``call_timer(module, seconds)`` after every bound call (a step, or a float
        #: module on the kernels), when set: bound calls are not module calls, so module hooks
        #: (profilers) do not see them
        self.call_timer: Callable[[nn.Module, float], None] | None = None

    @property
    def bound_steps(self) -> int:
        """How many plan steps run as direct kernel calls."""
        return len(self._steps)

    @property
    def bound_kernels(self) -> list[str]:
        """The classes of the float plan modules that run as direct kernel calls, in order."""
        return [type(kernel.module).__name__ for kernel in self._kernels]

    def current(self) -> bool:
        """Whether every bound call's module still holds the tensors it was made with, and
        those whose layout it bound are unchanged in place."""
        if self._runner is not None:
            return bool(self._still_held(self._held) and self._runner.versions_unchanged())
        for store, name, tensor in self._held:
            if store.get(name) is not tensor:
                return False
        for tensor, version in self._unchanged:
            if tensor._version != version:
                return False
        return True

    @property
    def native(self) -> bool:
        """Whether this program has a C++ replay (see the class's docstring)."""
        return self._runner is not None

    def __call__(self, x: Tensor) -> Any:
        threads = cpu_backend.kernel_threads()
        runner = self._runner if self.native_enabled and type(x) is Tensor else None
        if runner is not None:
            if self.call_timer is None:
                out = runner.run_known(x, threads)  # None: not an input layout it runs
                if out is not None:
                    return out
            elif runner.known(x):
                return self._run_timed(x, threads)
        fallbacks = self._fallbacks()
        out = self._run_python(x, threads)
        if runner is not None and self._fallbacks() == fallbacks:
            runner.remember(x, NATIVE_INPUTS_MAX)
        return out

    def _fallbacks(self) -> int:
        return sum(call.fallbacks for call in self._steps) + sum(call.fallbacks for call in self._kernels)

    def _run_timed(self, x: Tensor, threads: int) -> Tensor:
        timer, runner = self.call_timer, self._runner
        assert runner is not None and timer is not None
        out, seconds = runner.run_timed(x, threads)
        for module, elapsed in zip(self._runner_modules, seconds, strict=True):
            if module is not None:
                timer(module, elapsed)
        return out

    @torch.no_grad()
    def _run_python(self, x: Tensor, threads: int) -> Any:
        env: list[Any] = [None] * len(self._instructions)
        env[0] = x
        timer = self.call_timer
        for i, instruction in enumerate(self._instructions):
            if timer is not None and isinstance(instruction, (_BoundStep, _BoundKernel)):
                start = time.perf_counter()
                env[i] = instruction(env, threads)
                timer(instruction.module, time.perf_counter() - start)
            elif instruction is not None:
                env[i] = instruction(env, threads)
            for slot in self._drops[i]:
                env[slot] = None
        return self._output(env)


def lower_plan(gm: torch.fx.GraphModule, route: str) -> Program | None:
    """``gm`` (a plan from :func:`bnas.export.plan.build_plan`) as a :class:`Program` for CPU
    code path ``route``; None when no binary layer would run as a direct call (no binary conv
    step and no binary linear layer bound, or a route that is not a CPU kernel's) or the
    graph's one input is not its first node."""
    if route not in CPU_BACKENDS:
        return None
    nodes = list(gm.graph.nodes)
    if [i for i, node in enumerate(nodes) if node.op == "placeholder"] != [0]:
        return None
    slot_of = {node: i for i, node in enumerate(nodes)}
    drops: list[list[int]] = [[] for _ in nodes]
    last_use: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(nodes):
        if node.op == "output":  # what the output reads stays until it is returned
            continue
        for used in node.all_input_nodes:
            last_use[used] = i
    for used, i in last_use.items():
        drops[i].append(slot_of[used])

    outputs = [node for node in nodes if node.op == "output"]
    if len(outputs) != 1:
        return None
    instructions: list[Instruction | None] = [None]
    steps: list[_BoundStep] = []
    kernels: list[_BoundKernel] = []
    torch_calls: list[_TorchCall] = []
    for node in nodes[1:]:
        if node.op == "output":
            instructions.append(None)
            continue
        instruction = _instruction(gm, node, route, slot_of)
        if isinstance(instruction, _BoundStep):
            steps.append(instruction)
        elif isinstance(instruction, _BoundKernel):
            kernels.append(instruction)
        elif isinstance(instruction, _TorchCall):
            torch_calls.append(instruction)
        instructions.append(instruction)
    if not steps and not any(isinstance(k.module, (PackedLinear, PackedWeightLinear)) for k in kernels):
        return None  # no binary layer runs as a direct call
    returned = outputs[0].args[0]
    output = _values(returned, slot_of)
    output_slot = slot_of[returned] if isinstance(returned, torch.fx.Node) else None
    return Program(route, instructions, [tuple(d) for d in drops], output, steps, kernels, output_slot, torch_calls)


def _native_runner(
    instructions: Sequence[Instruction | None], drops: Sequence[tuple[int, ...]], output_slot: int | None
) -> tuple[Any, list[nn.Module | None]]:
    """The extension's ``ProgramRunner`` making the same calls as ``instructions``, and each
    of its instructions' module (None for a getitem); (None, []) where an instruction is
    neither a direct kernel call nor one tensor of a pair, or the plan does not return one
    value."""
    ext = cpu_backend.extension()
    if output_slot is None or ext is None or not hasattr(ext, "ProgramRunner"):
        return None, []
    runner = ext.ProgramRunner(len(instructions))
    modules: list[nn.Module | None] = []
    for i, instruction in enumerate(instructions):
        if instruction is None:  # the input and the output node: nothing to run, nothing dropped
            if drops[i]:
                return None, []
            continue
        if isinstance(instruction, _GetItem):
            if instruction.index not in (0, 1):
                return None, []
            runner.getitem(i, instruction.source, instruction.index, list(drops[i]))
            modules.append(None)
        elif isinstance(instruction, (_BoundStep, _BoundKernel, _TorchCall)):
            kind, slots, args, take = instruction.native_call()
            runner.kernel(i, kind, slots, args, take, list(drops[i]))
            modules.append(instruction.module)
        else:
            return None, []
    runner.set_output(output_slot)
    return runner, modules


def _values(arg: Any, slot_of: dict[torch.fx.Node, int]) -> Callable[[list[Any]], Any]:
    """A function of the value list that gives ``arg`` with its nodes replaced by their values:
    a flat tuple of nodes and constants (what the plans hold) without walking it on every call."""
    if isinstance(arg, torch.fx.Node):
        slot = slot_of[arg]
        return lambda env: env[slot]
    if isinstance(arg, dict) and not arg:
        return lambda env: {}
    if isinstance(arg, tuple) and not any(isinstance(a, (tuple, list, dict)) for a in arg):
        template = list(arg)
        slots = [(i, slot_of[a]) for i, a in enumerate(arg) if isinstance(a, torch.fx.Node)]

        def flat(env: list[Any]) -> tuple[Any, ...]:
            values = template.copy()
            for i, slot in slots:
                values[i] = env[slot]
            return tuple(values)

        return flat
    return lambda env: torch.fx.node.map_arg(arg, lambda node: env[slot_of[node]])


def _instruction(
    gm: torch.fx.GraphModule, node: torch.fx.Node, route: str, slot_of: dict[torch.fx.Node, int]
) -> Instruction:
    args = node.args
    kwargs = _values(node.kwargs, slot_of)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, PackedStep) and not node.kwargs and len(args) in (1, 2):
            x, residual = args[0], args[1] if len(args) == 2 else None
            if isinstance(x, torch.fx.Node) and (residual is None or isinstance(residual, torch.fx.Node)):
                return _BoundStep(module, route, slot_of[x], None if residual is None else slot_of[residual])
        if len(args) == 1 and isinstance(args[0], torch.fx.Node) and not node.kwargs:
            bound = _bind_kernel(module, slot_of[args[0]], route)
            if bound is not None:
                return bound
        positional = _values(args, slot_of)

        def call_module(env: list[Any], threads: int) -> Any:
            return module(*positional(env), **kwargs(env))

        op = torch_op(gm, node, slot_of)
        return call_module if op is None else _TorchCall(call_module, op, module)
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem and isinstance(args[0], torch.fx.Node) and isinstance(args[1], int):
            return _GetItem(slot_of[args[0]], args[1])
        if not callable(target):
            raise ValueError(f"lower_plan: node {node.name} calls {target!r}, which is not callable")
        function = target
        positional = _values(args, slot_of)

        def call_function(env: list[Any], threads: int) -> Any:
            return function(*positional(env), **kwargs(env))

        op = torch_op(gm, node, slot_of)
        return call_function if op is None else _TorchCall(call_function, op, None)
    if node.op == "call_method":
        method, positional = str(node.target), _values(args, slot_of)

        def call_method(env: list[Any], threads: int) -> Any:
            receiver, *rest = positional(env)
            return getattr(receiver, method)(*rest, **kwargs(env))

        return call_method
    if node.op == "get_attr":
        path = str(node.target)
        return lambda env, threads: _attribute(gm, path)
    raise ValueError(f"lower_plan: node {node.name} of kind {node.op!r} cannot be lowered")


def _attribute(gm: torch.fx.GraphModule, path: str) -> Any:
    value: Any = gm
    for name in path.split("."):
        value = getattr(value, name)
    return value
