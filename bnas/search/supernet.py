"""One-shot search: a weight-sharing supernet over a search space (issue 14).

Every genotype of a space is a *path* through one supernet: ``Supernet.network(genotype)``
builds the genotype with the ordinary builder, but every op, cell-input and residual module
comes from the supernet's shared table (``bnas.builder.ModuleProvider``), so a path's weights
are the supernet's own tensors, not copies. ``train_supernet_epoch`` trains the table by
uniform single-path sampling (one genotype per batch); ``score`` then rates a genotype in
seconds with the weights it inherits, after re-estimating its BatchNorm statistics
(``recalibrate_bn``), and ``extract`` copies them into a stand-alone ``bnas.build`` network.

What a shared module's weights mean is its key (see ``bnas.builder._build``):

* a body unit's modules start with its stage (the number of stride-2 units up to and
  including it) and its position in the stage, so a stage sampled at a smaller depth uses a
  *prefix* of its deepest version's units;
* then, for a cell edge, the node, the edge slot, the op with its options, the stride and the
  widths. The edge's source is not in the key: any source has the cell's shape, except that
  edges from the cell inputs of a reduction cell run at stride 2, and the stride is;
* for a cell's input preprocessing (``pre0``, ``pre1``), its kind, the input's shape and the
  cell's width; for a residual, the input and output shapes; for the stem and head, the
  entry's index, its op and its widths.

Widths: with ``widths="separate"`` (the default) every width choice has its own modules, one
supernet per width sharing nothing across widths. With ``widths="sliced"`` they are sliced
out of one widest tensor, as once-for-all networks do. On ``fashion_mnist_cells`` slicing
trained paths to higher accuracy but ranked architectures worse (README, Results), hence
the default.

Kernels: with ``kernels="separate"`` (the default) every op of a cell edge has its own weights.
With ``kernels="entangled"`` the ops of one place (the same edge, stride and widths) that
each hold one spatial conv kernel of the same channels share it, AutoFormer's weight entanglement
(Chen et al. 2021): a smaller kernel is the centre of the place's largest, so
``binary_conv_3x3``, ``binary_dil_conv_3x3`` and ``bireal_block`` all train the centre 3x3 of
``binary_conv_5x5``. Each op keeps its own BatchNorm and quantizers. Every sampled conv op
then trains the shared kernel, so paths learn in fewer epochs (``docs/oneshot-experiments.md``).

Slicing: modules whose keys differ only in their widths (the key's last part, ``16>16`` or
``32x14x14>24``) are still made separately, since bnas ops come from arbitrary registered
factories and only a factory knows how a width shapes its module. Then, in a space with a
choice of widths, each tensor of a narrower one is re-pointed at the leading block of the
same tensor of the widest (``_tie_widths``): a conv weight ``[16, 16, 3, 3]`` is
``widest[:16, :16]``, a BatchNorm's statistics ``widest[:16]``. A narrow path thus trains
the first channels of the wide one, every width training the same storage; each width keeps
its own optimiser state. Tensors whose trailing dimensions (past the first two) differ, or
whose shapes no single member covers, are left untied.

Every module a genotype of the space can use is made when the supernet is (so the optimiser
sees every parameter from the start and the state_dict never changes shape); a genotype
outside the space is refused (``SupernetError``) rather than silently given untrained modules.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..binarize import clip_latent_weights, set_binarization
from ..builder import BinaryNetwork, _build, build, check_ops
from ..data import DataSplits
from ..errors import BnasError, GenotypeError
from ..genotype import Genotype
from ..train.loop import evaluate_accuracy
from ..train.losses import distill_loss, task_loss
from ..train.optimiser import make_optimizer, set_lr
from ..train.recipe import Recipe, TrainingError
from .linear_probe import probe_accuracy
from .space import SearchSpace, sample_genotype

__all__ = [
    "EpochStats",
    "KERNELS",
    "Supernet",
    "SupernetError",
    "WIDTHS",
    "calibration_batches",
    "extract",
    "finetune_inherited",
    "make_supernet_optimizer",
    "path_angle",
    "recalibrate_bn",
    "score",
    "supernet_recipe",
    "supernet_step",
    "train_supernet_epoch",
]

log = logging.getLogger(__name__)

Choices = dict[str, Any]

# How a supernet holds a module at several widths (``Supernet(widths=...)``, module doc).
WIDTHS = ("separate", "sliced")
# Whether the conv ops of one place share their kernel (``Supernet(kernels=...)``, module doc).
KERNELS = ("separate", "entangled")

# An op's key (``bnas.builder._make_op``): its place, the op with its options, stride, widths.
_OP_KEY = re.compile(r"^(?P<place>.+)/(?P<op>[^/]+)/(?P<stride>s\d+)/(?P<widths>\d+>\d+)$")


class SupernetError(BnasError):
    """A genotype the supernet cannot serve, or a supernet call that cannot work as asked."""


# --------------------------------------------------------------------------------------
# Choices: the parameters ``sample_genotype`` asks for, answered by a rule
# --------------------------------------------------------------------------------------
class _Answer:
    """A trial-like object (``suggest_categorical``) answering with ``pick(name, choices)``;
    records what it answered in ``params``."""

    number = 0

    def __init__(self, pick: Callable[[str, list[Any]], Any]):
        self.pick = pick
        self.params: Choices = {}
        self.sizes: dict[str, int] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        value = self.pick(name, choices)
        self.params[name] = value
        self.sizes[name] = len(choices)
        return value


def _answer_at(orders: Mapping[str, list[Any]], position: int, key: str, options: list[Any]) -> Any:
    return orders[key][position]


def _is_cell_choice(name: str) -> bool:
    # ``sample_genotype`` names cell choices ``normal.n0.e1.op``; macro ones ``channels``,
    # ``stage1.channels``, ``stage1.cells``, ``stage1.op``.
    return name.startswith(("normal.", "reduce."))


def _is_width(name: str) -> bool:
    return name == "channels" or name.endswith(".channels")


def _is_depth(name: str) -> bool:
    return name.endswith(".cells")


# --------------------------------------------------------------------------------------
# The supernet
# --------------------------------------------------------------------------------------
def _module_name(key: str) -> str:
    """A ModuleDict name for ``key``: its dots (and the escape character) percent-encoded,
    so names stay readable and distinct keys never meet."""
    return key.replace("%", "%25").replace(".", "%2E")


class Supernet(nn.Module):
    """Every module any genotype of ``space`` uses, shared between genotypes (module doc).

    ``shared`` (an ``nn.ModuleDict``) is the only thing registered, so ``state_dict()``,
    ``parameters()`` and ``.to(device)`` cover exactly the shared weights. Its names are the
    keys with their dots percent-encoded (``s1%2Ep0/n0%2Ee1/binary_conv_3x3/s2/16>16``), made
    in the same order for every supernet of a space, so a state_dict loads into a new one.
    Networks built by ``network`` are cached (``cache_size`` most recent, by
    ``Genotype.canonical_hash``) and hold the same module objects; they are not submodules.

    Making every module takes one build per combination of the space's macro choices (widths,
    depths, stage ops) plus a few per op: about a second for ``fashion_mnist_cells`` (36
    combinations), some 20 s for ``bars_macro`` (486) on one CPU core.
    """

    def __init__(self, space: SearchSpace, cache_size: int = 64, widths: str = "separate", kernels: str = "separate"):
        super().__init__()
        if cache_size < 1:
            raise SupernetError(f"cache_size must be at least 1 (networks kept for reuse), got {cache_size}")
        if widths not in WIDTHS:
            raise SupernetError(f"widths must be one of {', '.join(WIDTHS)}, got {widths!r}")
        if kernels not in KERNELS:
            raise SupernetError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        self.space = space
        self.widths = widths
        self.kernels = kernels
        self.shared = nn.ModuleDict()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, BinaryNetwork] = OrderedDict()
        self._building = True
        self._missing_genotype: str = ""
        self._lists = _choice_lists(space)
        # How it was trained (``bnas.search.supernet_run`` fills it: epochs, seed, dataset, path).
        self.meta: dict[str, Any] = {}
        for choices in self._covering():
            _build(self.genotype(choices), provider=self._provide)
        self._building = False
        self._tie()
        log.info("supernet of %s: %d shared modules, %d parameters", space.name, len(self.shared), self.num_params())

    # -- widths: narrower modules are views of the widest ---------------------------------
    def _width_groups(self) -> list[list[tuple[str, Tensor, nn.Module, str, bool]]]:
        """Tensors to tie: per (key without its widths, tensor name, rank, dimensions past the first
        two), every module's tensor as ``(full name, tensor, owner, attribute, is_parameter)``."""
        groups: dict[tuple[str, str, int, tuple[int, ...]], list[tuple[str, Tensor, nn.Module, str, bool]]] = {}
        for name, module in self.shared.items():
            prefix = name.rsplit("/", 1)[0]
            for owner_name, owner in module.named_modules():
                tensors = [(n, t, True) for n, t in owner._parameters.items() if t is not None]
                tensors += [(n, t, False) for n, t in owner._buffers.items() if t is not None]
                for attr, tensor, is_param in tensors:
                    if tensor.dim() == 0 or not tensor.is_floating_point():
                        continue  # counters (num_batches_tracked) stay per module
                    local = f"{owner_name}.{attr}" if owner_name else attr
                    sig = (prefix, local, tensor.dim(), tuple(tensor.shape[2:]))
                    groups.setdefault(sig, []).append((f"{name}.{local}", tensor, owner, attr, is_param))
        return [members for members in groups.values() if len(members) > 1]

    def _tie_widths(self) -> None:
        """Point every narrower tensor at the leading block of its group's widest one (module doc).

        Only in a space with a choice of widths: with one width, the only keys that differ
        in their last part are cell-input alignments reading inputs of different widths (the
        stem or a cell), which are not one module at two widths."""
        self._tied = 0
        if self.widths != "sliced" or not any(_is_width(k) and len(v) > 1 for k, v in self._lists.items()):
            return
        for members in self._width_groups():
            widest = max(members, key=lambda m: m[1].numel())[1]
            if not all(all(a <= b for a, b in zip(t.shape, widest.shape, strict=True)) for _, t, *_ in members):
                log.debug("untied (no member covers the others): %s", ", ".join(m[0] for m in members))
                continue
            for _, tensor, owner, attr, is_param in members:
                if tensor is widest:
                    continue
                block = widest.detach()[tuple(slice(0, n) for n in tensor.shape)]
                if is_param:
                    tensor.data = block
                else:
                    owner._buffers[attr] = block
                self._tied += 1

    # -- kernels: an edge's smaller kernels are the centre of its largest ------------------
    def _kernel_groups(self) -> list[list[Tensor]]:
        """Per place (an op key without its op) and channel shape, the conv kernels of the ops
        there that hold exactly one spatial kernel (a rank-4 parameter larger than 1x1: an op's
        1x1 shortcut projections are not its kernel)."""
        groups: dict[tuple[str, str, str, tuple[int, int]], list[Tensor]] = {}
        for name, module in self.shared.items():
            match = _OP_KEY.match(name)
            if match is None:
                continue  # cell inputs, residuals: not an op
            kernels = [p for p in module.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]
            if len(kernels) != 1:
                continue  # no conv, or several (which one would be shared is not defined)
            kernel = kernels[0]
            place = (match["place"], match["stride"], match["widths"], (kernel.shape[0], kernel.shape[1]))
            groups.setdefault(place, []).append(kernel)
        return [members for members in groups.values() if len(members) > 1]

    def _tie_kernels(self) -> None:
        """Point every smaller kernel of a place at the centre of its largest (module doc)."""
        if self.kernels != "entangled":
            return
        for members in self._kernel_groups():
            largest = max(members, key=lambda k: k.numel())
            height, width = largest.shape[2:]
            for kernel in members:
                kh, kw = kernel.shape[2:]
                if kernel is largest or kh > height or kw > width or (height - kh) % 2 or (width - kw) % 2:
                    continue  # not inside the largest, or no centre there: left on its own
                top, left = (height - kh) // 2, (width - kw) // 2
                kernel.data = largest.detach()[:, :, top : top + kh, left : left + kw]
                self._tied += 1

    def _tie(self) -> None:
        # Widths first: a narrower place's largest kernel is then already a view of the widest.
        self._tie_widths()
        self._tie_kernels()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Supernet:
        # Moving or casting copies every tensor on its own, views included: tie them again.
        super()._apply(fn, recurse)
        if not self._building:
            self._tie()
        return self

    # -- the table --------------------------------------------------------------------
    def _provide(self, key: str, make: Callable[[], nn.Module]) -> nn.Module:
        name = _module_name(key)
        if name in self.shared:
            return self.shared[name]
        if not self._building:
            raise SupernetError(
                f"genotype {self._missing_genotype!r} needs a module the supernet of space {self.space.name!r} "
                f"does not have ({key}): its widths, depths, ops or input are not among the space's choices; "
                "score it by training it on its own (bnas eval)"
            )
        module = make()
        self.shared[name] = module
        return module

    def num_params(self) -> int:
        """Distinct trainable numbers: a narrower width's tensors are views of the widest's."""
        storages: dict[int, int] = {}
        for p in self.parameters():
            storage = p.untyped_storage()
            storages[storage.data_ptr()] = max(
                storages.get(storage.data_ptr(), 0), storage.nbytes() // p.element_size()
            )
        return sum(storages.values())

    @property
    def device(self) -> torch.device:
        return next((t.device for t in itertools.chain(self.parameters(), self.buffers())), torch.device("cpu"))

    # -- genotypes from choices -------------------------------------------------------
    def genotype(self, choices: Mapping[str, Any], name: str | None = None) -> Genotype:
        """The genotype of ``choices`` (``sample_genotype``'s parameter names and values)."""
        answer = _Answer(lambda key, options: choices[key])
        try:
            genotype = sample_genotype(answer, self.space)
        except KeyError as exc:
            raise SupernetError(f"choices for space {self.space.name!r} lack {exc.args[0]!r}") from exc
        return genotype if name is None else replace(genotype, name=name)

    def sample_choices(self, rng: random.Random) -> Choices:
        """Uniform, independent choices for every parameter of the space, drawn from ``rng``.

        Space constraints (``max_ops`` ...) are not applied: the supernet trains every path.
        """
        answer = _Answer(lambda key, options: options[rng.randrange(len(options))])
        sample_genotype(answer, self.space)
        return answer.params

    def fair_choices(self, rng: random.Random) -> list[Choices]:
        """Strict fairness (FairNAS, Chu et al. 2021): ``m`` paths, ``m`` the most options any
        choice of the space has, in which every choice takes each of its options equally often.
        A choice with ``m`` options (a cell edge's op, when the op list is the longest) takes
        each exactly once, so one step over the ``m`` paths trains every candidate op of every
        edge on the same batch; a choice with fewer options repeats a shuffled order of them.
        Orders are drawn from ``rng``, choice by choice in the space's order."""
        group = max(len(options) for options in self._lists.values())
        orders: dict[str, list[Any]] = {}
        for key, options in self._lists.items():
            order: list[Any] = []
            while len(order) < group:
                block = list(options)
                rng.shuffle(block)
                order += block
            orders[key] = order[:group]
        paths = []
        for position in range(group):
            answer = _Answer(functools.partial(_answer_at, orders, position))
            sample_genotype(answer, self.space)
            paths.append(answer.params)
        return paths

    def sample(self, rng: random.Random) -> Genotype:
        """A uniformly sampled genotype of the space (see ``sample_choices``)."""
        return self.genotype(self.sample_choices(rng), name=f"{self.space.name}-supernet-path")

    def largest_choices(self, choices: Mapping[str, Any]) -> Choices:
        """``choices`` with every stage at its widest width and deepest depth (the cells and
        stage ops kept): the teacher of in-place distillation for the path ``choices``."""
        out = dict(choices)
        for key, options in self._lists.items():
            if _is_width(key) or _is_depth(key):
                out[key] = max(options)
        return out

    # -- networks ---------------------------------------------------------------------
    def network(self, genotype: Genotype) -> BinaryNetwork:
        """``genotype``'s network, made of the supernet's own modules (no copies); cached."""
        key = genotype.canonical_hash()
        net = self._cache.get(key)
        if net is not None:
            self._cache.move_to_end(key)
            return net
        check_ops(genotype)
        self._missing_genotype = genotype.name
        try:
            net = _build(genotype, provider=self._provide)
        except GenotypeError as exc:
            raise SupernetError(f"genotype {genotype.name!r} cannot be built from the supernet: {exc}") from exc
        self._cache[key] = net
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return net

    def forward(self, x: Tensor, genotype: Genotype) -> Tensor:
        return self.network(genotype)(x)

    def _covering(self) -> Iterator[Choices]:
        """Choices whose networks together use every module any genotype of the space uses.

        Every combination of the macro choices (widths, depths, stage ops: the shapes that
        reach the cell inputs, residuals and head) with the first op everywhere; then, per
        op and per width index, the deepest network with that op on every edge, once with
        every edge reading a cell input (stride 2 in a reduction cell) and once with every
        edge reading the node before it where it can (stride 1).
        """
        lists = self._lists
        macro = [k for k in lists if not _is_cell_choice(k)]
        for combo in itertools.product(*(range(len(lists[k])) for k in macro)):
            picked = {k: lists[k][i] for k, i in zip(macro, combo, strict=True)}
            yield {**picked, **{k: v[0] for k, v in lists.items() if _is_cell_choice(k)}}
        if self.space.cells is None:
            return
        ops = list(self.space.cells.ops)
        n_widths = max((len(v) for k, v in lists.items() if _is_width(k)), default=1)
        for w, op, last in itertools.product(range(n_widths), ops, (False, True)):
            choices: Choices = {}
            for k, v in lists.items():
                if _is_width(k):
                    choices[k] = v[w % len(v)]
                elif _is_depth(k):
                    choices[k] = max(v)
                elif k.endswith(".op") and _is_cell_choice(k):
                    choices[k] = op
                elif _is_cell_choice(k):  # an edge's input
                    choices[k] = v[-1] if last else v[0]
                else:
                    choices[k] = v[0]
            yield choices


