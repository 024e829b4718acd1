"""Blocks that scale the stream they return (Gemma 4's layer_scalar), made additive.

Every scorer, the prefix cache, the bridge and the cut treat a decoder as a stream its sublayers
add to. A family whose blocks also multiply what they return by a stored scale
(Architecture.block_scalar) is rewritten, as it loads, into the form that computes the same on a
stream its blocks only add to; block-by-block reading applies it per block, and the streamed cut
writes the kept blocks' folded norms and scales from the stored ones.
"""

from __future__ import annotations

from typing import Any

from surgery.arch import Architecture, decoder_layers
from surgery.errors import SurgeryError


def fold_block_scalars(model: Any, arch: Architecture) -> None:
    """Fold the scale each block applies to the stream it returns (Architecture.block_scalar) into
    the norms that end its sublayers, and set it to 1.

    Block i returns s_i (h + a_i + m_i). Written as h_i = C_i g_i with C_i the product of the scales
    before block i, g_{i+1} = g_i + (a_i + m_i) / C_i: every norm reads its input's direction alone
    (up to its epsilon) and a_i, m_i end in a norm whose weight sets their size, so dividing those
    weights by C_i and setting every s_i to 1 computes the same, on a stream whose blocks only add
    to it, which is what removing a sublayer or a block assumes. Then removing a block removes
    what it adds, and the scale before it stays with the blocks after it. A block tail
    (Architecture.block_tail) also ends in a norm, but its gate reads the stream itself, without a
    norm: its weight is multiplied by C_i instead."""
    if arch.block_scalar is None:
        return
    layers = decoder_layers(model, arch)
    scales = [float(getattr(layer, arch.block_scalar[0]).prod()) for layer in layers]
    for layer, before in zip(layers, scales_before(scales)):
        fold_block_scalar(layer, arch, before)


def stored_block_scales(weights: Any, arch: Architecture, layers: int) -> list[float] | None:
    """Each block's output scale as a checkpoint's files hold it (`weights`: a SafetensorsFolder; 1
    where a block stores none), None for a family without one (Architecture.block_scalar)."""
    if arch.block_scalar is None:
        return None
    names = [f"{arch.layers}.{index}.{arch.block_scalar[0]}" for index in range(layers)]
    stored = weights.tensors([name for name in names if name in weights])
    return [float(stored[name].float().prod()) if name in stored else 1.0 for name in names]


def scales_before(scales: list[float]) -> list[float]:
    """C_i: the product of the block scales before each block. A scale of 0 before the last block
    would leave every later block with a stream of zeros, which no fold represents: refused."""
    import math

    zero = next((index for index, scale in enumerate(scales[:-1]) if scale == 0), None)
    if zero is not None:
        raise SurgeryError(f"L{zero}'s output scale is 0, so the blocks after it read nothing but their own output: "
                           "the checkpoint's weights are damaged; download the model again")
    return [math.prod(scales[:index]) for index in range(len(scales))]


def folded_norm(weight: Any, before: float) -> Any:
    """A sublayer's closing norm weight divided by C_i, the product of the scales before its block,
    in a new tensor of its dtype: the one formula loading, block-by-block reading and the streamed cut
    share (a raw reader's weight: divided by 1 / C_i)."""
    return (weight.double() / before).to(weight.dtype)


def fold_block_scalar(layer: Any, arch: Architecture, before: float) -> None:
    """Block `layer`'s share of fold_block_scalars, `before` being C_i: its sublayers' closing norms
    divided by it and its own scale set to 1, in new tensors (a block read block by block holds
    file-mapped ones, which must not be written)."""
    import torch

    name, norms, raw_readers = arch.block_scalar
    with torch.no_grad():
        if before != 1:
            for weight in (getattr(getattr(layer, norm, None), "weight", None) for norm in norms):
                if weight is not None:  # (a removed sublayer's norm is gone; a block may have no tail)
                    weight.data = folded_norm(weight, before)
            for weight in (getattr(getattr(layer, reader, None), "weight", None) for reader in raw_readers):
                if weight is not None:
                    weight.data = folded_norm(weight, 1 / before)
        scale = getattr(layer, name)
        setattr(layer, name, torch.ones_like(scale))
