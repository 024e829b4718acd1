"""Forward-pass helpers that scoring, bridging, healing, evaluation and export all need: the final
hidden state, per-token losses through the output layer in chunks, the residual stream at any
sublayer position, parameter counts, and the fixed probe input exports are verified with.

The loss is computed in chunks of tokens through the output layer, with the family's own logit
post-processing (Gemma soft-capping, Granite scaling), so the full vocabulary x sequence logits
tensor never exists: a third of a forward pass's time on small models, and most of its memory.

The residual stream (`capture_stream`): position p (see surgery.sublayers) is the stream before
sublayer p: before block i's attention (p = 2i, the block's input), between its attention and its
MLP (p = 2i + 1), and after the last block (p = 2L). Block inputs come from one ordinary forward
pass; the mid-block stream is the block re-run with its MLP ablated, which is exact for every
supported family whatever its norms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from surgery.ablation import ablated
from surgery.arch import architecture_of, decoder_layers, decoder_stack, get_module, unwrap
from surgery.sublayers import Sublayer

VERIFY_PROMPT = "The capital of France is Paris. The capital of Italy is"


def output_logits(model: Any, hidden: Any) -> Any:
    """Logits from final hidden states, with the family's post-processing, in float32."""
    base = unwrap(model)
    arch = architecture_of(base.config)
    return finish_logits(base.config, get_module(base, arch.lm_head)(hidden).float())


def finish_logits(config: Any, logits: Any) -> Any:
    """The family's post-processing of the output layer's result (Granite's divisor, Falcon-H1's
    multiplier, Gemma's soft-cap); elementwise, so it applies to any slice of the vocabulary as well."""
    arch = architecture_of(config)
    if arch.logit_divisor_config and getattr(config, arch.logit_divisor_config, None):
        logits = logits / getattr(config, arch.logit_divisor_config)
    if arch.logit_multiplier_config and getattr(config, arch.logit_multiplier_config, None) is not None:
        logits = logits * getattr(config, arch.logit_multiplier_config)
    cap = getattr(config, arch.logit_softcap_config, None) if arch.logit_softcap_config else None
    if cap:
        logits = (logits / cap).tanh() * cap
    return logits


def output_vocabulary(config: Any) -> int:
    """How many tokens the output layer scores: a uniform guess's loss is the log of it."""
    rows_key = architecture_of(config).output_rows_config
    return int((getattr(config, rows_key, None) if rows_key else None) or config.vocab_size)


def token_nll(model: Any, hidden: Any, input_ids: Any, chunk_tokens: int = 2048) -> Any:
    """Per-token negative log-likelihood [B, T-1] of input_ids[:, 1:] given final hidden states [B, T, H]."""
    import torch
    import torch.nn.functional as F

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1).to(hidden.device)  # the output layer may sit on another GPU than the ids
    losses = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk_tokens):
        end = start + chunk_tokens
        losses[start:end] = F.cross_entropy(output_logits(model, h[start:end]), targets[start:end], reduction="none")
    return losses.view(input_ids.shape[0], -1)


def final_hidden(model: Any, input_ids: Any) -> Any:
    """Hidden states after the final norm (the decoder stack's output), no cache, no logits."""
    return decoder_stack(model)(input_ids=input_ids, use_cache=False).last_hidden_state


def capture_stream(model: Any, ids: Any, positions: Iterable[int] | None = None,
                   state_device: str | None = None) -> tuple[dict[int, Any], list[tuple[tuple, dict]]]:
    """The stream before each wanted position (all 2L + 1 by default) for one batch of token ids,
    and each block's call arguments after the hidden state (to resume a forward at any block)."""
    base = unwrap(model)
    layers = decoder_layers(base)
    wanted = set(range(2 * len(layers) + 1) if positions is None else positions)
    needed = {i for i in range(len(layers)) if {2 * i, 2 * i + 1} & wanted}
    inputs: dict[int, Any] = {}  # only the block inputs a wanted position needs: a large model has many
    calls: list[tuple[tuple, dict]] = []
    outputs: list[Any] = []

    def record(index: int, args: tuple, kwargs: dict) -> None:
        if index in needed:
            inputs[index] = args[0]
        calls.append((args[1:], kwargs))

    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: record(i, args, kwargs), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(lambda m, args, out: outputs.append(out)))
    try:
        final_hidden(base, ids)
    finally:
        for hook in hooks:
            hook.remove()
    states: dict[int, Any] = {}
    for index, block_input in sorted(inputs.items()):
        if 2 * index in wanted:
            states[2 * index] = block_input.to(state_device or block_input.device)
        if 2 * index + 1 in wanted:
            args, kwargs = calls[index]
            states[2 * index + 1] = after_attention(base, index, block_input, args, kwargs).to(state_device or block_input.device)
    if 2 * len(layers) in wanted:
        last = block_output(outputs[0])
        states[2 * len(layers)] = last.to(state_device or last.device)
    return states, calls


def after_attention(model: Any, index: int, hidden: Any, args: tuple, kwargs: dict) -> Any:
    """The stream between block `index`'s attention and its MLP, from the block's input `hidden` and
    call arguments: the block re-run with its MLP ablated (exact whatever the family's norms), and
    the part some families' blocks end in after it (Architecture.block_tail)."""
    base = unwrap(model)
    with ablated(base, [Sublayer(index, "mlp")], tails=[index]):
        return block_output(decoder_layers(base)[index](hidden, *args, **kwargs))


def block_output(output: Any) -> Any:
    """Decoder blocks return a tensor in transformers 5 (a tuple in older versions)."""
    return output[0] if isinstance(output, tuple) else output


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in unwrap(model).parameters()}.values())


def verification_ids(tokenizer: Any, vocab_size: int) -> Any:
    import torch

    if tokenizer is not None:
        ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
        if ids.numel() and int(ids.max()) < vocab_size:
            return ids
    return (torch.arange(3, 19) * 7919 % vocab_size).unsqueeze(0)
