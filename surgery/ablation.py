"""Non-destructive ablation: run a model as if some sublayers were removed, then restore it exactly.

The removed sublayers are swapped for the same stand-ins a pruned checkpoint uses
(`surgery.hf_modeling`), so the residual path is kept, no computation is spent on them, and the
KV cache keeps a consistent length. On exit the original module objects are put back: parameters
are never copied or modified.

One exception: an attention whose selection of keys later layers reuse (Architecture.shared_selection,
GLM-5.2's full layers) still runs, and only its output is dropped. Removing it means "this attention
adds nothing", not "the layers after it attend to other keys"; a cut, which cannot keep the
selection without the attention, removes such an attention only with its readers (surgery.cut).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from surgery.arch import architecture_of, decoder_layers, get_module, unwrap
from surgery.hf_modeling import remove_sublayer, set_module
from surgery.sublayers import Sublayer, check_in_range


@contextmanager
def ablated(model: Any, units: Iterable[Sublayer]) -> Iterator[Any]:
    """Within the block, `model` behaves as if `units` were removed (residual kept)."""
    base = unwrap(model)
    arch = architecture_of(base.config)
    layers = decoder_layers(base, arch)
    units = sorted(set(units))
    check_in_range(units, len(layers))
    sources = arch.selection_readers(base.config)
    restore: list[tuple[Any, dict[str, Any]]] = []
    hooks = []
    try:
        for unit in units:
            layer = layers[unit.layer]
            if unit.kind == "attn" and unit.layer in sources:
                hooks.append(get_module(layer, arch.attention).register_forward_hook(_silenced))
            else:
                restore.append((layer, remove_sublayer(layer, unit.kind, unit.layer, arch.stand_in_spec())))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for layer, originals in reversed(restore):
            for name, module in originals.items():
                set_module(layer, name, module)


def _silenced(module: Any, args: Any, output: tuple) -> tuple:
    """An attention's output dropped, what it returns after its output and weights (its selection) kept."""
    import torch

    return torch.zeros_like(output[0]), None, *output[2:]
