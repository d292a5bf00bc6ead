"""Whether a genotype's network output depends on its input at all.

An edge whose op belongs to the ``zero`` family (``zero``, DARTS's ``none``) carries
nothing. A cell in which every path from its inputs to its output crosses such an edge
outputs the same tensor for every image, and so does every layer that sees only such
outputs: the network then predicts one class whatever it is shown, however long it trains.
DARTS never derives such cells (its genotypes drop ``none``), but a search space that offers
``zero`` can sample them, and a weak one-shot supernet can even rank one first. The search
rejects them before training, as it rejects a genotype over the OPs budget.

The flow is followed through the wiring ``bnas.build`` gives a genotype: stem, then body
units fed ``(k-2, k-1)``, then head. A cell with ``residual: true`` passes its k-1 input on
whatever its edges do, and a dead cell does not end the flow when the next cell still sees
a live k-2 input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx

from .genotype import CellSpec, Genotype, LayerSpec, cell_graph
from .registry import get_spec

__all__ = ["ZERO_FAMILY", "carries_signal", "cell_output_is_live", "constant_output"]

ZERO_FAMILY = "zero"


def carries_signal(op: str) -> bool:
    """False for an op of the ``zero`` family, whose output never depends on its input."""
    return get_spec(op).family != ZERO_FAMILY


def cell_output_is_live(cell: CellSpec, live_inputs: Mapping[str, bool]) -> bool:
    """Whether the cell's output depends on a live input (``live_inputs``: ``in0``/``in1``
    -> whether that input depends on the network's input)."""
    graph = cell_graph(cell)
    live = {name for name in cell.input_names if live_inputs.get(name, False)}
    for node in nx.topological_sort(graph):
        if graph.nodes[node]["kind"] != "node":
            continue
        if any(source in live and carries_signal(op) for source, _, op in graph.in_edges(node, data="op")):
            live.add(node)
    # The output combines nodes (sum or concat): one live node is enough.
    return any(node in live for node in cell.output) or (cell.residual and live_inputs.get("in1", False))


def _zero_layer(path: str, op: str) -> str:
    return f"{path} is the op {op!r}, which outputs zeros"


def _first_dead_op(layers: Sequence[LayerSpec], section: str) -> str | None:
    for i, layer in enumerate(layers):
        if layer.op is not None and not carries_signal(layer.op):
            return _zero_layer(f"{section}[{i}]", layer.op)
    return None


def constant_output(genotype: Genotype) -> str | None:
    """None when the network's output depends on its input; else why it cannot, naming the
    layer where the flow ends (e.g. ``"body[1] (cell 'normal'): every path from its inputs
    to its output passes a zero op"``)."""
    dead = _first_dead_op(genotype.stem, "stem")
    if dead is not None:
        return dead
    # (live, why not) of the k-2 and k-1 inputs of the next unit.
    state0: tuple[bool, str] = (True, "")
    state1: tuple[bool, str] = (True, "")
    for i, layer in enumerate(genotype.body):
        path = f"body[{i}]"
        for _ in range(layer.repeat):
            if layer.cell is not None:
                cell = genotype.cells[layer.cell]
                live = cell_output_is_live(cell, {"in0": state0[0], "in1": state1[0]})
                cut = f"{path} (cell {layer.cell!r}): every path from its inputs to its output passes a zero op"
                if live:
                    out = (True, "")
                elif state1[0] and (cell.inputs == 1 or state0[0]):
                    out = (False, cut)
                elif cell.inputs == 2 and state0[0]:
                    out = (False, f"{cut} or starts from its k-1 input, constant since {state1[1]}")
                elif cell.inputs == 2 and state1[0]:
                    out = (False, f"{cut} or starts from its k-2 input, constant since {state0[1]}")
                else:
                    out = state1
            elif layer.op is not None and not carries_signal(layer.op):
                out = (False, _zero_layer(path, layer.op)) if state1[0] else state1
            else:
                out = state1
            state0, state1 = state1, out
    if not state1[0]:
        return state1[1]
    return _first_dead_op(genotype.head, "head")
