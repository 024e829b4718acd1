"""Pruned-model speed against the ideal: prefill and decode tokens/s of the dense SmolLM2-135M and of
pruned versions, measured in the same run, next to the speed-up that FLOP counts predict.

    python bench/model_speed.py [--threads 2] [--repeats 5]

Ideal speed-up = FLOPs per token of the dense model / FLOPs per token of the pruned one, counting
every matrix multiply (projections, attention scores and values at the measured context length,
output layer: at every decode step, at the last prompt position of the prefill). The target is a measured speed-up within 10% of that ideal. Variants are measured
in an interleaved round-robin so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics

from common import protocol, save, setup

VARIANTS = {
    "dense": "",
    "blocks-25%": "L18-L25",  # 8 of 30 blocks
    "attention-only": "L2-L29.attn",  # placeholder, replaced below by every attention but L0 and L1
    "mixed-25%": "L3.attn,L4.attn,L5.attn,L6.attn,L7.attn,L9.attn,L10.attn,L12.attn,L13-L14,L16-L17,L18.attn,L19.attn,"
                 "L20.attn,L22.attn,L25.attn,L26.attn",
}


def flops_per_token(config, removed, context: float, output_share: float = 1.0) -> float:
    """Matrix-multiply FLOPs for one token at `context` tokens of context; `output_share`: the share of
    tokens the output layer runs on (a prefill computes the last position's logits only)."""
    hidden, heads, kv, head_dim = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = 2 * hidden * head_dim * (2 * heads + 2 * kv) + 2 * 2 * context * heads * head_dim
    mlp = 2 * 3 * hidden * config.intermediate_size
    total = 2 * hidden * config.vocab_size * output_share
    for layer in range(config.num_hidden_layers):
        total += (0 if f"L{layer}.attn" in removed else attention) + (0 if f"L{layer}.mlp" in removed else mlp)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    threads = setup(args.threads)

    from surgery.cut import cut
    from surgery.evaluate.speed import measure_speed
    from surgery.loading import load_model
    from surgery.settings import SpeedProtocol
    from surgery.sublayers import parse_sublayers

    VARIANTS["attention-only"] = ",".join(f"L{l}.attn" for l in range(2, 30))
    models = {}
    for name, spec in VARIANTS.items():
        model = load_model("smollm2-135m", device="cpu", with_tokenizer=False).model
        if spec:
            cut(model, parse_sublayers(spec))
        models[name] = model
    config = models["dense"].config
    one = SpeedProtocol(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeats=1)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.repeats):  # round robin: each repeat measures every variant once
        for name, model in models.items():
            runs[name].append(measure_speed(model, one))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    dense_prefill, dense_decode = median("dense", "prefill_tokens_per_s"), median("dense", "decode_tokens_per_s")
    rows = {}
    for name, spec in VARIANTS.items():
        removed = {str(u) for u in parse_sublayers(spec)} if spec else set()
        prefill_context = args.prompt_tokens / 2  # mean context over a causal prefill
        decode_context = args.prompt_tokens + args.decode_tokens / 2
        last_only = 1 / args.prompt_tokens  # measure_speed prefills as generate() does: logits of the last position
        ideal_prefill = flops_per_token(config, set(), prefill_context, last_only) / flops_per_token(config, removed, prefill_context, last_only)
        ideal_decode = flops_per_token(config, set(), decode_context) / flops_per_token(config, removed, decode_context)
        measured_prefill = median(name, "prefill_tokens_per_s") / dense_prefill
        measured_decode = median(name, "decode_tokens_per_s") / dense_decode
        rows[name] = {
            "removed": spec or "nothing", "parameters": runs[name][0]["parameters"],
            "prefill_tokens_per_s": median(name, "prefill_tokens_per_s"), "decode_tokens_per_s": median(name, "decode_tokens_per_s"),
            "prefill_speedup": measured_prefill, "prefill_ideal": ideal_prefill, "prefill_vs_ideal": measured_prefill / ideal_prefill,
            "decode_speedup": measured_decode, "decode_ideal": ideal_decode, "decode_vs_ideal": measured_decode / ideal_decode,
            "kv_cache_bytes": runs[name][0]["kv_cache_bytes"], "weights_bytes": runs[name][0]["weights_bytes"],
        }
        print(f"{name:15s} prefill {measured_prefill:.2f}x (ideal {ideal_prefill:.2f}x)  decode {measured_decode:.2f}x "
              f"(ideal {ideal_decode:.2f}x)")
    save("model_speed", {"variants": rows, "threads": threads, "repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
                         "decode_tokens": args.decode_tokens, "target": "measured speed-up within 10% of the ideal",
                         "protocol": protocol()})


if __name__ == "__main__":
    main()