def _choice_lists(space: SearchSpace) -> dict[str, list[Any]]:
    """Every parameter ``sample_genotype`` asks for, with its choices (the names do not
    depend on the answers: a space asks the same questions of every trial)."""
    lists: dict[str, list[Any]] = {}

    def record(key: str, options: list[Any]) -> Any:
        lists[key] = list(options)
        return options[0]

    sample_genotype(_Answer(record), space)
    return lists


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def supernet_recipe(space: SearchSpace, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """The space's ``budget`` as a recipe (what every trial trains with), with ``overrides``
    (``Recipe.merged`` keys, e.g. ``{"epochs": 20, "optimizer.lr": 0.002}``)."""
    recipe = Recipe.from_dict(dict(space.budget), f"{space.source or space.name}: budget")
    return recipe.merged(overrides or {}, "supernet") if overrides else recipe


def make_supernet_optimizer(supernet: Supernet, recipe: Recipe) -> torch.optim.Optimizer:
    """The trainer's optimiser over every shared parameter: latent binary weights get no
    weight decay (unless ``decay_binary_weights``), each binary layer its learning-rate scale.

    Paths leave the gradients of the modules they skip at None (``zero_grad(set_to_none)``),
    which Adam and SGD skip entirely: no step, no decay, no moment update off the path.
    """
    # Narrower widths are strided views, which Adam's fused kernel would update as contiguous.
    return make_optimizer(supernet, recipe, allow_fused=not supernet._tied)


@dataclass
class EpochStats:
    """One supernet epoch: mean training loss and accuracy of the sampled paths."""

    epoch: int
    loss: float
    acc: float
    steps: int
    samples: int
    lr: float
    time_s: float


def supernet_step(
    supernet: Supernet,
    choices: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    recipe: Recipe,
    *,
    distill: bool = False,
    temperature: float = 4.0,
    alpha: float = 0.9,
    use_amp: bool = False,
) -> tuple[float, int]:
    """One optimiser step on the path ``choices``; returns (loss, correct predictions).

    ``choices`` may also be a group of paths (a list, as ``Supernet.fair_choices`` draws):
    each path's loss on the same batch adds its gradients, then one step updates them all,
    as FairNAS does; the loss returned is the paths' mean and the correct predictions their
    sum.

    With ``distill`` (in-place distillation, as BigNAS's sandwich rule does for the largest
    child; one path only), the largest path with the same cells
    (``Supernet.largest_choices``) trains on the labels in the same step, and the sampled
    path learns ``(1 - alpha) * task + alpha * T^2 * KL(teacher_T || path_T)`` from its
    detached logits. Latent weights of the paths that stepped are clipped after the step.
    """
    paths = [choices] if isinstance(choices, Mapping) else list(choices)
    if not paths:
        raise SupernetError("supernet_step needs at least one path")
    if distill and len(paths) > 1:
        raise SupernetError("in-place distillation trains one path per step; it does not combine with a group of paths")
    optimizer.zero_grad(set_to_none=True)
    stepped: list[BinaryNetwork] = []
    loss_total, hits_total = 0.0, 0
    for path in paths:
        student = supernet.network(supernet.genotype(path))
        nets = [student]
        teacher: BinaryNetwork | None = None
        largest = supernet.largest_choices(path) if distill else None
        if largest is not None and largest != dict(path):  # the largest path itself has no teacher
            teacher = supernet.network(supernet.genotype(largest))
            nets.append(teacher)
        for net in nets:
            net.train()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = student(x).float()
            loss = task_loss(logits, y, recipe)
            if teacher is not None:
                t_logits = teacher(x).float()
                loss = (
                    (1 - alpha) * loss
                    + alpha * distill_loss(logits, t_logits.detach(), temperature)
                    + task_loss(t_logits, y, recipe)
                )
        loss_value, hits = torch.stack((loss.detach(), (logits.argmax(1) == y).sum().float())).tolist()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"the supernet loss became {loss_value} on path {supernet.genotype(path).canonical_hash()}; "
                "lower the learning rate (optimizer.lr) or check the data"
            )
        loss.backward()
        loss_total += loss_value
        hits_total += int(hits)
        stepped += nets
    optimizer.step()
    # Only the paths that stepped: clipping elsewhere could move weights no step touched.
    for net in stepped:
        clip_latent_weights(net)
    return loss_total / len(paths), hits_total


