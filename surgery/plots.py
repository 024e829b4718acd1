"""PNG plots: the drawing helpers every scorer's plot uses, and the removal map (matplotlib, no display needed).

Attention sublayers are drawn in one colour and FFN/MoE sublayers in another everywhere, as in
Zhang et al.'s figures; cornerstones and removed units are marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ATTN_COLOUR = "#3b7dd8"
MLP_COLOUR = "#e8833a"
MARK_COLOUR = "#c0392b"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sublayer_bars(ax: Any, ids: list[str], values: list[float], marked: set[str]) -> None:
    colours = [ATTN_COLOUR if i.endswith(".attn") else MLP_COLOUR for i in ids]
    heights = [0.0 if v is None or math.isnan(v) else v for v in values]
    bars = ax.bar(range(len(ids)), heights, color=colours, width=0.85)
    for bar, name in zip(bars, ids):
        if name in marked:
            bar.set_edgecolor(MARK_COLOUR)
            bar.set_linewidth(2)
    step = max(1, len(ids) // 30)
    ax.set_xticks(range(0, len(ids), step))
    ax.set_xticklabels([ids[i].replace(".attn", "a").replace(".mlp", "m") for i in range(0, len(ids), step)], rotation=90, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    from matplotlib.patches import Patch

    handles = [Patch(color=ATTN_COLOUR, label="attention"), Patch(color=MLP_COLOUR, label="FFN / MoE")]
    if marked:
        handles.append(Patch(facecolor="white", edgecolor=MARK_COLOUR, linewidth=2, label="cornerstone"))
    ax.legend(handles=handles, fontsize=8)


def figure(size: tuple[float, float] = (12, 4)) -> tuple[Any, Any]:
    """A figure and its axes, the width of a sublayer bar chart."""
    return pyplot().subplots(figsize=size)


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_removal_map(layers: int, removed: set[str], protected: set[str], path: Path, title: str) -> Path:
    """The layer map: one column per block, attention above FFN; removed units filled red."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(max(6, layers * 0.35), 2.4))
    for layer in range(layers):
        for row, kind in enumerate(("mlp", "attn")):
            name = f"L{layer}.{kind}"
            colour = MARK_COLOUR if name in removed else (ATTN_COLOUR if kind == "attn" else MLP_COLOUR)
            alpha = 1.0 if name in removed else 0.35
            ax.add_patch(Rectangle((layer, row), 0.9, 0.9, color=colour, alpha=alpha))
            if name in protected:
                ax.text(layer + 0.45, row + 0.45, "*", ha="center", va="center", fontsize=10)
    ax.set_xlim(0, layers)
    ax.set_ylim(0, 2)
    ax.set_yticks([0.45, 1.45])
    ax.set_yticklabels(["FFN", "attn"])
    ax.set_xticks([l + 0.45 for l in range(0, layers, max(1, layers // 20))])
    ax.set_xticklabels([str(l) for l in range(0, layers, max(1, layers // 20))], fontsize=7)
    ax.set_title(f"{title} (red: removed, *: protected)", fontsize=9)
    return save(fig, path)
