"""The residual stream of a decoder, captured before chosen sublayer positions.

Position p (see surgery.sublayers) is the stream before sublayer p: before block i's attention
(p = 2i, the block's input), between its attention and its MLP (p = 2i + 1), and after the last
block (p = 2L). Block inputs come from one ordinary forward pass; the mid-block stream is the
block re-run with its MLP ablated, which is exact for every supported family whatever its norms.
The prefix-cached scorer and the linear bridge both read the stream through this one function.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from surgery.ablation import ablated
from surgery.arch import decoder_layers, unwrap
from surgery.evaluate.perplexity import final_hidden
from surgery.sublayers import Sublayer


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
            with ablated(base, [Sublayer(index, "mlp")]):
                after_attention = block_output(layers[index](block_input, *args, **kwargs))
            states[2 * index + 1] = after_attention.to(state_device or block_input.device)
    if 2 * len(layers) in wanted:
        last = block_output(outputs[0])
        states[2 * len(layers)] = last.to(state_device or last.device)
    return states, calls


def block_output(output: Any) -> Any:
    """Decoder blocks return a tensor in transformers 5 (a tuple in older versions)."""
    return output[0] if isinstance(output, tuple) else output
