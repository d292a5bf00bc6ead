"""How a packed network runs on the CPU: one flat torch.fx program with the glue fused away.

The module tree of a packed network (``PackedNetwork.net``) is the genotype's float network
with its binary layers swapped for packed ones. Run as it is, every binary layer packs its
own input, every shortcut is a separate ``add``, and the float glue runs in whatever memory
layout the image came in. :func:`build_plan` traces the tree once and rewrites the program:

* **Residual adds fused into the binary conv.** ``add(PackedConv2d(x), shortcut)`` where the
  conv's only consumer is the add (a Bi-Real unit: ``BN(conv(sign(x))) + x``, the BN already
  folded) becomes one :class:`PackedStep` whose epilogue adds the shortcut.
* **RPReLU in the epilogue.** An RPReLU that alone reads a step's output (ReActNet's unit:
  ``RPReLU(BN(conv(x)) + x)``) runs in the step's epilogue, after the residual, with the
  float ops of its module in the same order (the same values bit for bit).
* **Packed outputs chained.** A step whose output feeds binary convs (``groups=1``) also
  writes the signs of its output, packed, in the same pass; those convs take the packed words
  and skip their own packing. The float output is still written when something else (a
  shortcut, a pool, the head) reads it. A conv with a threshold per channel (ReActNet's
  RSign, ``sign(x - threshold)``) reads signs packed against its threshold, when the convs
  without one read none of that output.
* **The stem's pool packs too.** A max-pool whose output a step binarises (ResNet's stem
  pool before the first Bi-Real unit) writes the packed signs in the same pass as the pooled
  map, and the step reads them.
* **Float shortcuts in one pass.** A 1x1 float conv (BN folded into its bias), with the 2x2/2
  average pool before it when nothing else reads the pool (Bi-Real's downsample shortcut),
  becomes one :class:`ChannelsLastPointwiseConv2d`: on AVX-512 CPUs the kernels pool inside
  the conv and run it at about twice PyTorch's rate (``bnas.kernels.pointwise_conv2d``).
* **The stem on the stem kernels.** A plain float conv that reads the image (few input
  channels) becomes an :class:`ImageConv2d`: a direct conv with output channels in SIMD lanes
  (``bnas.kernels.image_conv2d``), about twice PyTorch's rate on a 3-channel 3x3 stem, summing
  in an order of its own (a stem under ``FLOAT_STEM_KERNEL_MIN_MACS`` per image, where the
  call's fixed cost outweighs that, stays PyTorch's conv). One that only a max-pool reads
  (ResNet's 7x7/2 stem and 3x3/2 pool) becomes, with the pool, one
  :class:`ImageConvMaxPool2d`: the conv's rows stay in cache for the pool; the conv's 3.2 MB
  output at 224x224 is never written, and the pool writes the packed signs the first unit
  reads.
* **The stem in 8-bit integers, when asked.** With ``int8_stem`` (``PackedNetwork.stem_precision
  = "int8"``) both run in 8-bit integers: each image quantized to uint8, the weights per output
  channel to int8, exact integer sums (``bnas.kernels.int8_conv2d``; AVX-512 VNNI or AMX). That
  changes the numbers (see :mod:`bnas.kernels.int8`), so it is off by default. So are the
  1x1 shortcut convs in 8-bit integers, with ``int8_shortcuts``
  (``PackedNetwork.shortcut_precision = "int8"``): their (pooled) input map quantized per
  image as the image is (``bnas.kernels.pointwise_conv2d(..., precision="int8")``), and the
  classifier with ``int8_head`` (``PackedNetwork.head_precision = "int8"``: each input row
  quantized as an image, ``bnas.kernels.linear(..., precision="int8")``; a head of fewer than
  ``INT8_HEAD_MIN_MACS`` multiply-adds per row stays float32). On CPUs with
  AMX-INT8 all three run on AMX tiles (the same numbers).
* **The classifier on the kernels.** A float ``nn.Linear`` becomes a :class:`KernelLinear`
  (``bnas.kernels.linear``): at batch 1 its weight rows are split among the kernels' threads,
  where PyTorch runs it on one (ResNet's 512 -> 1000 head reads 2 MB of weights that the rest
  of the forward has pushed out of the cache), and a small head is one light call where
  PyTorch's linear, its code cold by then, took 25-30 us; it sums in an order of its own.
* **The global average pool on the kernels.** ``x.mean(dim=(2, 3))`` (the ``global_avgpool``
  head) becomes a :class:`GlobalAvgPool2d` (``bnas.kernels.global_avg_pool2d``): one light
  kernel call where PyTorch's reduction, whose code the rest of the forward has pushed out of
  the caches, took 50-80 us at 224x224; it sums in an order of its own.
* **channels_last throughout.** The image is made channels_last once; PyTorch's float convs
  and pools then keep that layout (the packed kernels read and write it natively), so no
  layer converts layouts. A 3x3/2 max-pool on a 64x112x112 map takes ~0.3 ms in
  channels_last against ~5 ms in NCHW (1 thread, this CPU class).
* **No Python between modules.** ``nn.Identity`` nodes (folded BNs) are dropped and the
  nested ``forward`` calls become one generated function.

Every value is computed by the same float32 operations as the module tree, in the same order
(the fused epilogue rounds ``conv * scale + bias`` and then ``+ residual`` exactly as the
separate add did), except where PyTorch's float convs pick another summation order for
channels_last input, and in the stem, shortcut, global-pool and classifier kernels, which sum
in orders of their own.
The plan's logits are therefore equal to the tree's or within float rounding of them (tested
on every shipped genotype), and the predicted classes agree. The fused shortcut's pool is
PyTorch's to the bit.

Networks that torch.fx cannot trace (Python control flow on tensor values) run as the module
tree; :func:`build_plan` then returns None and says why at DEBUG level.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import (
    FusedConv2d,
    conv2d_max_pool,
    global_avg_pool2d,
    image_conv2d,
    linear,
    max_pool2d_and_pack,
    max_pool2d_nhwc,
    pack_signs,
    pointwise_conv2d,
)
from ..kernels.int8 import MAX_TAPS, PixelGrid
from ..ops.common import RPReLU
from .layers import PackedConv2d, PackedLinear, PackedWeightLinear, SignConv2d, SignLinear

__all__ = [
    "ChannelsLastMaxPool2d",
    "ChannelsLastPointwiseConv2d",
    "FLOAT_STEM_KERNEL_MIN_MACS",
    "GlobalAvgPool2d",
    "INT8_HEAD_MIN_MACS",
    "ImageConv2d",
    "ImageConvMaxPool2d",
    "KernelLinear",
    "PackedStep",
    "build_plan",
    "int8_head_runs",
]

log = logging.getLogger(__name__)

_ADDS = (operator.add, torch.add, operator.iadd)


class PackedStep(nn.Module):
    """A :class:`PackedConv2d` as one step of a plan: its input float or already packed, an
    optional residual added in the epilogue, and its output float, packed or both.

    ``forward(x[, residual])`` returns the float output, or the packed output, or the pair
    ``(float, packed)`` when both are asked for.
    """

    def __init__(
        self, conv: PackedConv2d, *, packed_input: bool, residual: bool, float_output: bool, pack_output: bool
    ):
        super().__init__()
        self.conv = conv
        self.packed_input, self.residual = packed_input, residual
        self.float_output, self.pack_output = float_output, pack_output
        #: write the output into the residual's buffer (set by the plan when nothing reads the
        #: residual afterwards)
        self.into_residual = False
        # the conv that reads the packed output and whose threshold it is packed against, and
        # the RPReLU applied in the epilogue (set by the plan); kept out of the module tree, as
        # they are other modules' (another step's conv, the unit's activation)
        self.__dict__["_threshold_reader"] = None
        self.__dict__["_rprelu"] = None

    @property
    def rprelu(self) -> RPReLU | None:
        """The RPReLU applied after the residual, in the epilogue, or None."""
        return self.__dict__.get("_rprelu")

    def rprelu_parameters(self) -> tuple[Tensor, ...]:
        """(shift_in, slope, shift_out) of :attr:`rprelu`, or () without one."""
        act = self.rprelu
        return () if act is None else (act.shift_in, act.slope, act.shift_out)

    @property
    def threshold_reader(self) -> PackedConv2d | None:
        """The conv with a threshold that reads the packed output, or None."""
        return self.__dict__.get("_threshold_reader")

    @property
    def pack_threshold(self) -> Tensor | None:
        """The threshold per channel the packed output is compared with (``out >= threshold``:
        its reader's ``sign(out - threshold)``), or None for plain signs."""
        reader = self.threshold_reader
        return None if reader is None else reader.threshold

    def pack_for(self, reader: PackedConv2d) -> None:
        """Pack the output for ``reader``: against its threshold, if it has one."""
        self.pack_output = True
        self.__dict__["_threshold_reader"] = reader if reader.threshold is not None else None

    def fused(self) -> FusedConv2d:
        """The conv's kernel call with its weights bound, made again when the conv's buffers
        are replaced (``.to()``, ``load_state_dict`` with ``assign``)."""
        bound = self.__dict__.get("_fused")
        buffers = self.__dict__["_modules"]["conv"]._buffers  # direct: a module attribute costs ~0.5 us
        if (
            bound is None
            or bound.wp is not buffers["weight_packed"]
            or bound.scale is not buffers.get("scale")
            or bound.bias is not buffers.get("bias")
        ):
            c = self.conv
            geometry = (c.kernel_size, c.stride, c.padding, c.dilation, c.groups)
            bound = FusedConv2d(c.weight_packed, c.in_channels, *geometry, c.scale, c.bias)
            self.__dict__["_fused"] = bound  # a cache, not state: kept out of the module's attributes
        return bound

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Any:
        fused = self.fused()
        if not self.packed_input:
            c = self.conv
            threshold = c.threshold
            if threshold is not None and x.dtype != torch.float32:
                x, threshold = x - threshold.view(1, -1, 1, 1), None
            x = pack_signs(x, c.groups, threshold)  # channels_last input packs without a copy
        # an add that broadcasts (a bias, a scalar) stays a float add after the conv
        broadcast = residual is not None and residual.shape != fused.output_shape(x)
        if residual is not None and not broadcast and residual.dtype == torch.float32:
            residual = residual.contiguous(memory_format=torch.channels_last)  # no copy when it is
        fused_residual = None if broadcast else residual
        pack_threshold = self.pack_threshold if self.pack_output else None
        out, packed = fused(
            x,
            fused_residual,
            self.float_output or broadcast,
            self.pack_output and not broadcast,
            self.into_residual and fused_residual is not None,
            pack_threshold,
            () if broadcast else self.rprelu_parameters(),
        )
        if broadcast:
            out = cast(Tensor, out) + cast(Tensor, residual)
            if self.rprelu is not None:
                out = self.rprelu(out)
            packed = pack_signs(out, threshold=pack_threshold) if self.pack_output else None
        if self.float_output and self.pack_output:
            return out, packed
        return out if self.float_output else packed

    def extra_repr(self) -> str:
        parts = ["packed input" if self.packed_input else "float input"]
        if self.residual:
            parts.append("+ residual")
        if self.rprelu is not None:
            parts.append("then RPReLU")
        parts.append("->" + " float" * self.float_output + " packed" * self.pack_output)
        if self.pack_output and self.threshold_reader is not None:
            parts.append("packed against the reader's threshold")
        if self.into_residual:
            parts.append("in place of the residual")
        return ", ".join(parts)


class _Tracer(torch.fx.Tracer):
    """Stops at the packed and sign layers (their forward calls the kernels), at RPReLU (one
    call in the C++ runner, not eight traced ops) and at PyTorch's own modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(
            m, (PackedConv2d, PackedLinear, PackedWeightLinear, SignConv2d, SignLinear, RPReLU)
        ) or super().is_leaf_module(m, qualname)


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _drop_identities(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if isinstance(_module(gm, node), nn.Identity) and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _fuse_residuals(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, PackedStep]:
    """Every PackedConv2d call becomes a PackedStep node; an add that is its only consumer
    moves into its epilogue. Returns the step of each new node."""
    steps: dict[torch.fx.Node, PackedStep] = {}
    count = 0
    for node in list(gm.graph.nodes):
        conv = _module(gm, node)
        if not isinstance(conv, PackedConv2d) or len(node.args) != 1 or node.kwargs:
            continue
        x = node.args[0]
        residual: Any = None
        add = next(iter(node.users)) if len(node.users) == 1 else None
        if (
            add is not None
            and add.op == "call_function"
            and add.target in _ADDS
            and len(add.args) == 2
            and not add.kwargs
            and add.args.count(node) == 1
        ):
            other = add.args[1] if add.args[0] is node else add.args[0]
            residual = other if isinstance(other, torch.fx.Node) else None
        step = PackedStep(conv, packed_input=False, residual=residual is not None, float_output=True, pack_output=False)
        name = f"_plan_step{count}"
        count += 1
        gm.add_submodule(name, step)
        anchor = add if residual is not None else node
        with gm.graph.inserting_before(anchor):
            new = gm.graph.call_module(name, (x, residual) if residual is not None else (x,))
        if residual is not None:
            add.replace_all_uses_with(new)  # type: ignore[union-attr]
            gm.graph.erase_node(add)  # type: ignore[arg-type]
        else:
            node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        steps[new] = step
    return steps


def _fuse_rprelus(gm: torch.fx.GraphModule, steps: dict[torch.fx.Node, PackedStep]) -> None:
    """An RPReLU that alone reads a step's output moves into the step's epilogue (ReActNet's
    unit, ``RPReLU(BN(conv(x)) + x)``): its users read the step instead."""
    for node, step in steps.items():
        if len(node.users) != 1:
            continue
        act = next(iter(node.users))
        module = _module(gm, act)
        if type(module) is not RPReLU or act.args != (node,) or act.kwargs:
            continue
        step.__dict__["_rprelu"] = module
        act.replace_all_uses_with(node)
        gm.graph.erase_node(act)


def _chain_packed(gm: torch.fx.GraphModule, steps: dict[torch.fx.Node, PackedStep]) -> None:
    """A step whose output some steps binarise (one group; no threshold, or else one threshold
    tensor) also writes the packed signs; those steps read them. Every other use (a shortcut,
    a pool, the residual of the next unit) keeps the float output."""
    for producer, step in steps.items():
        readers = _binarising_readers(producer, steps, thresholds=True)
        if not readers:
            continue
        step.pack_for(steps[readers[0]].conv)
        step.float_output = any(u not in readers or producer in u.args[1:] for u in producer.users)
        _split_packed_output(gm, producer, readers, steps, step.float_output)


class ChannelsLastMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no dilation, no ceil mode) on channels_last float maps by the CPU
    kernels' pool (``bnas.kernels.max_pool2d_nhwc``): every input byte read once. With
    ``pack_output`` (set by the plan when a binary conv reads the pooled map) it returns
    ``(pooled, its packed signs)``, both written in the same pass."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel_size, self.stride, self.padding = (_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding))
        self.pack_output = False

    def forward(self, x: Tensor) -> Any:
        if x.dim() != 4 or x.dtype != torch.float32:
            out = F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
            return (out, pack_signs(out)) if self.pack_output else out
        if self.pack_output:
            return max_pool2d_and_pack(x, self.kernel_size, self.stride, self.padding)
        return max_pool2d_nhwc(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        packed = ", -> float packed" if self.pack_output else ""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}{packed}"


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _channels_last_pools(gm: torch.fx.GraphModule) -> None:
    count = 0
    for node in list(gm.graph.nodes):
        pool = _module(gm, node)
        if (
            not isinstance(pool, nn.MaxPool2d)
            or pool.ceil_mode
            or pool.return_indices
            or _pair(pool.dilation) != (1, 1)
            or any(2 * p > k for p, k in zip(_pair(pool.padding), _pair(pool.kernel_size), strict=True))
        ):
            continue
        name = f"_plan_pool{count}"
        count += 1
        gm.add_submodule(name, ChannelsLastMaxPool2d(pool))
        node.target = name


class ChannelsLastPointwiseConv2d(nn.Module):
    """A 1x1 ``nn.Conv2d`` (no padding, one group), on the 2x2/2 average pool of its input
    when ``pool`` is 2, by :func:`bnas.kernels.pointwise_conv2d`: one pass, channels_last, in
    ``precision`` "float32" or "int8". It reads the conv's weight and bias at every call, so it
    follows them when they change."""

    conv: nn.Conv2d

    def __init__(self, conv: nn.Conv2d, pool: int, ceil_mode: bool = False, precision: str = "float32"):
        super().__init__()
        # the tree's conv, held but not a child: this module stays a leaf (one float op, as
        # profiles count them) and the conv's parameters keep one owner
        self.__dict__["conv"] = conv
        self.pool, self.stride, self.ceil_mode = pool, _pair(conv.stride)[0], ceil_mode
        self.precision = precision

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv2d(
            x, self.conv.weight, self.conv.bias, self.pool, self.stride, self.ceil_mode, self.precision
        )

    def extra_repr(self) -> str:
        if self.pool == 2:
            return f"{self.precision} avg_pool 2x2/2{' ceil_mode' * self.ceil_mode} -> 1x1 conv"
        return f"{self.precision} 1x1 conv, stride={self.stride}"


def _is_pointwise(conv: nn.Module | None) -> bool:
    if type(conv) is not nn.Conv2d:  # subclasses (binary convs) compute something else
        return False
    stride = _pair(conv.stride)
    return (
        _pair(conv.kernel_size) == (1, 1)
        and not isinstance(conv.padding, str)  # "valid" or "same"
        and _pair(conv.padding) == (0, 0)
        and _pair(conv.dilation) == (1, 1)
        and conv.groups == 1
        and stride[0] == stride[1]
    )


def _is_halving_avg_pool(pool: nn.Module | None) -> bool:
    if type(pool) is not nn.AvgPool2d:
        return False
    return (
        _pair(pool.kernel_size) == (2, 2)
        and _pair(pool.stride if pool.stride is not None else pool.kernel_size) == (2, 2)
        and _pair(pool.padding) == (0, 0)  # then a window cut by ceil mode averages what it holds
        and pool.divisor_override is None
    )


def _pointwise_convs(gm: torch.fx.GraphModule, int8_shortcuts: bool = False) -> None:
    """1x1 float convs, each with the 2x2/2 average pool that only it reads, become
    :class:`ChannelsLastPointwiseConv2d` nodes; in int8 with ``int8_shortcuts`` (those of up
    to ``MAX_TAPS`` input channels, whose integer sums are exact), else in float32."""
    count = 0
    for node in list(gm.graph.nodes):
        module = _module(gm, node)
        if not _is_pointwise(module) or len(node.args) != 1 or node.kwargs:
            continue
        conv = cast(nn.Conv2d, module)
        precision = "int8" if int8_shortcuts and conv.in_channels <= MAX_TAPS else "float32"
        source = node.args[0]
        pool_node = source if isinstance(source, torch.fx.Node) else None
        if not (
            pool_node is not None
            and _is_halving_avg_pool(_module(gm, pool_node))
            and len(pool_node.users) == 1
            and len(pool_node.args) == 1
            and not pool_node.kwargs
            and _pair(conv.stride) == (1, 1)
        ):
            pool_node = None
        name = f"_plan_pointwise{count}"
        count += 1
        if pool_node is None:
            pointwise = ChannelsLastPointwiseConv2d(conv, pool=1, precision=precision)
        else:
            avg_pool = cast(nn.AvgPool2d, _module(gm, pool_node))
            pointwise = ChannelsLastPointwiseConv2d(conv, pool=2, ceil_mode=avg_pool.ceil_mode, precision=precision)
        gm.add_submodule(name, pointwise)
        node.target = name
        if pool_node is not None:
            node.update_arg(0, pool_node.args[0])
            gm.graph.erase_node(pool_node)


# Below this many multiply-adds per image a float32 stem stays PyTorch's conv: the kernel's
# fixed cost per call (about 15 us with the image's padded copy) then outweighs its speed
# (benchmarks/stem_conv.py: 0.82-0.83x on fashion_handcrafted's 56 K-MAC stem, 1.75-1.9x on
# the 1.8 M-MAC stem of bireal_resnet18).
FLOAT_STEM_KERNEL_MIN_MACS = 500_000


class ImageConv2d(nn.Module):
    """A float ``nn.Conv2d`` that reads the image (the stem) on the stem kernels,
    :func:`bnas.kernels.image_conv2d`: in ``precision`` "float32" a direct conv that sums in an
    order of its own (PyTorch's result to float rounding; PyTorch's conv itself on stems under
    ``FLOAT_STEM_KERNEL_MIN_MACS`` per image), or "int8" (the plan's ``int8_stem``: the image
    quantized per call, by its range or on pixel grid ``grid``, the weights per output channel,
    once, cached). It reads the conv's weight and bias at every call, so it follows them when
    they change."""

    conv: nn.Conv2d

    def __init__(self, conv: nn.Conv2d, precision: str, grid: PixelGrid | None = None):
        super().__init__()
        self.__dict__["conv"] = conv  # held, not a child: a leaf, as ChannelsLastPointwiseConv2d
        self.stride, self.padding = _pair(conv.stride), _pair(cast(tuple[int, int], conv.padding))
        self.precision = precision
        self.grid = grid

    def small_float_stem(self, x: Tensor) -> bool:
        """Whether ``x`` (N, C, H, W) makes this a float32 stem under
        ``FLOAT_STEM_KERNEL_MIN_MACS`` per image, which runs PyTorch's conv."""
        if self.precision != "float32":
            return False
        k, _, kh, kw = self.conv.weight.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        oh, ow = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
        return k * x.shape[1] * kh * kw * max(oh, 0) * max(ow, 0) < FLOAT_STEM_KERNEL_MIN_MACS

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if x.dim() == 4 and self.small_float_stem(x):
            return F.conv2d(
                x.contiguous(memory_format=torch.channels_last), c.weight, c.bias, self.stride, self.padding
            )
        return image_conv2d(x, c.weight, c.bias, self.stride, self.padding, self.precision, self.grid)

    def extra_repr(self) -> str:
        grid = f", grid={self.grid}" if self.grid is not None else ""
        return f"{self.precision} {tuple(self.conv.weight.shape)}, stride={self.stride}, padding={self.padding}{grid}"


class ImageConvMaxPool2d(ChannelsLastMaxPool2d):
    """A float conv on the image and the channels_last max-pool that alone reads it (ResNet's
    stem: 7x7/2 conv, BN folded, 3x3/2 pool) in one pass, :func:`bnas.kernels.conv2d_max_pool`:
    the conv's rows stay in cache for the pool and its full output is never written. In
    ``precision`` "float32" (the conv sums in its own order: PyTorch's result to float rounding)
    or "int8" (the plan's ``int8_stem``, on pixel grid ``grid`` when given); with
    ``pack_output`` the pooled map's signs come too. It reads the conv's weight and bias at
    every call."""

    conv: nn.Conv2d

    def __init__(self, conv: nn.Conv2d, pool: ChannelsLastMaxPool2d, precision: str, grid: PixelGrid | None = None):
        super().__init__(nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding))
        self.__dict__["conv"] = conv  # held, not a child: a leaf, as ChannelsLastPointwiseConv2d
        self.conv_stride, self.conv_padding = _pair(conv.stride), _pair(cast(tuple[int, int], conv.padding))
        self.precision = precision
        self.grid = grid

    def forward(self, x: Tensor) -> Any:
        c = self.conv
        return conv2d_max_pool(
            x, c.weight, c.bias, self.conv_stride, self.conv_padding, self.kernel_size, self.stride,
            self.padding, pack_output=self.pack_output, precision=self.precision, grid=self.grid,
        )  # fmt: skip

    def extra_repr(self) -> str:
        grid = f", grid={self.grid}" if self.grid is not None else ""
        conv = f"{self.precision} conv {tuple(self.conv.weight.shape)}, stride={self.conv_stride}{grid}"
        return f"{conv} -> max-pool {super().extra_repr()}"


