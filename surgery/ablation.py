"""Non-destructive ablation: run a model as if some sublayers were removed, then restore it exactly.

The removed sublayers are swapped for the same stand-ins a pruned checkpoint uses
(`surgery.hf_modeling`), so the residual path is kept, no computation is spent on them, and the
KV cache keeps a consistent length. On exit the original module objects are put back: parameters
are never copied or modified.

Two exceptions:
- an attention whose selection of keys, or keys and values, later layers reuse
  (Architecture.shared_attention: GLM-5.2's full layers, Gemma 4 E2B's last layers of each type
  before the shared ones) still runs, and only its output is dropped. Removing it means "this
  attention adds nothing", not "the layers after it attend to other keys"; a cut, which cannot keep
  what it shares without the attention, removes such an attention only with its readers (surgery.cut);
- where blocks end in a part beside their sublayers (Architecture.block_tail: Gemma 4 E2B's
  per-layer input), it goes only with the whole block: its output is dropped where both sublayers
  are removed (by `units` or by stand-ins already there), and in `tails`, the blocks whose stream
  between attention and FFN is asked for (surgery.forward.after_attention), which it has not met yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from surgery.arch import architecture_of, decoder_layers, get_module, unwrap
from surgery.hf_modeling import RemovedAttention, RemovedLinearAttention, RemovedMLP, remove_sublayer, set_module
from surgery.sublayers import Sublayer, check_in_range, full_blocks


@contextmanager
def ablated(model: Any, units: Iterable[Sublayer], tails: Iterable[int] = ()) -> Iterator[Any]:
    """Within the block, `model` behaves as if `units` were removed (residual kept); `tails`: blocks
    whose tail is silenced too (see the module docstring)."""
    base = unwrap(model)
    arch = architecture_of(base.config)
    layers = decoder_layers(base, arch)
    units = sorted(set(units))
    check_in_range(units, len(layers))
    sources = arch.shared_readers(base.config)
    restore: list[tuple[Any, dict[str, Any]]] = []
    hooks = []
    if arch.has_block_tail(base.config):
        whole = full_blocks([*units, *removed_sublayers(base)])
        hooks += [get_module(layers[index], arch.block_tail[-1]).register_forward_hook(_zeroed)
                  for index in sorted({*whole, *tails})]
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


def removed_sublayers(model: Any) -> list[Sublayer]:
    """Sublayers that are already stand-ins in `model` (from an earlier cut or a loaded checkpoint),
    known by their class's name: a checkpoint loaded with its own modeling file holds that file's
    classes, not this package's."""
    arch = architecture_of(unwrap(model).config)
    stand_ins = {"attn": {RemovedAttention.__name__, RemovedLinearAttention.__name__}, "mlp": {RemovedMLP.__name__}}
    found = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        for kind, names_of_stand_ins in stand_ins.items():
            names = arch.sublayer_modules(kind, layer)  # (none for a kind a single-mixer block lacks)
            if names and type(get_module(layer, names[0])).__name__ in names_of_stand_ins:
                found.append(Sublayer(index, kind))
    return found


def _zeroed(module: Any, args: Any, output: Any) -> Any:
    """A block tail's output dropped: it adds nothing to the stream."""
    import torch

    return torch.zeros_like(output)


def _silenced(module: Any, args: Any, output: tuple) -> tuple:
    """An attention's output dropped, what it returns after its output and weights (its selection) kept."""
    import torch

    return torch.zeros_like(output[0]), None, *output[2:]