def train_supernet_epoch(
    supernet: Supernet,
    data: DataSplits,
    optimizer: torch.optim.Optimizer,
    recipe: Recipe,
    rng: random.Random,
    epoch: int = 0,
    *,
    distill: bool = False,
    temperature: float = 4.0,
    alpha: float = 0.9,
    max_steps: int | None = None,
    start_step: int = 0,
    totals: Mapping[str, float] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    sample: Callable[[random.Random], Choices | list[Choices]] | None = None,
) -> EpochStats:
    """One epoch of single-path training: a fresh path per batch, drawn by ``sample(rng)``
    (default ``supernet.sample_choices``, uniform; ``bnas.search.path_sampling`` has others).
    A ``sample`` that returns a list of paths (fair sampling) trains them all on each batch in
    one step (``supernet_step``); the epoch's loss and accuracy then average over every path.

    The learning rate follows ``recipe``'s schedule for ``epoch`` (0-based, of
    ``recipe.epochs``); batches come from ``data``'s training split shuffled with
    ``recipe.seed`` and ``epoch``, paths from ``rng``, so a run repeats exactly on the CPU.
    ``recipe.two_step`` keeps weights real for its first epochs, as the trainer does.
    ``max_steps`` cuts the epoch short (tests, smoke runs).

    Resuming inside an epoch: ``start_step`` batches are skipped without drawing a path (the
    batch order is a function of the seed and epoch; ``rng`` must be in the state it had
    after them) and ``totals`` (``loss_sum``, ``correct``, ``seen``, ``time_s``) carries the
    sums of the steps done before. ``on_step(steps_done, totals)`` runs after every step; it
    may raise (a Ctrl-C request) between two steps, never inside one.
    """
    device = supernet.device
    if recipe.two_step:
        set_binarization(supernet, activations=True, weights=epoch >= recipe.two_step)
    lr = set_lr(optimizer, recipe, epoch)
    loader = data.loader("train", recipe.batch_size, shuffle=True, seed=recipe.seed, device=device)
    loader.set_epoch(epoch)
    use_amp = recipe.amp and device.type == "cuda"
    start = dict(totals or {})
    loss_sum, correct, seen = float(start.get("loss_sum", 0.0)), int(start.get("correct", 0)), int(start.get("seen", 0))
    before = float(start.get("time_s", 0.0))
    steps = start_step
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step < start_step:
            continue  # done before an interruption: same batches, and no path drawn for them
        if max_steps is not None and steps >= max_steps:
            break
        choices = (sample or supernet.sample_choices)(rng)
        group = 1 if isinstance(choices, Mapping) else len(choices)
        loss, hits = supernet_step(
            supernet,
            choices,
            x,
            y,
            optimizer,
            recipe,
            distill=distill,
            temperature=temperature,
            alpha=alpha,
            use_amp=use_amp,
        )
        loss_sum += loss * len(y) * group
        correct += hits
        seen += len(y) * group
        steps += 1
        if on_step is not None:
            spent = before + time.perf_counter() - t0
            on_step(steps, {"loss_sum": loss_sum, "correct": correct, "seen": seen, "time_s": spent})
    if seen == 0:
        raise TrainingError(f"{data.name}: the training split is empty")
    stats = EpochStats(epoch + 1, loss_sum / seen, correct / seen, steps, seen, lr, before + time.perf_counter() - t0)
    log.debug(
        "supernet epoch %d: loss %.4f, acc %.4f over %d paths (%.1f s)",
        stats.epoch,
        stats.loss,
        stats.acc,
        steps,
        stats.time_s,
    )
    return stats