def _image_convs(gm: torch.fx.GraphModule, int8_stem: bool, grid: PixelGrid | None = None) -> None:
    """Plain float convs on the network's input (one group, no dilation, zero padding given as
    numbers, at most MAX_TAPS taps per output: few input channels, which the stem kernels are
    made for): one that only a channels_last max-pool reads becomes, with the pool, an
    :class:`ImageConvMaxPool2d` node, any other an :class:`ImageConv2d` node; in int8 with
    ``int8_stem`` (on pixel grid ``grid`` when given), else in float32."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    count = 0
    for node in list(gm.graph.nodes):
        conv = _module(gm, node)
        if (
            type(conv) is not nn.Conv2d
            or len(node.args) != 1
            or node.kwargs
            or node.args[0] not in placeholders
            or isinstance(conv.padding, str)
            or conv.padding_mode != "zeros"
            or conv.groups != 1
            or _pair(conv.dilation) != (1, 1)
            or conv.in_channels * conv.weight.shape[2] * conv.weight.shape[3] > MAX_TAPS
        ):
            continue
        precision = "int8" if int8_stem else "float32"
        pool_node = next(iter(node.users)) if len(node.users) == 1 else None
        pool = _module(gm, pool_node) if pool_node is not None else None
        name = f"_plan_image_conv{count}"
        count += 1
        if pool_node is not None and type(pool) is ChannelsLastMaxPool2d and pool_node.args == (node,):
            gm.add_submodule(name, ImageConvMaxPool2d(conv, pool, precision, grid if int8_stem else None))
            gm.delete_submodule(str(pool_node.target))  # the pool module the plan made: now unused
            pool_node.target = name
            pool_node.update_arg(0, node.args[0])
            gm.graph.erase_node(node)
        else:
            gm.add_submodule(name, ImageConv2d(conv, precision, grid if int8_stem else None))
            node.target = name


class KernelLinear(nn.Module):
    """A float ``nn.Linear`` (the classifier) by :func:`bnas.kernels.linear`: on AVX-512 CPUs
    its weight rows split among the kernels' threads at small batch, a 1x1-conv GEMM at larger
    ones; it sums in an order of its own (PyTorch's result to float rounding). In ``precision``
    "int8" the layer runs in 8-bit integers (``bnas.kernels.linear(..., precision="int8")``). It
    reads the layer's weight and bias at every call, so it follows them when they change."""

    linear: nn.Linear

    def __init__(self, layer: nn.Linear, precision: str = "float32"):
        super().__init__()
        self.__dict__["linear"] = layer  # held, not a child: a leaf, as ChannelsLastPointwiseConv2d
        self.precision = precision

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.linear.weight, self.linear.bias, self.precision)

    def extra_repr(self) -> str:
        return f"{self.precision} in_features={self.linear.in_features}, out_features={self.linear.out_features}"


