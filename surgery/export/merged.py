"""The out-of-core merge: LoRA adapters folded into a checkpoint file to file, without ever building
the model (`surgery heal` on a model that does not fit in memory twice; docs/scale.md).

Every tensor of the base checkpoint is written in its order and dtype: a weight an adapter adapts
is read, merged as peft merges it on the CPU (W + scale * B @ A, the product in float32, added in
float32 and rounded once to W's dtype) and written; every other tensor is copied as stored. With
no adapter (partial-layer healing, whose trained model is the result) every tensor is copied.
Before the folder moves into place, the result is checked in ways that scale:
(a) every tensor read back from disk has the CRC-32 of the bytes it was written from;
(b) its names, dtypes and shapes are the base's;
(c) its logits, run block by block from the written files, equal those of the base run block by
    block with each block's adapted weights merged in memory (names, shards, config and tokenizer
    are right; the merge itself is tested against peft's merge_and_unload in tests/test_merged.py).
Memory holds the adapter, one tensor and its merged copy (the merge), or one block (the check).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.export.checkpoint import ExportResult, add_files, logit_diff_within_tolerance, write_manifest
from surgery.forward import VERIFY_PROMPT
from surgery.shards import SafetensorsFolder, TensorInfo, tensor_bytes, write_checkpoint_shards

IN_MEMORY = "merge in memory with --no-stream"
# adapter_config.json entries whose non-default values change what merging means; surgery's own
# adapters never set them, and the streamed merge applies plain LoRA only.
_PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


@dataclass
class Adapter:
    """A LoRA adapter as the merge needs it: per adapted weight of the base, its float32 (A, B)."""

    scale: float
    pairs: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # base weight name -> (A [r, in], B [out, r])

    def merged(self, name: str, weight: Any) -> Any:
        """`weight` with its adapter folded in, as peft's merge on the CPU computes it."""
        a, b = self.pairs[name]
        return (weight.float() + (b @ a) * self.scale).to(weight.dtype)


