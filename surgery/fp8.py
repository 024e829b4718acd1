"""FP8 weights as DeepSeek-V3, Qwen3 and GLM release them (transformers' `fp8` quantisation): each
linear layer's weight stored in float8 beside a `weight_scale_inv` grid of per-block scales.

A whole-block or sublayer cut changes no weight, so the streamed cut copies these tensors as they
are and writes an FP8 checkpoint in the release's own format, for engines to serve as they serve it; the
block-by-block paths (its check, `analyze --layerwise`, `eval --layerwise`) read them turned back
one block at a time, as `from_pretrained` turns them back on a machine without FP8 kernels. Other
quantisations pack weights in shapes of their own, and those paths refuse them (surgery.memory).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

METHOD = "fp8"
SCALE = "weight_scale_inv"
# Tensors a quantised linear layer stores beside its weight: copied with it, dropped with it.
COMPANIONS = (SCALE, "activation_scale", "input_scale")


def readable(method: str | None) -> bool:
    """Whether the block-by-block paths can read weights stored with quantisation `method`."""
    return method == METHOD


def scale_name(weight: str) -> str:
    """The name of the scale grid stored beside weight `weight` (`x.weight` -> `x.weight_scale_inv`)."""
    return weight.removesuffix("weight") + SCALE


def is_companion(name: str) -> bool:
    """Whether a tensor name is one stored beside a quantised weight (`COMPANIONS`), not a model tensor."""
    return name.rpartition(".")[2] in COMPANIONS


def companions(mapped: dict[str, str], stored: Container[str]) -> dict[str, str]:
    """The tensors stored beside the weights of `mapped` (a cut's name -> its source's name), under the
    same renaming: cut name -> source name, for those `stored` (the source's names) holds."""
    found = {}
    for name, source in mapped.items():
        if name.endswith(".weight"):
            for suffix in COMPANIONS:
                if source.removesuffix("weight") + suffix in stored:
                    found[name.removesuffix("weight") + suffix] = source.removesuffix("weight") + suffix
    return found


def block_size(config: Any) -> tuple[int, int] | None:
    """The weight block of an FP8 config (config.json's dict or a config object): (rows, columns)."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    block = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
    return (int(block[0]), int(block[1])) if isinstance(block, (list, tuple)) and len(block) == 2 else None


def dequantized(weight: Any, scale: Any, block: tuple[int, int] | None = None, dtype: Any = None) -> Any:
    """A float8 weight times its scales, computed in float32 and returned in `dtype` (default float32).
    Each scale covers a `block` of the weight, the last row and column of blocks cut short where the
    block does not divide the weight (DeepSeek-V3's 576-row kv_a_proj_with_mqa under 128 x 128 blocks:
    a grid of 5 rows); with no block, the grid must divide the weight. A uint8 grid holds E8M0
    exponents; one value scales the whole weight. One float32 copy of the weight is made, scaled in
    place a row of blocks at a time."""
    import torch

    rows, columns = weight.shape[-2:]
    factors = (scale.float() - 127).exp2() if scale.dtype == torch.uint8 else scale.float()
    out = weight.to(torch.float32, copy=True)  # (never the mapped file itself)
    if factors.dim() < 2:
        out.mul_(factors)
        return out if dtype is None else out.to(dtype)
    grid_rows, grid_columns = factors.shape[-2:]
    if block is None and not (rows % grid_rows or columns % grid_columns):
        block = (rows // grid_rows, columns // grid_columns)
    if block is None or -(-rows // block[0]) != grid_rows or -(-columns // block[1]) != grid_columns:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"an FP8 weight of shape {list(weight.shape)} does not fit its {grid_rows} x {grid_columns} "
                           f"scale grid{f' of {block[0]} x {block[1]} blocks' if block else ''}: download the model again")
    stacked, grids = out.reshape(-1, rows, columns), factors.reshape(-1, grid_rows, grid_columns)
    for index in range(grid_rows):
        across = grids[:, index, :].repeat_interleave(block[1], dim=-1)[:, None, :columns]
        stacked[:, index * block[0]:(index + 1) * block[0], :].mul_(across)
    return out if dtype is None else out.to(dtype)


def read_turned_back(weights: Any, names: list[str], block: tuple[int, int] | None = None, dtype: Any = None) -> dict[str, Any]:
    """The tensors `names` of a SafetensorsFolder, each stored float8 weight with a scale grid beside
    it turned back into `dtype` (default float32) one at a time (the scales themselves are not
    returned); `block`: block_size's."""
    tensors = weights.tensors(names)
    for name, tensor in tensors.items():
        scale = scale_name(name)
        if name.endswith(".weight") and tensor.element_size() == 1 and tensor.is_floating_point() and scale in weights:
            tensors[name] = dequantized(tensor, weights.tensor(scale), block, dtype)
    return tensors


def renumbered_exclusions(quantization: dict[str, Any], layers: str, kept: list[int], count: int) -> dict[str, Any]:
    """The quantisation config of a cut of `count` blocks: `modules_to_not_convert` entries that name
    one block (`model.layers.3.mlp.gate`) follow its new number, or go with it, and those past the last
    block (multi-token prediction modules) move down with it; patterns and other names stay."""
    excluded = quantization.get("modules_to_not_convert")
    if not isinstance(excluded, list):
        return quantization
    renumber = {old: new for new, old in enumerate(kept)}
    written = []
    for entry in excluded:
        index, dot, tail = str(entry).removeprefix(layers + ".").partition(".")
        if not str(entry).startswith(layers + ".") or not index.isdigit():
            written.append(entry)
        elif int(index) >= count:  # (a multi-token prediction module, numbered on after the last block)
            written.append(f"{layers}.{int(index) - count + len(kept)}{dot}{tail}")
        elif int(index) in renumber:
            written.append(f"{layers}.{renumber[int(index)]}{dot}{tail}")
    return {**quantization, "modules_to_not_convert": written}