# A float linear layer of fewer multiply-adds per input row stays float32 under ``int8_head``:
# int8 buys it no time (one quantization pass per row, and the weights are small anyway:
# `python benchmarks/int8_head.py`, alone, warm, batch 1, one thread, on a Zen 4: float32 ran
# 0.61-0.84x int8's time from 500 -> 10 to 512 -> 128, 1.01-1.07x at 512 -> 256 and 1.98-2.03x
# at 512 -> 1000), while its rounding can move a prediction (one of 10,000 MNIST test images of
# a binary_lenet5, whose 500 -> 10 head is 5,000 multiply-adds).
INT8_HEAD_MIN_MACS = 131_072


def int8_head_runs(in_features: int, out_features: int) -> bool:
    """Whether ``int8_head`` runs a float linear layer of this shape in 8-bit integers: its sums
    exact (at most ``MAX_TAPS`` inputs) and worth it (at least ``INT8_HEAD_MIN_MACS``
    multiply-adds per row)."""
    return in_features <= MAX_TAPS and in_features * out_features >= INT8_HEAD_MIN_MACS


def _float_linears(gm: torch.fx.GraphModule, int8_head: bool = False) -> None:
    """Plain float ``nn.Linear`` layers become :class:`KernelLinear` nodes. Even a 512 -> 10
    head gains: alone and warm, PyTorch's linear is 2-3 us faster at batch 1 (the kernel's
    Python dispatch, which a lowered program skips), but in a Bi-Real ResNet-18 forward it took
    25-30 us, and a 32x32 forward ran 0.05-0.06 ms faster on the kernel (1 and 2 threads,
    interleaved); from batch 100 the kernel is faster alone too (36 against 23 us for
    500 -> 10). With ``int8_head`` those of up to ``MAX_TAPS`` inputs and at least
    ``INT8_HEAD_MIN_MACS`` multiply-adds per row (ResNet's 512 -> 1000 head) run in 8-bit
    integers."""
    count = 0
    for node in list(gm.graph.nodes):
        layer = _module(gm, node)
        if type(layer) is not nn.Linear or len(node.args) != 1 or node.kwargs:  # subclasses compute otherwise
            continue
        name = f"_plan_linear{count}"
        count += 1
        precision = "int8" if int8_head and int8_head_runs(layer.in_features, layer.out_features) else "float32"
        gm.add_submodule(name, KernelLinear(layer, precision))
        node.target = name


