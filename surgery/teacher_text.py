"""Healing text written by the dense teacher (self-data distillation, `--heal-text teacher`).

Healing on raw documents pulls the pruned model towards their statistics, which are not the
statistics the source model was tuned to; for an instruct model that can cost accuracy even as
perplexity on the documents falls. Thangarasa et al. (2024, arXiv 2410.09982) heal on the dense
model's own outputs instead, so the student is trained back towards its teacher. Here each healing
sequence keeps its first `prompt_tokens` tokens of real text, for topic and variety, and the dense
model writes the rest.

The continuation is sampled from the teacher's full next-token distribution (temperature 1, no
top-k, top-p, repetition penalty or end-of-text stop): its samples then follow the distribution the
student should match. This is why the loop below samples itself rather than calling `generate`,
which fills every unset option from the model's own generation_config.json (Qwen's ships
top-k 20, top-p 0.8, temperature 0.7).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_FILE = "teacher-text.safetensors"


def sample_continuations(teacher: Any, prompts: Any, length: int, seed: int, batch: int = 32) -> Any:
    """[N, length] token ids: each row of `prompts` [N, P] continued by `teacher` to `length` tokens,
    each new token drawn from the teacher's softmax. Row i draws with its own generator
    (`row_generator(seed, i)`), so the text does not depend on `batch`, the rows sampled at once:
    that can follow the memory at hand without changing what is written."""
    import torch

    device = next(teacher.parameters()).device
    rows = []
    with torch.inference_mode():
        for first in range(0, len(prompts), batch):
            ids = prompts[first:first + batch].to(device)
            generators = [row_generator(seed, row, device) for row in range(first, first + len(ids))]
            out = teacher(input_ids=ids, use_cache=True, logits_to_keep=1)  # the prompt's last position only
            while ids.shape[1] < length:
                probabilities = out.logits[:, -1].float().softmax(-1)
                token = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probabilities, generators)])
                ids = torch.cat([ids, token], dim=1)
                if ids.shape[1] < length:
                    out = teacher(input_ids=token, cache=out.cache, use_cache=True)
            rows.append(ids.cpu())
    return torch.cat(rows)


def row_generator(seed: int, row: int, device: Any = "cpu") -> Any:
    """The random generator of one row of the teacher's text: seeded by (seed, row), any size of seed."""
    import torch

    digest = hashlib.sha256(f"surgery-teacher-text|{seed}|{row}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))


def teacher_text(sequences: Any, prompt_tokens: int, seed: int, work: Path, folder: Path, load: Callable[[], Any],
                 batch: int = 32) -> Any:
    """`sequences` [N, L] with everything after each row's first `prompt_tokens` tokens rewritten by
    the dense model in `folder`, loaded by `load()` only when the text is not already kept in `work`
    under a key of the teacher's files, the prompts and the seed (a resumed heal reads it back).
    `batch` rows are sampled at once (the healing micro-batch: what fits beside the model)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from surgery.files import atomic_file
    from surgery.source import fingerprint

    prompts = sequences[:, :prompt_tokens].contiguous()
    key = hashlib.sha256(f"{fingerprint(folder)}|{seed}|{sequences.shape[1]}|".encode() + prompts.numpy().tobytes()).hexdigest()
    cached = Path(work) / CACHE_FILE
    if cached.is_file():
        with safe_open(str(cached), "pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                return load_file(str(cached))["ids"]
    teacher = load()
    ids = sample_continuations(teacher, prompts, sequences.shape[1], seed, batch)
    del teacher
    with atomic_file(cached) as partial:
        save_file({"ids": ids.to(torch.int64).contiguous()}, str(partial), metadata={"key": key})
    return ids
