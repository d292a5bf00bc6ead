"""Pictures of cell DAGs: nodes, and edges labelled with their ops."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from .atomic import save_figure
from .genotype import Genotype, Preprocess

if TYPE_CHECKING:
    from matplotlib.text import Text

_COLORS = {"input": "#9ecae1", "node": "#fdd49e", "output": "#a1d99b"}


def _layout(g: nx.MultiDiGraph) -> dict[str, tuple[float, float]]:
    """Left-to-right by depth in the DAG; nodes of equal depth stacked vertically."""
    depth: dict[str, int] = {}
    for node in nx.topological_sort(g):
        preds = list(g.predecessors(node))
        depth[node] = 0 if not preds else 1 + max(depth[p] for p in preds)
    columns: dict[int, list[str]] = {}
    for node, d in depth.items():
        columns.setdefault(d, []).append(node)
    pos = {}
    for d, nodes in columns.items():
        for i, node in enumerate(nodes):
            pos[node] = (float(d), (len(nodes) - 1) / 2.0 - i)
    return pos


_NODE_SIZE = 1400  # points**2, as networkx draws nodes
_CANDIDATE_TS = (0.5, 0.42, 0.58, 0.35, 0.65, 0.28, 0.72, 0.22, 0.78)


def _edge_rads(g: nx.MultiDiGraph, pos: dict[str, tuple[float, float]]) -> list[tuple[str, str, str, float]]:
    """(u, v, op, curvature) per edge: parallel edges bend apart, and an edge that skips a
    column bends further, so it passes beside the nodes it jumps over instead of through them."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for u, v, data in g.edges(data=True):
        k = seen.get((u, v), 0)
        seen[(u, v)] = k + 1
        span = abs(pos[v][0] - pos[u][0])
        rad = (0.15 if span <= 1 else 0.35) + 0.25 * k
        out.append((u, v, data["op"], rad))
    return out


def _arc(p0: np.ndarray, p1: np.ndarray, rad: float, n: int = 60) -> np.ndarray:
    """Points of matplotlib's ``arc3,rad=...`` curve from p0 to p1 (display coordinates)."""
    d = p1 - p0
    control = (p0 + p1) / 2 + rad * np.array([d[1], -d[0]])
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * control + t**2 * p1


def _box_distance(points: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Smallest distance from any of ``points`` to the box (x0, y0, x1, y1); 0 when inside."""
    x0, y0, x1, y1 = box
    dx = np.maximum(np.maximum(x0 - points[:, 0], points[:, 0] - x1), 0)
    dy = np.maximum(np.maximum(y0 - points[:, 1], points[:, 1] - y1), 0)
    return float(np.hypot(dx, dy).min()) if len(points) else float("inf")


def place_labels(
    curves: list[np.ndarray], sizes: list[tuple[float, float] | None], nodes: np.ndarray, node_radius: float
) -> list[tuple[float, float] | None]:
    """A centre for each edge label (display coordinates) on its own curve, chosen among a few
    positions along it for the most clearance from other edges, nodes and earlier labels."""
    placed: list[tuple[float, float, float, float]] = []
    centres: list[tuple[float, float] | None] = []
    for i, (curve, size) in enumerate(zip(curves, sizes, strict=True)):
        if size is None:
            centres.append(None)
            continue
        w, h = size
        others = [c for j, c in enumerate(curves) if j != i]
        other_points = np.concatenate(others) if others else np.empty((0, 2))
        best, best_score = None, -np.inf
        for t in _CANDIDATE_TS:
            cx, cy = curve[int(round(t * (len(curve) - 1)))]
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            score = min(
                _box_distance(other_points, box),
                _box_distance(nodes, box) - node_radius,
                *(
                    _box_distance(np.array([[b[0], b[1]], [b[2], b[3]], [b[0], b[3]], [b[2], b[1]]]), box)
                    for b in placed
                ),
            )
            if score > best_score + 1.0:  # prefer the middle unless another spot is clearly better
                best, best_score = (float(cx), float(cy)), score
        assert best is not None
        placed.append((best[0] - w / 2, best[1] - h / 2, best[0] + w / 2, best[1] + h / 2))
        centres.append(best)
    return centres


def draw_cells(genotype: Genotype, path: str | os.PathLike[str]) -> Path:
    """Draw every cell of ``genotype`` side by side into one image (PNG, SVG or PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = genotype.cell_graphs()
    if not graphs:
        raise ValueError(f"genotype {genotype.name!r} has no cells to draw (its body is a plain sequence of ops)")
    dpi = 120
    fig, axes = plt.subplots(1, len(graphs), figsize=(7 * len(graphs), 5), squeeze=False, dpi=dpi)
    drawn = []
    for ax, (name, g) in zip(axes[0], graphs.items(), strict=True):
        pos = _layout(g)
        colors = [_COLORS[g.nodes[n]["kind"]] for n in g.nodes]
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=_NODE_SIZE, edgecolors="#333333")
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=10)
        edges = _edge_rads(g, pos)
        for u, v, _, rad in edges:
            nx.draw_networkx_edges(
                g,
                pos,
                edgelist=[(u, v)],
                ax=ax,
                arrows=True,
                arrowsize=14,
                node_size=_NODE_SIZE,
                connectionstyle=f"arc3,rad={rad}",
                edge_color="#555555",
            )
        cell = genotype.cells[name]
        combine = g.nodes["out"]["combine"] + (" + in1 (residual)" if cell.residual else "")
        preprocess = (cell.preprocess or genotype.preprocess or Preprocess()).kind
        ax.set_title(f"cell '{name}'  (output: {combine}; inputs: {preprocess} preprocessing)")
        ax.axis("off")
        drawn.append((ax, pos, edges))
    fig.suptitle(genotype.name)
    fig.tight_layout()
    # Labels go on last, in display coordinates: the arcs are drawn there (arc3 bends in
    # pixels, not data units), and the layout no longer moves.
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # the Agg canvas has one
    node_radius = np.sqrt(_NODE_SIZE) / 2 * dpi / 72
    for ax, pos, edges in drawn:
        to_px = ax.transData.transform
        px = {n: np.asarray(to_px(p)) for n, p in pos.items()}
        curves = [_arc(px[u], px[v], rad) for u, v, _, rad in edges]
        texts: list[Text | None] = []
        sizes: list[tuple[float, float] | None] = []
        for _u, v, op, _ in edges:
            if v == "out":  # output edges carry the combine, shown in the title
                texts.append(None)
                sizes.append(None)
                continue
            text = ax.text(
                0,
                0,
                op,
                fontsize=7,
                ha="center",
                va="center",
                zorder=3,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.9),
            )
            box = text.get_window_extent(renderer)
            texts.append(text)
            sizes.append((box.width + 6, box.height + 6))
        centres = place_labels(curves, sizes, np.array(list(px.values())), node_radius)
        for text, centre in zip(texts, centres, strict=True):
            if text is not None and centre is not None:
                text.set_position(ax.transData.inverted().transform(centre))
    path = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return path
