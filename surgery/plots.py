"""PNG plots of analyses and removals (matplotlib, no display needed).

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sublayer_bars(ax: Any, ids: list[str], values: list[float], marked: set[str]) -> None:
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


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


ANALYSIS_PLOTS = {"shapley.png": "shapley", "shapley_share.png": "shapley", "ablation.png": "ablation",
                  "angular.png": "angular", "block_influence.png": "block_influence"}  # file -> analysis section it draws


def plot_analysis(analysis: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write the analysis plots into `folder`; returns {name: file name}. Plots of sections this
    analysis lacks are removed, so a folder rewritten with other methods shows no stale ones."""
    for name, section in ANALYSIS_PLOTS.items():
        if section not in analysis:
            (folder / name).unlink(missing_ok=True)
    plt = _pyplot()
    ids = analysis["players"]
    cornerstones = {c["id"] for c in analysis.get("cornerstones", [])}
    written: dict[str, str] = {}
    metric = analysis["settings"]["metric"]
    unit = "nats of loss" if metric == "loss" else "accuracy"

    if "shapley" in analysis:
        fig, ax = plt.subplots(figsize=(12, 4))
        _sublayer_bars(ax, ids, [analysis["shapley"]["values"][i] for i in ids], cornerstones)
        ax.set_title(f"Shapley value per sublayer ({analysis['shapley']['estimator']}, max removed {analysis['shapley']['max_removed']})")
        ax.set_ylabel(f"Shapley value ({unit})")
        written["shapley"] = _save(fig, folder / "shapley.png").name

        fig, ax = plt.subplots(figsize=(12, 4))
        shares = analysis["shapley"]["share"]
        layers = len(ids) // 2
        attn = [100 * (shares.get(f"L{l}.attn") or 0.0) for l in range(layers)]
        mlp = [100 * (shares.get(f"L{l}.mlp") or 0.0) for l in range(layers)]
        ax.bar(range(layers), attn, color=ATTN_COLOUR, label="attention")
        ax.bar(range(layers), mlp, bottom=attn, color=MLP_COLOUR, label="FFN / MoE")
        ax.axhline(100 / layers, color="grey", linestyle="--", linewidth=0.8, label="mean per block")
        ax.set_xlabel("block")
        ax.set_ylabel("share of total Shapley value (%)")
        ax.set_title("Share of the total Shapley value by block")
        ax.legend(fontsize=8)
        written["share"] = _save(fig, folder / "shapley_share.png").name

    if "ablation" in analysis and analysis["ablation"]:
        fig, ax = plt.subplots(figsize=(12, 4))
        drops = [analysis["ablation"].get(i, {}).get("drop", float("nan")) for i in ids]
        _sublayer_bars(ax, ids, drops, cornerstones)
        if metric == "loss":
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylabel("loss increase when removed alone (nats)")
        else:
            ax.set_ylabel("accuracy drop when removed alone")
        ax.set_title("Single-sublayer ablation")
        written["ablation"] = _save(fig, folder / "ablation.png").name

    if "angular" in analysis:
        import numpy as np

        distances = analysis["angular"]["distances"]
        layers = len(distances)
        grid = np.full((layers, layers), np.nan)
        for n, row in enumerate(distances):
            grid[n, : len(row)] = row
        fig, ax = plt.subplots(figsize=(7, 5.5))
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r",
                          extent=(-0.5, layers - 0.5, 0.5, layers + 0.5))
        fig.colorbar(image, ax=ax, label="angular distance d(l, n)")
        for n, row in enumerate(distances, start=1):
            best = min(range(len(row)), key=row.__getitem__)
            ax.plot(best, n, marker="o", markersize=3, color="white")
        ax.set_xlabel("first block l")
        ax.set_ylabel("block size n (white: most similar l for each n)")
        ax.set_title("Angular distance between the inputs of block l and l+n")
        written["angular"] = _save(fig, folder / "angular.png").name

    if "block_influence" in analysis:
        fig, ax = plt.subplots(figsize=(12, 4))
        values = analysis["block_influence"]["sublayers"]
        _sublayer_bars(ax, ids, [values[i] for i in ids], cornerstones)
        ax.set_yscale("log")
        ax.set_ylabel("1 - cos(input, output)")
        ax.set_title("Block Influence per sublayer (ShortGPT)")
        written["bi"] = _save(fig, folder / "block_influence.png").name
    return written


def plot_removal_map(layers: int, removed: set[str], protected: set[str], path: Path, title: str) -> Path:
    """The layer map: one column per block, attention above FFN; removed units filled red."""
    plt = _pyplot()
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
    return _save(fig, path)
