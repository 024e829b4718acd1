"""Block Influence (ShortGPT, Men et al. 2024): BI = 1 - mean cosine between a unit's input and
output over all tokens, from the unablated residual stream (one forward pass). Computed for
blocks and, on the same footing, for each sublayer (input = stream before it, output = stream
after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.scoring.base import Scorer, ScoringContext, Section, register


def block_influence(states: list[list[Any]], step: int) -> list[float]:
    """1 - mean cosine between states[b][i] and states[b][i+step] over every token, for each i.

    With states at every sublayer position, step=1 scores sublayers and step=2 whole blocks.
    """
    import torch.nn.functional as F

    scores = []
    for start in range(0, len(states[0]) - step, step):
        total, count = 0.0, 0
        for batch in states:
            cos = F.cosine_similarity(batch[start].float(), batch[start + step].float(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
        scores.append(1.0 - total / count)
    return scores


@dataclass
class BlockInfluenceScores(Section):
    blocks: dict[str, float] = field(default_factory=dict)  # "L3" -> BI
    sublayers: dict[str, float] = field(default_factory=dict)  # "L3.attn" -> BI


@register
class BlockInfluence(Scorer):
    name = "bi"
    title = "Block Influence (ShortGPT)"
    section = BlockInfluenceScores
    needs_stream = True
    plot_files = ("block_influence.png",)

    def assemble(self, context: ScoringContext) -> BlockInfluenceScores:
        states = context.stream()
        return BlockInfluenceScores(blocks={f"L{i}": v for i, v in enumerate(block_influence(states, 2))},
                                    sublayers=dict(zip(context.players, block_influence(states, 1))))

    def columns(self, section: BlockInfluenceScores, metric: str) -> dict[str, dict[str, float | None]]:
        return {"Block Influence": section.sublayers}

    def plot(self, section: BlockInfluenceScores, analysis: Any, folder: Path) -> dict[str, str]:
        from surgery.plots import figure, save, sublayer_bars

        fig, ax = figure()
        ids = analysis.players
        sublayer_bars(ax, ids, [section.sublayers[i] for i in ids], analysis.cornerstone_ids)
        ax.set_yscale("log")
        ax.set_ylabel("1 - cos(input, output)")
        ax.set_title("Block Influence per sublayer (ShortGPT)")
        return {"Block Influence": save(fig, folder / "block_influence.png").name}