def read_adapter(folder: Path, base: SafetensorsFolder, layers_prefix: str, saved_prefix: str | None = None) -> Adapter:
    """The adapter peft saved in `folder`, checked against the base checkpoint it adapts: plain
    LoRA on weights inside the decoder blocks, each pair's product shaped as its weight. Its pairs
    are named as the checkpoint names the weights (`saved_prefix`: the blocks' path there, where
    transformers saves them under another, as Nemotron-H's backbone.layers)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    except (OSError, ValueError) as error:
        raise SurgeryError(f"{folder} holds no readable LoRA adapter ({error}): heal again") from None
    unusual = [key for key, plain in _PLAIN_LORA.items() if config.get(key, plain) not in (plain, None, [], {})]
    if config.get("peft_type", "LORA") != "LORA" or unusual:
        raise SurgeryError(f"{folder}: the streamed merge applies plain LoRA, and this adapter sets "
                           f"{unusual[0] if unusual else config.get('peft_type')}: {IN_MEMORY}")
    rank, alpha = config["r"], config["lora_alpha"]
    adapter = Adapter(alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank)
    modules = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    for module in sorted(modules):
        a, b = tensors.get(f"base_model.model.{module}.lora_A.weight"), tensors.get(f"base_model.model.{module}.lora_B.weight")
        stored = (saved_prefix or layers_prefix) + module[len(layers_prefix):] if module.startswith(f"{layers_prefix}.") else module
        name = f"{stored}.weight"
        info = base.info.get(name)
        if b is None or info is None or not module.startswith(f"{layers_prefix}."):
            raise SurgeryError(f"{folder} adapts {module}, which is not a weight of the checkpoint's decoder blocks "
                               f"under that name: {IN_MEMORY}")
        if (b.shape[0], a.shape[1]) != info.shape:
            raise SurgeryError(f"{folder}: the adapter of {module} is {b.shape[0]}x{a.shape[1]} but the weight is "
                               f"{'x'.join(map(str, info.shape))}: heal this checkpoint again")
        adapter.pairs[name] = (a.float(), b.float())
    if len(modules) * 2 != len(tensors):
        raise SurgeryError(f"{folder} holds tensors other than LoRA pairs: {IN_MEMORY}")
    return adapter


def export_merged(base: Path, adapter: Path | None, tokenizer: Any, out: Path, *,
                  describe: Callable[[Path], tuple[dict[str, Any], dict[str, str]]], max_shard_size: int,
                  force: bool = False, protected: list[Path] = (), copy_from: Path | None = None,
                  unpublished: tuple[str, ...] = (), device: str = "cpu") -> ExportResult:
    """Write `base` with `adapter` merged to `out`, checked as the module docstring says, atomically.

    describe(folder): called on the written, checked folder before the manifest (to evaluate it
    block by block); returns the record for surgery.json and the extra files to add beside it.
    Other arguments as surgery.export.checkpoint.export_checkpoint's.
    """
    from surgery.arch import architecture_of
    from surgery.files import check_free_space, check_output_folder, staged_folder
    from surgery.layerwise import load_config, saved_path, skeleton

    out = check_output_folder(out, force=force, protected=list(protected))
    weights = SafetensorsFolder(base, "the streamed merge reads safetensors weights only: " + IN_MEMORY)
    config = load_config(base)
    layers = architecture_of(config).layers
    lora = read_adapter(adapter, weights, layers, saved_path(skeleton(config), layers)) if adapter is not None else Adapter(1.0)
    check_free_space(out, weights.nbytes, "the checkpoint")
    with staged_folder(out) as staging:
        try:
            digests = _write_weights(weights, lora, staging, max_shard_size)
        finally:
            weights.close()
        _copy_model_files(base, config, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        diff = _check_folder(base, lora, staging, tokenizer, device)
        record, extra_files = describe(staging)
        add_files(staging, copy_from, extra_files)
        loader = "trust_remote_code" if getattr(config, "surgery", None) else "transformers"
        verified = {"max_abs_logit_diff": diff, "loader": loader, "method": "streamed merge", "prompt": VERIFY_PROMPT,
                    "cached_generation": False, "tensors_checked": len(weights.info), "weights_merged": len(lora.pairs)}
        manifest = write_manifest(staging, {**record, "layout": "hf", "unpublished": list(unpublished)}, verified, digests)
    return ExportResult(out, diff, loader, manifest)


def _write_weights(weights: SafetensorsFolder, lora: Adapter, folder: Path, max_shard_size: int) -> dict[str, str]:
    """Every tensor of the base, merged where adapted, into shards, each read back (check a); the
    SHA-256 of each shard."""

    def chunks(info: TensorInfo) -> Any:
        if info.name not in lora.pairs:
            return weights.read(info.name)
        merged = lora.merged(info.name, weights.tensor(info.name))
        return [tensor_bytes(merged)]

    parameters = sum(math.prod(info.shape) for info in weights.info.values())
    return write_checkpoint_shards(folder, weights.info, chunks, max_shard_size=max_shard_size, parameters=parameters,
                                   label="merging the adapter into the shards")


def _copy_model_files(base: Path, config: Any, folder: Path) -> None:
    """What describes the model beside its weights, as the base has it: config.json and the
    generation config, and for a sublayer cut its model type and modeling file (as the in-memory
    export writes them). The base's record, report and card are not the merged model's."""
    import shutil

    from surgery.export.checkpoint import make_self_describing

    for name in ("config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)
    if getattr(config, "surgery", None):
        make_self_describing(folder, config)


def _check_folder(base: Path, lora: Adapter, folder: Path, tokenizer: Any, device: str) -> float:
    """Checks (b) and (c) of the module docstring; returns the largest logit difference."""
    import torch

    from surgery.console import task
    from surgery.forward import verification_ids
    from surgery.layerwise import LayerwiseModel, saved_path

    written = LayerwiseModel(folder, device=device)
    source = LayerwiseModel(base, device=device)
    try:
        found = {name: (info.dtype, info.shape) for name, info in SafetensorsFolder(folder, strict=True).info.items()}
        if found != {name: (info.dtype, info.shape) for name, info in source.weights.info.items()}:
            raise SurgeryError("export check failed: the merged checkpoint does not hold the base's tensors; nothing was written")
        ids = verification_ids(tokenizer, written.config.vocab_size)
        with task("comparing the merged checkpoint with the base and adapter, block by block"):
            stream = source.embed(ids)
            layers = saved_path(source.model, source.arch.layers)  # (the pairs are named as the files name the weights)
            for index, block in source.blocks():
                inside = f"{layers}.{index}."
                for name in (n for n in lora.pairs if n.startswith(inside)):
                    module = block.get_submodule(name[len(inside):].removesuffix(".weight"))
                    module.weight = torch.nn.Parameter(lora.merged(name, module.weight.detach().cpu()).to(device),
                                                       requires_grad=False)  # released with the block
                stream.hidden = source.run(block, index, stream)
            want = source.logits(source.final_norm(stream.hidden))
            got = written.forward(ids)
    finally:
        source.close()
        written.close()
    return logit_diff_within_tolerance(want, got, written.dtype, "the merged checkpoint's logits, run block by block, "
                                       "differ from the base's with the adapter merged in memory")
