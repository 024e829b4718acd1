"""Token losses and perplexity, with one documented protocol for every corpus.

Protocol (docs/evaluation.md): the documents are joined with a blank line, tokenized once without
special tokens, and cut into consecutive windows of `context` tokens starting every `stride`
tokens (stride = context: no overlap). If the tokenizer adds a BOS token by default (Llama 3,
Gemma), each window starts with BOS followed by `context - 1` text tokens; otherwise (SmolLM2,
GPT-2 style) it is `context` text tokens. A window scores every token it predicts (all positions
but its first); with overlap, only the tokens no earlier window scored. Perplexity is
exp(total NLL / scored tokens) over the first `windows` windows.

The loss comes from surgery.forward's chunked token losses, so no full logits tensor is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from surgery.arch import unwrap
from surgery.data import adds_bos
from surgery.forward import final_hidden, token_nll
from surgery.settings import PerplexityProtocol


def make_windows(tokenizer: Any, texts: list[str], protocol: PerplexityProtocol) -> tuple[Any, Any]:
    """(input_ids [W, context], score mask [W, context]) following the protocol above."""
    import torch

    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    span = protocol.context - (bos is not None)
    stride = min(protocol.stride or span, span)
    windows, masks = [], []
    scored_until = 0
    for start in range(0, max(len(ids) - 1, 0), stride):
        chunk = ids[start:start + span]
        if len(chunk) < span or len(windows) == protocol.windows:
            break
        mask = [start + i >= scored_until for i in range(span)]
        scored_until = start + span
        if bos is not None:
            chunk, mask = [bos, *chunk], [False, *mask]
        windows.append(chunk)
        masks.append(mask)
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {span}")
    return torch.tensor(windows), torch.tensor(masks)


def batch_nll(model: Any, batches: list[Any], advance: Callable[[int], None] | None = None) -> list[Any]:
    """Per-token losses [B, T-1] (on CPU) of each batch of unpadded token ids under an in-memory
    model, or under a surgery.layerwise.LayerwiseModel (a model too large for memory, read from its
    files once for all batches). `advance(n)` is called as batches finish."""
    import torch

    from surgery.layerwise import LayerwiseModel

    if isinstance(model, LayerwiseModel):
        losses = model.token_nll(batches)
        if advance:
            advance(sum(len(ids) for ids in batches))
        return losses
    device = next(unwrap(model).parameters()).device
    losses = []
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            losses.append(token_nll(model, final_hidden(model, ids), ids).cpu())
            if advance:
                advance(len(ids))
    return losses


def perplexity(model: Any, tokenizer: Any, texts: list[str], protocol: PerplexityProtocol,
               advance: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Perplexity of `texts` under the protocol; `advance(n)` is called as windows finish."""
    windows, masks = make_windows(tokenizer, texts, protocol)
    batches = list(windows.split(protocol.batch_size))
    per_window = []
    for nll, mask in zip(batch_nll(model, batches, advance), masks[:, 1:].split(protocol.batch_size)):
        per_window += list(zip((nll * mask).sum(1).tolist(), mask.sum(1).tolist()))
    total = sum(n for n, _ in per_window)
    count = sum(c for _, c in per_window)
    mean = total / count
    window_means = [n / c for n, c in per_window if c]
    stderr, runs = batch_means_stderr(window_means)
    half = t_quantile(0.975, runs - 1) * stderr if runs > 1 else 0.0
    return {"perplexity": math.exp(mean), "nll": mean, "nll_stderr": stderr,
            "perplexity_interval_95": [math.exp(mean - half), math.exp(mean + half)],
            "interval": f"batch means: {runs} runs of consecutive windows, t quantile with {runs - 1} df",
            "tokens": int(count), "windows": len(per_window),
            "window_nll": [round(m, 6) for m in window_means]}  # the same windows for every model: paired comparisons


def batch_means_stderr(values: list[float]) -> tuple[float, int]:
    """Standard error of the mean of a series whose neighbours correlate, and the number of batches
    it rests on. Consecutive windows of one text are such a series (a window that reads a hard
    passage is often followed by another), so the spread of single windows understates the error;
    the series is cut into about sqrt(n) runs of consecutive windows (non-overlapping batch means),
    whose means are close to independent, and the error is taken from their spread."""
    n = len(values)
    if n < 2:
        return 0.0, n
    count = max(2, math.isqrt(n))
    bounds = [round(i * n / count) for i in range(count + 1)]
    means = [sum(values[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    centre = sum(means) / count
    return math.sqrt(sum((m - centre) ** 2 for m in means) / (count - 1) / count), count


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, else the Cornish-Fisher series
    (Abramowitz and Stegun 26.7.5: 0.004 below the exact value at 3 df, under 0.001 from 4 on)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        a = 2 * p - 1
        return a * math.sqrt(2 / (1 - a * a))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))

