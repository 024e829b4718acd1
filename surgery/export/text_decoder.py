"""The text decoder of a multimodal checkpoint, written as a text-only checkpoint of its family
(`surgery extract-text`): Gemma 3 as `gemma3_text`, Mistral Small 3.1 as `mistral`, LLaVA-style
models as their language model's family. Everything surgery does starts from a decoder-only
checkpoint; the vision tower and projector are left behind (docs/pruning.md, Multimodal
checkpoints).

The decoder's tensors are copied file to file from the source's safetensors, as the streamed cut
copies them (surgery.export.streamed): a skeleton of the text model, built from the source's own
`text_config`, names every tensor, and each is looked up under the names multimodal checkpoints
give the language model (transformers' legacy `language_model.model.`, its newer
`model.language_model.`, Idefics' `model.text_model.`). Before the folder moves into place:
(a) every tensor read back has the CRC-32 of the source bytes it was copied from;
(b) its names and shapes are those a skeleton built from the written config.json implies;
(c) where the multimodal model fits in memory, the written decoder's logits, run block by block,
    equal the multimodal model's on the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.arch import ARCHITECTURES, base_model_type, quantization_method, read_config, text_family
from surgery.errors import SurgeryError
from surgery.export.checkpoint import ExportResult, add_files, logit_diff_within_tolerance, write_manifest
from surgery.forward import VERIFY_PROMPT
from surgery.shards import TORCH_DTYPES, SafetensorsFolder, TensorInfo, write_checkpoint_shards

# a text model's names -> where multimodal checkpoints keep them, tried in this order
LANGUAGE_MODEL_NAMES = (("model.", ("language_model.model.", "model.language_model.", "model.text_model.")),
                        ("lm_head.", ("language_model.lm_head.", "lm_head.")))


@dataclass
class TextDecoder:
    """The text-only checkpoint to write, mapped onto the multimodal source before anything is written."""

    source: Path
    config: Any  # the text model's config, as it will be written
    tensors: dict[str, TensorInfo]  # name in the text checkpoint -> the source tensor it is copied from
    left_behind: dict[str, int]  # what else the source holds (vision tower, projector): name prefix -> tensors
    parameters: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def prepare_text_decoder(folder: Path) -> TextDecoder:
    """Read the source's config and headers; refuse in one line what cannot be extracted."""
    import torch
    from transformers import AutoConfig

    from surgery.forward import count_parameters
    from surgery.layerwise import checkpoint_shapes, skeleton

    data = read_config(folder)
    if not isinstance(data.get("text_config"), dict):
        raise SurgeryError(f"{folder} is not a multimodal checkpoint (its config.json has no text_config): "
                           "give it to surgery's other commands as it is")
    family = text_family(data)
    if family is None:
        inner = base_model_type(data["text_config"]) or "unknown"
        raise SurgeryError(f"{folder}: its text decoder is '{inner}', which surgery does not support "
                           f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    if quantization_method(data):
        raise SurgeryError(f"{folder} is stored {quantization_method(data)}-quantised: extract-text copies "
                           "full-precision weights; start from the full-precision release")
    weights = SafetensorsFolder(folder, "extract-text reads safetensors weights only: convert them first")
    stored = weights.main_dtype()
    config = AutoConfig.from_pretrained(str(folder)).get_text_config()
    config.tie_word_embeddings = not any(name.startswith(where) for _, places in LANGUAGE_MODEL_NAMES[1:]
                                         for where in places for name in weights.info)
    config.dtype = TORCH_DTYPES[stored]
    model = skeleton(config, getattr(torch, TORCH_DTYPES[stored]))
    config.architectures = [type(model).__name__]
    tensors = {name: _source_tensor(weights, folder, name, shape) for name, shape in checkpoint_shapes(model).items()}
    used = {info.name for info in tensors.values()}
    left_behind: dict[str, int] = {}
    for name in weights.info:
        if name not in used:
            parts = name.split(".")
            prefix = ".".join(parts[:2] if parts[0] == "model" else parts[:1])  # vision_tower, model.vision_tower
            left_behind[prefix] = left_behind.get(prefix, 0) + 1
    return TextDecoder(Path(folder), config, tensors, left_behind, count_parameters(model))


def _source_tensor(weights: SafetensorsFolder, folder: Path, name: str, shape: tuple[int, ...]) -> TensorInfo:
    for ours, places in LANGUAGE_MODEL_NAMES:
        if name.startswith(ours):
            for where in places:
                info = weights.info.get(where + name[len(ours):])
                if info is not None:
                    if info.shape != shape:
                        raise SurgeryError(f"{folder}: {info.name} is {list(info.shape)} but its text_config implies "
                                           f"{list(shape)}: fix config.json or download the model again")
                    return info
    raise SurgeryError(f"{folder} has no tensor for the text decoder's {name} under any name multimodal checkpoints "
                       "give it: download the model again, or convert it with its family's own tools")


def export_text_decoder(decoder: TextDecoder, tokenizer: Any, out: Path, *, record: dict[str, Any], max_shard_size: int,
                        force: bool = False, protected: list[Path] = (), extra_files: dict[str, str] | None = None,
                        unpublished: tuple[str, ...] = (), device: str = "cpu") -> ExportResult:
    """Write the text decoder to `out`, checked as the module docstring says, atomically."""
    from transformers import GenerationConfig

    from surgery.files import check_free_space, check_output_folder, staged_folder

    out = check_output_folder(out, force=force, protected=list(protected))
    check_free_space(out, decoder.nbytes, "the checkpoint")
    with staged_folder(out) as staging:
        source = SafetensorsFolder(decoder.source)
        try:
            digests = write_checkpoint_shards(staging, decoder.tensors, lambda info: source.read(decoder.tensors[info.name].name),
                                              lies_in=lambda info: decoder.tensors[info.name], max_shard_size=max_shard_size,
                                              parameters=decoder.parameters, label="writing the text decoder")
        finally:
            source.close()
        decoder.config.save_pretrained(staging)
        if (decoder.source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(decoder.source)).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        add_files(staging, decoder.source, extra_files or {})
        verified = _check_folder(decoder, staging, tokenizer, device)
        manifest = write_manifest(staging, {**record, "layout": "hf", "unpublished": list(unpublished)}, verified, digests)
    return ExportResult(out, verified["max_abs_logit_diff"], "transformers", manifest)


def _check_folder(decoder: TextDecoder, folder: Path, tokenizer: Any, device: str) -> dict[str, Any]:
    """Checks (b) and (c) of the module docstring: the manifest's `verified` record."""
    import torch

    from surgery.console import console, task
    from surgery.forward import verification_ids
    from surgery.layerwise import LayerwiseModel, checkpoint_shapes
    from surgery.memory import available_memory, fits_in_memory, safetensors_bytes

    written = LayerwiseModel(folder, device=device)
    try:
        expected = checkpoint_shapes(written.model)
        found = {name: info.shape for name, info in SafetensorsFolder(folder, strict=True).info.items()}
        if found != expected:
            odd = sorted(set(found) ^ set(expected)) or sorted(n for n in found if found[n] != expected[n])
            raise SurgeryError(f"export check failed: the written tensors are not those config.json implies ({odd[0]}); "
                               "nothing was written")
        verified = {"max_abs_logit_diff": None, "loader": "transformers", "method": "copied, names and shapes checked",
                    "prompt": VERIFY_PROMPT, "cached_generation": False, "tensors_checked": len(decoder.tensors)}
        if not fits_in_memory(safetensors_bytes(decoder.source), available_memory(device)):
            console.print("the multimodal model does not fit in memory: its logits were not compared with the decoder's "
                          "(every tensor was checked as copied)")
            return verified
        ids = verification_ids(tokenizer, written.config.vocab_size)
        with task("comparing the text decoder with the multimodal model"), torch.no_grad():
            want = _multimodal_model(decoder.source, written.dtype, device)(ids.to(device), use_cache=False).logits.float()
            got = written.forward(ids).to(want.device)
    finally:
        written.close()
    diff = logit_diff_within_tolerance(want, got, written.dtype, "the text decoder's logits differ from the multimodal model's")
    return {**verified, "max_abs_logit_diff": diff, "method": "copied, compared with the multimodal model"}


def _multimodal_model(folder: Path, dtype: Any, device: str) -> Any:
    """The source as transformers runs it (image-text-to-text; a few load as causal LMs only)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    except ValueError:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device).eval()
