"""Physical removal: take sublayers out of a model in memory, leaving a smaller, standard model.

Whole blocks are deleted from the layer list; the survivors are renumbered (every `layer_idx`,
which is the KV-cache slot) and the config is made to match (`num_hidden_layers`, per-layer
lists, layer-index lists). An attention-only or FFN-only removal replaces that sublayer and its
norms by parameterless stand-ins and records it in `config.surgery`, which the export turns into
a self-describing checkpoint. How the units were chosen is not this module's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from surgery.arch import Architecture, architecture_of, base_model_type, decoder_layers, unwrap
from surgery.errors import SurgeryError
from surgery.forward import count_parameters
from surgery.hf_modeling import RemovedAttention, RemovedMLP, remove_sublayer
from surgery.sublayers import KINDS, Sublayer, check_in_range, format_sublayers, full_blocks


@dataclass(frozen=True)
class CutResult:
    removed: list[Sublayer]  # in the numbering of the model that was cut
    kept_layers: list[int]  # new block i was old block kept_layers[i]
    parameters_before: int
    parameters_after: int

    @property
    def removed_text(self) -> str:
        return format_sublayers(self.removed)


def sublayer_parameters(model: Any) -> Callable[[Iterable[Sublayer]], int]:
    """Parameters a unit (sublayers) would free, counted from the modules that would go."""
    arch = architecture_of(unwrap(model).config)
    layers = decoder_layers(model, arch)
    cache: dict[tuple[int, str], int] = {}

    def sublayer(layer: int, kind: str) -> int:
        if (layer, kind) not in cache:
            modules = [getattr(layers[layer], name) for name in arch.sublayer_modules(kind)]
            cache[(layer, kind)] = sum(p.numel() for m in modules for p in m.parameters())
        return cache[(layer, kind)]

    return lambda unit: sum(sublayer(s.layer, s.kind) for s in unit)


def removed_sublayers(model: Any) -> list[Sublayer]:
    """Sublayers that are already stand-ins in `model` (from an earlier cut or a loaded checkpoint)."""
    arch = architecture_of(unwrap(model).config)
    found = []
    for index, layer in enumerate(decoder_layers(model, arch)):
        if isinstance(getattr(layer, arch.attention), RemovedAttention):
            found.append(Sublayer(index, "attn"))
        if isinstance(getattr(layer, arch.mlp), RemovedMLP):
            found.append(Sublayer(index, "mlp"))
    return found


def validate_removal(units: Iterable[Sublayer], num_layers: int, already_removed: Iterable[Sublayer] = ()) -> list[Sublayer]:
    """Sorted units, or a one-line error if they are out of range, repeat a removal or empty the model."""
    units = sorted(set(units))
    if not units:
        raise SurgeryError("nothing to remove: name at least one sublayer, e.g. --remove L12")
    check_in_range(units, num_layers)
    again = sorted(set(units) & set(already_removed))
    if again:
        raise SurgeryError(f"{format_sublayers(again)} is already removed in this model: drop it from the list")
    gone = set(units) | set(already_removed)
    if len(full_blocks(gone)) == num_layers:
        raise SurgeryError(f"that removes every one of the {num_layers} blocks: keep at least one")
    return units


def cut(model: Any, units: Iterable[Sublayer]) -> CutResult:
    """Remove `units` from `model` in place (the object is modified; files on disk never are)."""
    base = unwrap(model)
    arch = architecture_of(base.config)
    layers = decoder_layers(base, arch)
    previous = removed_sublayers(base)
    units = validate_removal(units, len(layers), previous)
    before = count_parameters(base)

    blocks = set(full_blocks(set(units) | set(previous)))
    for unit in units:
        if unit.layer not in blocks:
            remove_sublayer(layers[unit.layer], unit.kind, list(arch.sublayer_modules(unit.kind)), unit.layer,
                            arch.mlp_extra_outputs)

    kept = [i for i in range(len(layers)) if i not in blocks]
    if blocks:
        _delete_blocks(base, arch, kept)
    _record_sublayer_removals(base, arch)
    return CutResult(units, kept, before, count_parameters(base))


def _delete_blocks(model: Any, arch: Architecture, kept: list[int]) -> None:
    import torch

    layers = decoder_layers(model, arch)
    survivors = torch.nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(survivors):
        for module in layer.modules():  # the attention's layer_idx is its KV-cache slot
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent_path, _, attr = arch.layers.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, survivors)
    _slice_config(model.config, arch, kept, len(layers))


def _slice_config(config: Any, arch: Architecture, kept: list[int], old_count: int) -> None:
    """Make every per-layer config entry describe the surviving blocks."""
    if arch.sparse_step_config:
        _materialise_sparse_step(config, arch, old_count)
    for key in arch.prefix_count_config:
        count = getattr(config, key, None)
        if count is not None:
            setattr(config, key, sum(1 for i in kept if i < count))
    for key in arch.per_layer_config:
        values = getattr(config, key, None)
        if values is not None:
            setattr(config, key, [values[i] for i in kept])
    renumber = {old: new for new, old in enumerate(kept)}
    for key in arch.layer_index_config:
        values = getattr(config, key, None)
        if values is not None:
            setattr(config, key, sorted(renumber[i] for i in values if i in renumber))
    config.num_hidden_layers = len(kept)


def _materialise_sparse_step(config: Any, arch: Architecture, old_count: int) -> None:
    """Turn "every k-th layer is MoE" into an explicit list of dense layers before renumbering."""
    step = getattr(config, arch.sparse_step_config) or 1
    dense_key = arch.layer_index_config[0]
    dense = set(getattr(config, dense_key, None) or [])
    has_experts = getattr(config, "num_experts", 1) > 0
    dense |= {i for i in range(old_count) if not (has_experts and (i + 1) % step == 0)}
    setattr(config, dense_key, sorted(dense))
    setattr(config, arch.sparse_step_config, 1)


def _record_sublayer_removals(model: Any, arch: Architecture) -> None:
    """Describe the stand-ins in `config.surgery` so that a saved checkpoint can rebuild them."""
    removed = removed_sublayers(model)
    if not removed:
        if "surgery" in vars(model.config):
            del model.config.surgery
        return
    model.config.surgery = {
        "base_model_type": base_model_type(model.config),
        "layers": arch.layers,
        "removed": {kind: [u.layer for u in removed if u.kind == kind] for kind in KINDS},
        "modules": {kind: list(arch.sublayer_modules(kind)) for kind in KINDS},
        "mlp_extra_outputs": arch.mlp_extra_outputs,
    }