# --------------------------------------------------------------------------------------
# Inheriting weights: extraction, BN recalibration, scoring
# --------------------------------------------------------------------------------------
def extract(supernet: Supernet, genotype: Genotype) -> BinaryNetwork:
    """A stand-alone ``bnas.build(genotype)`` network (its own tensors, on the supernet's
    device) carrying the weights and BN statistics ``genotype`` inherits from ``supernet``."""
    shared = supernet.network(genotype)
    model = build(genotype)
    # The provider changes where modules come from, never their paths: the keys agree.
    model.load_state_dict(shared.state_dict())
    return model.to(supernet.device)


def path_angle(trained: Supernet, initial: Supernet, genotype: Genotype) -> float:
    """ABS's angle metric (Hu et al. 2020): the angle, in radians, between the vector of every
    conv and linear weight of ``genotype``'s path in the ``initial`` supernet (``trained``'s
    start, ``supernet_run.initial_supernet``) and the same vector in ``trained``. A larger
    angle ranks higher. It needs no data. BatchNorm's affine parameters are left out: they
    are not what the path's ops learn."""
    start = dict(extract(initial, genotype).named_parameters())
    now = dict(extract(trained, genotype).named_parameters())
    names = [name for name, weight in start.items() if weight.dim() > 1]
    # float64: an angle near 0 comes from a cosine near 1, where float32 rounding would dominate.
    before = torch.cat([start[name].detach().flatten() for name in names]).double()
    after = torch.cat([now[name].detach().flatten() for name in names]).double()
    cosine = float(torch.dot(before, after) / (before.norm() * after.norm()))
    return math.acos(max(-1.0, min(1.0, cosine)))


