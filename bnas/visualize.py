"""Pictures of cell DAGs: nodes, and edges labelled with their ops."""
from __future__ import annotations

import os
from pathlib import Path

import networkx as nx

from .genotype import Genotype

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


def draw_cells(genotype: Genotype, path: str | os.PathLike[str]) -> Path:
    """Draw every cell of ``genotype`` side by side into one image (PNG, SVG or PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = genotype.cell_graphs()
    if not graphs:
        raise ValueError(f"genotype {genotype.name!r} has no cells to draw (its body is a plain sequence of ops)")
    fig, axes = plt.subplots(1, len(graphs), figsize=(7 * len(graphs), 5), squeeze=False)
    for ax, (name, g) in zip(axes[0], graphs.items()):
        pos = _layout(g)
        colors = [_COLORS[g.nodes[n]["kind"]] for n in g.nodes]
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=1400, edgecolors="#333333")
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=10)
        # Parallel edges between the same pair get different curvature so both stay visible.
        seen: dict[tuple[str, str], int] = {}
        for u, v, data in g.edges(data=True):
            k = seen.get((u, v), 0)
            seen[(u, v)] = k + 1
            rad = 0.15 + 0.25 * k
            nx.draw_networkx_edges(
                g, pos, edgelist=[(u, v)], ax=ax, arrows=True, arrowsize=14, node_size=1400,
                connectionstyle=f"arc3,rad={rad}", edge_color="#555555",
            )
            if v == "out":
                continue  # output edges carry the combine, shown in the title
            (x0, y0), (x1, y1) = pos[u], pos[v]
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            # Put the label near the middle of the arc (offset perpendicular to the chord).
            dx, dy = x1 - x0, y1 - y0
            ax.text(mx + rad * dy / 2, my - rad * dx / 2, data["op"], fontsize=7, ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))
        combine = g.nodes["out"]["combine"]
        ax.set_title(f"cell '{name}'  (output: {combine})")
        ax.axis("off")
    fig.suptitle(genotype.name)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
