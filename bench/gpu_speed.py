"""Pruned-model speed in bf16 on a GPU against the ideal, for a model of Llama-3-8B's shape (random
weights: speed does not depend on their values; nothing can be downloaded on the device machine).

    python bench/gpu_speed.py                  # on a CUDA machine (one H200: under 3 minutes)
    python bench/gpu_speed.py --small --cpu    # the same on a small model, on this CPU

The variants are the dense model, a quarter of its blocks cut, and half of its attention sublayers
cut, built as `surgery cut` builds them (the same model object, physically smaller). Each is timed
with the CLI's own measure (surgery.evaluate.speed: prefill of the prompt with the last position's
logits, then greedy decode with the KV cache, batch 1, plain transformers), in an interleaved round
robin so machine noise hits all of them alike; the ideal is bench/model_speed.py's FLOP ratio.
Writes $OUT/gpu_speed.json (or bench/results/gpu_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import protocol
from model_speed import flops_per_token

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
}


def variants(layers: int) -> dict[str, str]:
    """A quarter of the blocks (the deepest but the last, where Gromov et al. find them) and half of
    the attention sublayers (the second half's, the last block's kept), spelled as the CLI takes them."""
    quarter = layers // 4
    blocks = f"L{layers - 1 - quarter}-L{layers - 2}"
    attention = ",".join(f"L{i}.attn" for i in range(layers // 2 - 1, layers - 1))  # half of them, the last kept
    return {"dense": "", "blocks-25%": blocks, "attention-50%": attention}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.cut import cut
    from surgery.evaluate.speed import measure_speed
    from surgery.settings import SpeedProtocol
    from surgery.sublayers import parse_sublayers

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    shape = SHAPES["small" if args.small else "llama3-8b"]
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    specs = variants(config.num_hidden_layers)
    models = {}
    for name, spec in specs.items():
        torch.manual_seed(0)
        with torch.device(device):  # each its own config: a cut rewrites its model's
            model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).to(dtype).eval()  # initialised where it runs: seconds, not minutes
        if spec:
            cut(model, parse_sublayers(spec))
        models[name] = model
    one = SpeedProtocol(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeats=1)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name].append(measure_speed(model, one))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rows = {}
    for name, spec in specs.items():
        removed = {str(u) for u in parse_sublayers(spec)} if spec else set()
        prefill_context, decode_context = args.prompt_tokens / 2, args.prompt_tokens + args.decode_tokens / 2
        last_only = 1 / args.prompt_tokens
        ideal_prefill = flops_per_token(config, set(), prefill_context, last_only) / flops_per_token(config, removed, prefill_context, last_only)
        ideal_decode = flops_per_token(config, set(), decode_context) / flops_per_token(config, removed, decode_context)
        weights_ratio = runs["dense"][0]["weights_bytes"] / runs[name][0]["weights_bytes"]
        prefill = median(name, "prefill_tokens_per_s") / median("dense", "prefill_tokens_per_s")
        decode = median(name, "decode_tokens_per_s") / median("dense", "decode_tokens_per_s")
        rows[name] = {"removed": spec or "nothing", "parameters": runs[name][0]["parameters"],
                      "prefill_tokens_per_s": median(name, "prefill_tokens_per_s"),
                      "decode_tokens_per_s": median(name, "decode_tokens_per_s"),
                      "prefill_speedup": prefill, "prefill_ideal": ideal_prefill,
                      "decode_speedup": decode, "decode_ideal_flops": ideal_decode, "decode_ideal_weight_bytes": weights_ratio,
                      "peak_memory_bytes": runs[name][0]["peak_memory_bytes"], "kv_cache_bytes": runs[name][0]["kv_cache_bytes"]}
        print(f"{name:14s} prefill {prefill:.2f}x (ideal {ideal_prefill:.2f}x)  decode {decode:.2f}x "
              f"(ideal {ideal_decode:.2f}x by FLOPs, {weights_ratio:.2f}x by weight bytes)", flush=True)
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": str(dtype),
              "shape": "small" if args.small else "llama3-8b (random weights)", "torch": torch.__version__,
              "repeats": args.repeats, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
              "batch": 1, "variants": rows, "protocol": protocol()}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    (out / "gpu_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'gpu_speed.json'}")


if __name__ == "__main__":
    main()
