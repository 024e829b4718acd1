"""Speed and memory, measured the same way for every model so a pruned model and its source compare.

Prefill: one sequence of `prompt_tokens` tokens through the model with the KV cache on.
Decode: `decode_tokens` greedy steps of one token each, feeding the cache from that prefill.
Each is repeated `repeats` times after one warm-up; the median is reported. Memory: on CUDA the
peak allocated by torch; on CPU the process's peak resident set during the measurement (Linux,
reset before it starts), next to the exact bytes of the weights and of the filled KV cache.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from surgery.arch import unwrap
from surgery.forward import count_parameters
from surgery.settings import SpeedProtocol


def weights_bytes(model: Any) -> int:
    tensors = {id(t): t for t in [*unwrap(model).parameters(), *unwrap(model).buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def files_bytes(folder: Path | None) -> int | None:
    """The weight files' size on disk (what a loader reads), None without a folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    from surgery.memory import safetensors_bytes

    return safetensors_bytes(Path(folder))


def _cache_bytes(cache: Any) -> int:
    """What the generation cache holds: keys and values, and a hybrid model's linear layers' conv
    and recurrent states (one state per sequence, whatever its length)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for name in ("conv_states", "recurrent_states"):  # a hybrid model's linear layers, one dict of states each
            tensors += list((getattr(layer, name, None) or {}).values())
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "numel"))
    return total


def measure_speed(model: Any, protocol: SpeedProtocol = SpeedProtocol(), folder: Path | None = None) -> dict[str, Any]:
    """Prefill and decode tokens/s, peak memory, parameters and file size."""
    import torch

    from surgery.memory import PeakMemory

    base = unwrap(model)
    device = next(base.parameters()).device
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, protocol.prompt_tokens), generator=generator).to(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def run_once() -> tuple[float, float, Any]:
        sync()
        start = time.perf_counter()
        out = base(prompt, use_cache=True, logits_to_keep=1)  # as generate() and servers prefill: the last position's logits
        sync()
        prefill = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(protocol.decode_tokens):
            out = base(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        sync()
        return prefill, time.perf_counter() - start, cache

    with torch.no_grad():
        run_once()  # warm-up
        meter = PeakMemory(str(device)).start()
        runs = [run_once() for _ in range(protocol.repeats)]
        peak = meter.read()
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "prefill_tokens_per_s": protocol.prompt_tokens / prefill,
        "decode_tokens_per_s": protocol.decode_tokens / decode,
        "peak_memory_bytes": peak,
        "peak_memory_kind": meter.kind,
        "weights_bytes": weights_bytes(base),
        "kv_cache_bytes": _cache_bytes(runs[-1][2]),
        "parameters": count_parameters(base),
        "file_bytes": files_bytes(folder),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
