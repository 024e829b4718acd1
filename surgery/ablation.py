"""Non-destructive ablation: run a model as if some sublayers were removed, then restore it exactly.

The removed sublayers are swapped for the same stand-ins a pruned checkpoint uses
(`surgery.hf_modeling`), so the residual path is kept, no computation is spent on them, and the
KV cache keeps a consistent length. On exit the original module objects are put back: parameters
are never copied or modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from surgery.arch import architecture_of, decoder_layers, unwrap
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
    restore: list[tuple[Any, dict[str, Any]]] = []
    try:
        for unit in units:
            layer = layers[unit.layer]
            restore.append((layer, remove_sublayer(layer, unit.kind, unit.layer, arch.stand_in_spec())))
        yield model
    finally:
        for layer, originals in reversed(restore):
            for name, module in originals.items():
                set_module(layer, name, module)
