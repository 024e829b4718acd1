"""Representation-similarity scores from the unablated residual stream (one forward pass).

Angular distance (Gromov et al. 2024): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi between the
stream entering block l and the stream entering block l+n (h_L is the last block's output), on
the last token of each calibration sequence, averaged over sequences. The block of n layers
starting at argmin_l d(l, n) is the one whose removal should change the stream least.

Block Influence (ShortGPT, Men et al. 2024): BI = 1 - mean cosine between a unit's input and
output over all tokens. Computed for blocks and, on the same footing, for each sublayer
(input = stream before it, output = stream after it).
"""

from __future__ import annotations

import math
from typing import Any


def _cosine(a: Any, b: Any) -> Any:
    import torch.nn.functional as F

    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def angular_distances(block_states: list[list[Any]]) -> list[list[float]]:
    """d[n-1][l] for n = 1..L and l = 0..L-n; block_states[batch][l] is h_l ([B, T, H]), l = 0..L."""
    import torch

    count = len(block_states[0]) - 1
    last = [torch.cat([states[l][:, -1] for states in block_states]) for l in range(count + 1)]
    table = []
    for n in range(1, count + 1):
        row = []
        for start in range(count - n + 1):
            cos = _cosine(last[start], last[start + n]).clamp(-1.0, 1.0)
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


def block_influence(states: list[list[Any]], step: int) -> list[float]:
    """1 - mean cosine between states[b][i] and states[b][i+step] over every token, for each i.

    With states at every sublayer position, step=1 scores sublayers and step=2 whole blocks.
    """
    scores = []
    for start in range(0, len(states[0]) - step, step):
        total, count = 0.0, 0
        for batch in states:
            cos = _cosine(batch[start], batch[start + step])
            total += float(cos.sum())
            count += cos.numel()
        scores.append(1.0 - total / count)
    return scores