def _batchnorms(network: nn.Module) -> list[_BatchNorm]:
    return [m for m in network.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def calibration_batches(
    data: DataSplits, num_batches: int = 8, batch_size: int = 64, seed: int = 0, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """``num_batches`` training batches (inputs only), shuffled with ``seed``: the same ones
    for every genotype scored with them."""
    loader = data.loader("train", batch_size, shuffle=True, seed=seed, device=device)
    return [x for x, _ in itertools.islice(loader, num_batches)]


@torch.no_grad()
def recalibrate_bn(network: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...] | list[Tensor]]) -> int:
    """Re-estimate every BatchNorm's running statistics of ``network`` on ``batches``.

    The statistics are reset and then averaged over the batches (momentum None: a cumulative
    average, each batch weighted equally). Only BatchNorm runs in training mode (dropout and
    stochastic binarization stay in eval mode) and no gradient is taken, so every parameter
    and every other buffer stays bit-identical; each module's train/eval mode and each
    BatchNorm's momentum are restored. Batches are inputs or ``(x, y)`` pairs. Returns the
    number of batches used.
    """
    bns = _batchnorms(network)
    modes = {m: m.training for m in network.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    used = 0
    try:
        network.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            network(x)
            used += 1
    finally:
        for module, mode in modes.items():
            module.training = mode
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if bns and not used:
        raise SupernetError("recalibrate_bn got no batches: its BatchNorm statistics were reset and left empty")
    return used


def finetune_inherited(model: nn.Module, data: DataSplits, recipe: Recipe, steps: int, seed: int = 0) -> nn.Module:
    """Train ``model`` (an ``extract``ed copy) for ``steps`` batches: the first training
    batches of ``recipe.batch_size`` shuffled with ``seed``, the recipe's optimiser at its
    initial learning rate, latent weights clipped after every step. Torch's RNG is forked
    and seeded with ``seed``, so the result is a function of the inputs alone."""
    if steps <= 0:
        return model
    loader = data.loader("train", recipe.batch_size, shuffle=True, seed=seed, device=next(model.parameters()).device)
    optimizer = make_optimizer(model, recipe)
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, y in itertools.islice(loader, steps):
            loss = task_loss(model(x).float(), y, recipe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clip_latent_weights(model)
    model.train(was_training)
    return model


def _accuracy(network: nn.Module, data: DataSplits, probe_samples: int, seed: int) -> tuple[float, float]:
    """(validation accuracy, loss) of ``network``: by its own classifier, or with
    ``probe_samples`` by a linear probe on its features."""
    if probe_samples > 0:
        return probe_accuracy(network, data, probe_samples, seed)
    device = next(iter(network.parameters())).device
    return evaluate_accuracy(network, data.loader("val", 512, device=device), device)


def score(
    supernet: Supernet,
    genotype: Genotype,
    data: DataSplits,
    *,
    calibration: list[Tensor] | None = None,
    num_batches: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    with_loss: bool = False,
    finetune_steps: int = 0,
    recipe: Recipe | None = None,
    probe_samples: int = 0,
) -> Any:
    """``genotype``'s validation accuracy with the weights it inherits from ``supernet``
    (with ``with_loss``: the pair accuracy, mean cross-entropy).

    Its BatchNorm statistics are recalibrated first (``calibration``, else ``num_batches``
    training batches of ``batch_size`` shuffled with ``seed``); the shared statistics are
    saved before and restored after, bit for bit, so scoring never changes the supernet.

    With ``finetune_steps``, a copy of the inherited network (``extract``) is first trained
    for that many steps (``finetune_inherited`` with ``recipe``, default the space's budget
    recipe, and ``seed``), then recalibrated and scored; the supernet is not touched.

    With ``probe_samples``, the accuracy is not that of the shared classifier but of a linear
    probe refitted on the path's own features for that many training images shuffled with
    ``seed`` (``bnas.search.linear_probe``), after the same recalibration.
    """
    if not len(data.val_y):
        raise SupernetError(f"{data.name}: the validation split is empty; set val_fraction above 0 to score paths")
    device = supernet.device
    batches = (
        calibration if calibration is not None else calibration_batches(data, num_batches, batch_size, seed, device)
    )
    if finetune_steps > 0:
        tuned = finetune_inherited(
            extract(supernet, genotype), data, recipe or supernet_recipe(supernet.space), finetune_steps, seed
        )
        recalibrate_bn(tuned, batches)
        acc, loss = _accuracy(tuned, data, probe_samples, seed)
        return (acc, loss) if with_loss else acc
    net = supernet.network(genotype)
    saved = [(buf, buf.clone()) for bn in _batchnorms(net) for buf in bn.buffers()]
    try:
        recalibrate_bn(net, batches)
        acc, loss = _accuracy(net, data, probe_samples, seed)
    finally:
        for buf, value in saved:
            buf.copy_(value)
    return (acc, loss) if with_loss else acc
