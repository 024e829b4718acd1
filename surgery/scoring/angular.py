"""Angular distance (Gromov et al. 2024) between the residual stream at two block boundaries.

d(l, n) = arccos(cos(h_l, h_{l+n})) / pi between the stream entering block l and the stream
entering block l+n (h_L is the last block's output), on the last token of each calibration
sequence, averaged over sequences. The run of n blocks starting at argmin_l d(l, n) is the one
whose removal should change the stream least.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.scoring.base import Scorer, ScoringContext, Section, register


def angular_distances(block_states: list[list[Any]]) -> list[list[float]]:
    """d[n-1][l] for n = 1..L and l = 0..L-n; block_states[batch][l] is h_l ([B, T, H]), l = 0..L."""
    import torch

    count = len(block_states[0]) - 1
    last = [torch.cat([states[l][:, -1] for states in block_states]) for l in range(count + 1)]
    table = []
    for n in range(1, count + 1):
        row = []
        for start in range(count - n + 1):
            cos = torch.nn.functional.cosine_similarity(last[start].float(), last[start + n].float(), dim=-1).clamp(-1.0, 1.0)
            row.append(float(torch.arccos(cos).mean() / math.pi))
        table.append(row)
    return table


def best_blocks(distances: list[list[float]]) -> dict[int, dict[str, float]]:
    """For each block size n: the start layer with the smallest angular distance."""
    best = {}
    for n, row in enumerate(distances, start=1):
        start = min(range(len(row)), key=row.__getitem__)
        best[n] = {"start": start, "distance": row[start]}
    return best


@dataclass
class AngularDistances(Section):
    distances: list[list[float]] = field(default_factory=list)  # distances[n-1][l] = d(l, n)
    best_block: dict[int, dict[str, float]] = field(default_factory=dict)  # n -> {start, distance}
    note: str = "distances[n-1][l] = d(l, n), last token, mean over sequences"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AngularDistances:
        best = {int(n): entry for n, entry in data.get("best_block", {}).items()}  # JSON keys are text
        return cls(distances=data["distances"], best_block=best, note=data.get("note", cls.note))


@register
class Angular(Scorer):
    name = "angular"
    title = "angular distance (Gromov et al.)"
    section = AngularDistances
    needs_stream = True
    plot_files = ("angular.png",)

    def assemble(self, context: ScoringContext) -> AngularDistances:
        distances = angular_distances([states[::2] for states in context.stream()])
        return AngularDistances(distances=distances, best_block=best_blocks(distances))

    def markdown(self, section: AngularDistances) -> list[str]:
        lines = ["## Most similar blocks (angular distance)", "", "| n blocks | best start | d(l, n) |", "|---|---|---|"]
        for n, best in list(section.best_block.items())[:12]:
            lines.append(f"| {n} | L{best['start']} | {best['distance']:.3f} |")
        return lines

    def plot(self, section: AngularDistances, analysis: Any, folder: Path) -> dict[str, str]:
        import numpy as np

        from surgery.plots import pyplot, save

        distances = section.distances
        layers = len(distances)
        grid = np.full((layers, layers), np.nan)
        for n, row in enumerate(distances):
            grid[n, : len(row)] = row
        fig, ax = pyplot().subplots(figsize=(7, 5.5))
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r", extent=(-0.5, layers - 0.5, 0.5, layers + 0.5))
        fig.colorbar(image, ax=ax, label="angular distance d(l, n)")
        for n, row in enumerate(distances, start=1):
            best = min(range(len(row)), key=row.__getitem__)
            ax.plot(best, n, marker="o", markersize=3, color="white")
        ax.set_xlabel("first block l")
        ax.set_ylabel("block size n (white: most similar l for each n)")
        ax.set_title("Angular distance between the inputs of block l and l+n")
        return {"Angular distance": save(fig, folder / "angular.png").name}