class GlobalAvgPool2d(nn.Module):
    """``x.mean(dim=dims)`` (``dims`` the last two of an (N, C, H, W) map: ``(2, 3)`` or
    ``(-2, -1)``) by :func:`bnas.kernels.global_avg_pool2d` (a classifier's input; it sums in
    an order of its own); an input of another rank (the trace does not know ranks) gets
    PyTorch's mean over the same dims."""

    def __init__(self, dims: tuple[int, int] = (2, 3)):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return global_avg_pool2d(x) if x.dim() == 4 else x.mean(dim=self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def _global_pools(gm: torch.fx.GraphModule) -> None:
    """``mean(dim=(2, 3))`` calls (the ``global_avgpool`` head), without keepdim or a dtype,
    become :class:`GlobalAvgPool2d` nodes."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_method" or node.target != "mean" or not isinstance(node.args[0], torch.fx.Node):
            continue
        dims = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim") if len(node.args) == 1 else None
        if not isinstance(dims, (tuple, list)) or tuple(dims) not in ((2, 3), (-2, -1)):
            continue
        if set(node.kwargs) - {"dim"}:  # keepdim or dtype: left to PyTorch
            continue
        name = f"_plan_global_pool{count}"
        count += 1
        gm.add_submodule(name, GlobalAvgPool2d((int(dims[0]), int(dims[1]))))
        with gm.graph.inserting_after(node):
            pool = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(pool)
        gm.graph.erase_node(node)


def _binarising_readers(
    node: torch.fx.Node, steps: dict[torch.fx.Node, PackedStep], thresholds: bool = False
) -> list[torch.fx.Node]:
    """The steps that binarise ``node`` as their input in one group, without a threshold: they
    can read its signs packed instead. With ``thresholds`` (a producer that can pack against a
    threshold), where there are none, the steps that binarise it against the first one's
    threshold tensor."""
    readers = [u for u in node.users if u in steps and u.args[0] is node and steps[u].conv.groups == 1]
    plain = [u for u in readers if steps[u].conv.threshold is None]
    if plain or not readers or not thresholds:
        return plain
    threshold = steps[readers[0]].conv.threshold
    return [u for u in readers if steps[u].conv.threshold is threshold]


def _split_packed_output(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    readers: list[torch.fx.Node],
    steps: dict[torch.fx.Node, PackedStep],
    float_output: bool,
) -> None:
    """``node`` now returns ``(float, packed)`` (or only the packed words when nothing else
    reads it, ``float_output`` False): ``readers`` take the packed words, every other use
    the float output."""
    graph = gm.graph
    if float_output:
        float_uses = [u for u in node.users if u not in readers or node in u.args[1:]]
        with graph.inserting_after(node):
            packed = graph.call_function(operator.getitem, (node, 1))
            float_out = graph.call_function(operator.getitem, (node, 0))
        for u in float_uses:
            u.replace_input_with(node, float_out)
    else:
        packed = node
    for u in readers:
        u.update_arg(0, packed)
        steps[u].packed_input = True


def _chain_pool_packing(gm: torch.fx.GraphModule, steps: dict[torch.fx.Node, PackedStep]) -> None:
    """A channels_last max-pool whose output a step binarises (the stem's pool before the first
    Bi-Real unit) also writes the packed signs; the step reads them instead of packing the
    pooled map in a pass of its own."""
    for node in list(gm.graph.nodes):
        pool = _module(gm, node)
        if not isinstance(pool, ChannelsLastMaxPool2d):
            continue
        readers = _binarising_readers(node, steps)
        if readers:
            pool.pack_output = True
            _split_packed_output(gm, node, readers, steps, float_output=True)


# What produces a fresh tensor that no one else holds: a step may overwrite it.
_FRESH_MODULES = (
    nn.Conv2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.BatchNorm2d,
    ChannelsLastMaxPool2d,
    ChannelsLastPointwiseConv2d,
    ImageConv2d,
)


def _write_into_residuals(gm: torch.fx.GraphModule, steps: dict[torch.fx.Node, PackedStep]) -> None:
    """A step whose residual is a fresh float tensor that nothing reads after the step writes
    its output into that buffer (a Bi-Real unit's shortcut stream: no new tensor per unit, and
    half the memory traffic)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node, step in steps.items():
        if not step.residual or not step.float_output or len(node.args) < 2:
            continue
        res = node.args[1]
        if not isinstance(res, torch.fx.Node):
            continue
        fresh = isinstance(_module(gm, res), _FRESH_MODULES) or (
            res.op == "call_function"
            and res.target is operator.getitem
            and res.args[1] == 0
            and isinstance(res.args[0], torch.fx.Node)
            and (res.args[0] in steps or isinstance(_module(gm, res.args[0]), ChannelsLastMaxPool2d))
        )
        read_later = any(order[u] > order[node] for u in res.users)
        if fresh and not read_later:
            step.into_residual = True


def _channels_last_input(gm: torch.fx.GraphModule) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return
    x = placeholders[0]
    with gm.graph.inserting_after(x):
        cl = gm.graph.call_function(_to_channels_last, (x,))
    x.replace_all_uses_with(cl)
    cl.update_arg(0, x)
    for user in list(cl.users):  # the stem kernels read NCHW input as it comes: no copy first
        if isinstance(_module(gm, user), (ImageConv2d, ImageConvMaxPool2d)):
            user.replace_input_with(cl, x)


def _to_channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


torch.fx.wrap("_to_channels_last")


def build_plan(
    net: nn.Module,
    int8_stem: bool = False,
    int8_shortcuts: bool = False,
    int8_head: bool = False,
    input_grid: PixelGrid | None = None,
) -> torch.fx.GraphModule | None:
    """The fused program of a packed network's module tree (see the module docstring), or
    None when the tree cannot be traced. The plan shares the tree's modules and buffers.
    ``int8_stem`` runs the float convs that read the image in 8-bit integers
    (:class:`ImageConv2d`, :class:`ImageConvMaxPool2d`), ``int8_shortcuts`` the 1x1 float
    convs (:class:`ChannelsLastPointwiseConv2d`: Bi-Real's downsample shortcuts),
    ``int8_head`` the float linear layers (:class:`KernelLinear`: the classifier).
    ``input_grid``: the pixel grid of the images the network reads, which the int8 stem
    quantizes on (``bnas.kernels.int8``)."""
    try:
        graph = _Tracer().trace(net)
    except Exception as exc:  # any tracing failure means: run the module tree
        log.debug("packed network not traceable, it runs as a module tree: %s: %s", type(exc).__name__, exc)
        return None
    gm = torch.fx.GraphModule(net, graph)
    _drop_identities(gm)
    steps = _fuse_residuals(gm)
    _fuse_rprelus(gm, steps)
    _chain_packed(gm, steps)
    _channels_last_pools(gm)
    _pointwise_convs(gm, int8_shortcuts)
    _image_convs(gm, int8_stem, input_grid)
    _float_linears(gm, int8_head)
    _global_pools(gm)
    _chain_pool_packing(gm, steps)
    _write_into_residuals(gm, steps)
    _channels_last_input(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
