"""The text decoder of a multimodal checkpoint, written as a text-only checkpoint of its family
(`surgery extract-text`): Gemma 3 as `gemma3_text`, Mistral Small 3.1 as `mistral`, Qwen2-VL and
Qwen2.5-VL as `qwen2`, Qwen3-VL as `qwen3`, LLaVA-style models as their language model's family.
Everything surgery does starts from a decoder-only checkpoint; the vision tower and projector are left behind (docs/pruning.md, Multimodal
checkpoints).

The decoder's tensors are copied file to file from the source's safetensors, as the streamed cut
copies them (surgery.export.streamed): a skeleton of the text model, built from the source's own
`text_config`, names every tensor, and each is looked up under the names multimodal checkpoints
give the language model (transformers' legacy `language_model.model.`, its newer
`model.language_model.`, Idefics' `model.text_model.`). Experts the source stores fused a layer at
a time where the text family stores one tensor per expert (Qwen3-VL-MoE's) are cut out one expert
at a time as they are written. Before the folder moves into place:
(a) every tensor read back has the CRC-32 of the bytes it was written from;
(b) its names and shapes are those a skeleton built from the written config.json implies;
(c) where the multimodal model fits in memory, the written decoder's logits, run block by block,
    equal the multimodal model's on the same text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.arch import (
    ARCHITECTURES,
    TEXT_DECODER_FIXED,
    UNSCALED_LOGITS,
    base_model_type,
    mtp_layer_count,
    mtp_modules,
    multimodal_text_config,
    quantization_method,
    read_config,
    text_family,
)
from surgery.errors import SurgeryError
from surgery.export.checkpoint import ExportResult, count_carried_mtp, logit_diff_within_tolerance, write_manifest
from surgery.export.streamed import check_copied_names, write_copied_folder
from surgery.forward import VERIFY_PROMPT
from surgery.shards import TORCH_DTYPES, SafetensorsFolder, TensorInfo

# a text model's names -> where multimodal checkpoints keep them, tried in this order
# (plain model.: Qwen2-VL's and Qwen2.5-VL's releases, beside visual.; tried last)
LANGUAGE_MODEL_NAMES = (("model.", ("language_model.model.", "model.language_model.", "model.text_model.", "model.")),
                        ("lm_head.", ("language_model.lm_head.", "lm_head.")))


@dataclass
class TextDecoder:
    """The text-only checkpoint to write, mapped onto the multimodal source before anything is written."""

    source: Path
    config: Any  # the text model's config, as it will be written
    tensors: dict[str, TensorInfo]  # name in the text checkpoint -> the source tensor it is copied from
    left_behind: dict[str, int]  # what else the source holds (vision tower, projector): name prefix -> tensors
    parameters: int
    mtp: tuple[str, ...] = ()  # the decoder's multi-token-prediction tensors among `tensors` (Qwen3.5: mtp.*)
    mtp_layers: int = 0  # the MTP modules those tensors make
    mtp_declared: int = 0  # those the source's text config counts
    computed: dict[str, Callable[[], Any]] = field(default_factory=dict)  # name -> its tensor, cut from a fused one
    # where the source stores a layer's experts fused: gate_up_proj / down_proj -> the shape of a layer's
    fused_experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    experts_transposed: bool = False  # stored [experts, in, out] (else [experts, out, in], as the model holds them)
    dropped: frozenset[str] = frozenset()  # decoder tensors transformers drops when loading (ignored_on_load): never copied

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def prepare_text_decoder(folder: Path, trust_remote_code: bool = False) -> TextDecoder:
    """Read the source's config and headers; refuse in one line what cannot be extracted."""
    import torch

    from surgery.forward import count_parameters
    from surgery.layerwise import checkpoint_shapes, skeleton

    data = read_config(folder)
    text = multimodal_text_config(data)
    if not isinstance(text, dict):
        raise SurgeryError(f"{folder} is not a multimodal checkpoint (its config.json has no text_config): "
                           "give it to surgery's other commands as it is")
    family = text_family(data)
    if family is None:
        inner = base_model_type(text) or "unknown"
        raise SurgeryError(f"{folder}: its text decoder is '{inner}', which surgery does not support "
                           f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    if quantization_method(data):
        raise SurgeryError(f"{folder} is stored {quantization_method(data)}-quantised: extract-text copies "
                           "full-precision weights; start from the full-precision release")
    weights = SafetensorsFolder(folder, "extract-text reads safetensors weights only: convert them first")
    stored = weights.main_dtype()
    config = as_text_family(_text_config(folder, data, trust_remote_code), family)
    if base_model_type(data) in UNSCALED_LOGITS:
        setattr(config, ARCHITECTURES[family].logit_multiplier_config, 1.0)
    config.tie_word_embeddings = _tied(folder, data, weights)
    config.dtype = TORCH_DTYPES[stored]
    model = skeleton(config, getattr(torch, TORCH_DTYPES[stored]))
    config.architectures = [type(model).__name__]
    shapes = checkpoint_shapes(model)
    computed = _experts_from_fused(weights, folder, shapes)
    tensors = {name: computed[name][0] if name in computed else _source_tensor(weights, folder, name, shape)
               for name, shape in shapes.items()}
    mtp = mtp_modules(weights.info, text)  # (the text_config counts them)
    tensors.update({name: weights.info[where] for name, where in mtp.tensors.items()})
    declared = mtp_layer_count(text, weights.info)
    count_carried_mtp(config, mtp, declared)
    fused = {info.name.rsplit(".", 1)[-1]: weights.info[info.name].shape for info, _ in computed.values()}
    left, dropped = _left_behind(folder, weights, tensors, computed, ignored_on_load(model))
    return TextDecoder(Path(folder), config, tensors, left, count_parameters(model),
                       tuple(mtp.tensors), mtp.layers, declared, {name: read for name, (_, read) in computed.items()}, fused,
                       any(read.transposed for _, read in computed.values()), frozenset(dropped))


def _text_config(folder: Path, data: dict[str, Any], trust_remote_code: bool) -> Any:
    """The decoder's config as transformers reads the multimodal one, with the special tokens the
    multimodal config sets for the whole model (Gemma 3 ends turns with token 106 as well as 1)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from surgery.arch import config_error

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).get_text_config()
    except StrictDataclassError as error:  # a field of the wrong type (a count where a flag belongs)
        raise config_error(folder, error) from None
    except ValueError as error:
        first = str(error).strip().splitlines()[0][:160]
        raise SurgeryError(f"{folder}: transformers cannot read its config.json ({first}): pass --trust-remote-code if "
                           "the model ships its own code and you trust it, or update transformers") from None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if data.get(key) is not None:
            setattr(config, key, data[key])
    return config


def as_text_family(config: Any, family: str) -> Any:
    """The decoder's config as its text-only family's, where transformers has no causal-LM class for
    the multimodal one's text config (arch.TEXT_DECODER_AS): the same fields, and the M-RoPE
    sections dropped, as text runs all three position ids alike (check (c) compares the logits)."""
    if base_model_type(config) == family:
        return config
    from transformers import AutoConfig

    fields = {key: value for key, value in config.to_dict().items()
              if key not in ("model_type", "architectures", "_name_or_path", "transformers_version")}
    rope = {key: value for key, value in (fields.get("rope_parameters") or {}).items() if key not in ("mrope_section", "mrope_interleaved")}
    if rope.get("rope_type") == "mrope":
        rope["rope_type"] = "default"
    fields["rope_parameters"] = rope or None
    # the head size, where the multimodal config derives it (GLM-4V's): the family's config may default it otherwise
    fields.setdefault("head_dim", config.hidden_size // config.num_attention_heads)
    fields.update(TEXT_DECODER_FIXED.get(base_model_type(config), {}))
    return AutoConfig.for_model(family, **fields)


def _tied(folder: Path, data: dict[str, Any], weights: SafetensorsFolder) -> bool:
    """Whether the decoder's output layer is its embeddings: as the config says (the multimodal
    config's word, else its text_config's), and where it is silent, as the files show."""
    stored = any(is_output_layer(name) for name in weights.info)
    said = data.get("tie_word_embeddings", multimodal_text_config(data).get("tie_word_embeddings"))
    if said is False and not stored:
        raise SurgeryError(f"{folder}: config.json says the output layer is its own, but the files hold none: "
                           "download the model again")
    return not stored if said is None else bool(said)


def ignored_on_load(model: Any) -> Callable[[str], bool]:
    """Whether transformers drops a stored tensor when it loads `model`'s class (its modules'
    `_keys_to_ignore_on_load_unexpected`, searched in the name as transformers searches them:
    Gemma 4 E2B's files hold key and value projections for the layers that reuse another's)."""
    import re

    patterns = [re.compile(pattern) for module in model.modules()
                for pattern in (getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())]
    return lambda name: any(pattern.search(name) for pattern in patterns)


def _left_behind(folder: Path, weights: SafetensorsFolder, tensors: dict[str, TensorInfo], computed: dict[str, Any],
                 ignored: Callable[[str], bool]) -> tuple[dict[str, int], list[str]]:
    """What the source holds beside the decoder (vision tower, projector): name prefix -> tensors;
    and the decoder's tensors that transformers itself drops when loading it (`ignored`), dropped
    here too. Any other tensor under the decoder's own names that its config has no place for (a
    layer more than num_hidden_layers says) means config and weights disagree: refused, not left behind."""
    used = {info.name for info in tensors.values()}
    body = {info.name[: len(info.name) - len(name) + len("model.")] for name, info in tensors.items()
            if name.startswith("model.") and name not in computed}
    left: dict[str, int] = {}
    dropped = []
    for name in weights.info:
        if name in used or is_output_layer(name):
            continue  # (an output layer the config ties to the embeddings is not the decoder's)
        inside = any(name.startswith(prefix) for prefix in body)
        if inside and ignored(name):
            dropped.append(name)
            continue
        if inside:
            raise SurgeryError(f"{folder} holds {name} in its text decoder, which its text_config has no place for: "
                               "fix num_hidden_layers and the sizes in config.json, or download the model again")
        parts = name.split(".")
        prefix = ".".join(parts[:2] if parts[0] == "model" else parts[:1])  # vision_tower, model.vision_tower
        left[prefix] = left.get(prefix, 0) + 1
    return left, dropped


def is_output_layer(name: str) -> bool:
    return name.startswith(LANGUAGE_MODEL_NAMES[1][1])


def _stored(weights: SafetensorsFolder, name: str) -> TensorInfo | None:
    """The source tensor the text checkpoint's `name` is, under any name multimodal checkpoints give it."""
    return next((weights.info[where + name[len(ours):]] for ours, places in LANGUAGE_MODEL_NAMES if name.startswith(ours)
                 for where in places if where + name[len(ours):] in weights.info), None)


def _source_tensor(weights: SafetensorsFolder, folder: Path, name: str, shape: tuple[int, ...] | None) -> TensorInfo:
    """_stored, checked against `shape` (None: any); a one-line error where the source lacks it."""
    info = _stored(weights, name)
    if info is not None:
        if shape is not None and info.shape != shape:
            raise SurgeryError(f"{folder}: {info.name} is {list(info.shape)} but its text_config implies "
                               f"{list(shape)}: fix config.json or download the model again")
        return info
    raise SurgeryError(f"{folder} has no tensor for the text decoder's {name} under any name multimodal checkpoints "
                       "give it: download the model again, or convert it with its family's own tools")


# a text checkpoint's per-expert tensor (Qwen3-MoE's): the layer's experts, the expert, the projection
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _experts_from_fused(weights: SafetensorsFolder, folder: Path,
                        shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[TensorInfo, Callable[[], Any]]]:
    """The text family's per-expert tensors that the source stores fused a layer at a time (Qwen3-VL-MoE's
    experts.gate_up_proj, gate then up, and experts.down_proj), each with how to cut it out: name ->
    (the fused source tensor, sized as the part; a reader of the part). The source may store them as
    its model holds them, [experts, out, in] (as transformers saves them), or transposed, [experts,
    in, out] (as the releases do); which, the shapes say."""
    found = {}
    for name, shape in shapes.items():
        match = PER_EXPERT.match(name)
        if match is None or _stored(weights, name) is not None:
            continue  # (stored one by one: copied as they are)
        layer, expert, part = match.group(1), int(match.group(2)), match.group(3)
        gate_up, down = (_source_tensor(weights, folder, f"{layer}.{fused}", None) for fused in ("gate_up_proj", "down_proj"))
        intermediate, hidden = shapes[f"{layer}.{expert}.gate_proj.weight"]
        transposed = _transposed(folder, gate_up, down, intermediate, hidden, expert)
        fused = down if part == "down_proj" else gate_up
        rows = slice(None) if part == "down_proj" else slice(0, intermediate) if part == "gate_proj" else slice(intermediate, None)
        found[name] = (TensorInfo(fused.name, fused.dtype, tuple(shape), fused.nbytes // math.prod(fused.shape) * math.prod(shape)),
                       _expert_reader(fused, expert, rows, transposed))
    return found


def _transposed(folder: Path, gate_up: TensorInfo, down: TensorInfo, intermediate: int, hidden: int, expert: int) -> bool:
    """Whether a layer's fused experts are stored [experts, in, out] (else as the model holds them,
    [experts, out, in]), from whichever of the two is not square; a one-line error for any other shape."""
    held = {gate_up.name: (2 * intermediate, hidden), down.name: (hidden, intermediate)}
    for info in (gate_up, down):
        if info.shape[1:] not in (held[info.name], held[info.name][::-1]) or expert >= info.shape[0]:
            raise SurgeryError(f"{folder}: {info.name} is {list(info.shape)}, which holds no expert {expert} of "
                               f"{list(held[info.name])} or its transpose as the text_config implies: fix config.json or "
                               "download the model again")
    plain = down if hidden != intermediate else gate_up  # (both square only for an intermediate size of 0)
    return plain.shape[1:] != held[plain.name]


def _expert_reader(fused: TensorInfo, expert: int, rows: slice, transposed: bool) -> Callable[[], Any]:
    """Reads one expert's part of a fused tensor from its file, [out, in] as the text family stores it
    (`.transposed`: how the source stores it)."""
    def read() -> Any:
        from safetensors import safe_open

        with safe_open(str(fused.file), "pt") as handle:
            held = handle.get_slice(fused.name)[expert]
        return (held.T if transposed else held)[rows].contiguous()
    read.transposed = transposed
    return read


def fuse_experts(parts: Callable[[str], Any], layer: str, kind: str, experts: int, transposed: bool) -> Any:
    """One layer's experts fused as the source stores them (the reverse of the reading above, for
    surgery graft): `parts(name)` reads the text checkpoint's per-expert tensor `name`."""
    import torch

    held = [torch.cat([parts(f"{layer}.{j}.gate_proj.weight"), parts(f"{layer}.{j}.up_proj.weight")]) if kind == "gate_up_proj"
            else parts(f"{layer}.{j}.down_proj.weight") for j in range(experts)]
    return torch.stack([t.T if transposed else t for t in held]).contiguous()


def export_text_decoder(decoder: TextDecoder, tokenizer: Any, out: Path, *, record: dict[str, Any], max_shard_size: int,
                        force: bool = False, protected: list[Path] = (), extra_files: dict[str, str] | None = None,
                        unpublished: tuple[str, ...] = (), device: str = "cpu", trust_remote_code: bool = False) -> ExportResult:
    """Write the text decoder to `out`, checked as the module docstring says, atomically."""
    from surgery.files import check_free_space, check_output_folder, staged_folder

    out = check_output_folder(out, force=force, protected=list(protected))
    check_free_space(out, decoder.nbytes, "the checkpoint")
    with staged_folder(out) as staging:
        digests = write_copied_folder(staging, decoder.source, decoder.config, decoder.tensors, decoder.parameters, tokenizer,
                                      max_shard_size=max_shard_size, copy_from=decoder.source, extra_files=extra_files,
                                      computed=decoder.computed)
        verified = _check_folder(decoder, staging, tokenizer, device, trust_remote_code)
        manifest = write_manifest(staging, {**record, "layout": "hf", "unpublished": list(unpublished)}, verified, digests)
    return ExportResult(out, verified["max_abs_logit_diff"], "transformers", manifest)


def _check_folder(decoder: TextDecoder, folder: Path, tokenizer: Any, device: str, trust_remote_code: bool) -> dict[str, Any]:
    """Checks (b) and (c) of the module docstring: the manifest's `verified` record."""
    import torch

    from surgery.console import console, task
    from surgery.forward import verification_ids
    from surgery.layerwise import LayerwiseModel
    from surgery.memory import available_memory, fits_in_memory, safetensors_bytes

    written = LayerwiseModel(folder, device=device)
    try:
        check_copied_names(folder, written, {name: decoder.tensors[name].shape for name in decoder.mtp})
        verified = {"max_abs_logit_diff": None, "loader": "transformers", "method": "copied, names and shapes checked",
                    "prompt": VERIFY_PROMPT, "cached_generation": False, "tensors_checked": len(decoder.tensors)}
        if not fits_in_memory(safetensors_bytes(decoder.source), available_memory(device)):
            console.print("the multimodal model does not fit in memory: its logits were not compared with the decoder's "
                          "(every tensor was checked as copied)")
            return verified
        loaded = multimodal_model(decoder.source, written.dtype, device, trust_remote_code)
        if loaded is None:
            console.print("transformers has no class that runs the multimodal model on text: its logits were not compared "
                          "with the decoder's (every tensor was checked as copied)")
            return verified
        ids = verification_ids(tokenizer, written.config.vocab_size)
        with task("comparing the text decoder with the multimodal model"), torch.no_grad():
            want = loaded[0](input_ids=ids.to(device), use_cache=False).logits.float()
            got = written.forward(ids).to(want.device)
    finally:
        written.close()
    diff = logit_diff_within_tolerance(want, got, written.dtype, "the text decoder's logits differ from the multimodal model's")
    return {**verified, "max_abs_logit_diff": diff, "method": "copied, compared with the multimodal model"}


def multimodal_model(folder: Path, dtype: Any, device: str, trust_remote_code: bool) -> tuple[Any, dict[str, Any]] | None:
    """A multimodal checkpoint as transformers runs it (image-text-to-text, else as a causal LM),
    with from_pretrained's loading info (missing and unexpected weights); None where no Auto class
    takes it (Qwen2-Audio's is audio-text-to-text)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            model, info = auto.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code,
                                               output_loading_info=True)
        except ValueError:
            continue
        return model.to(device).eval(), info
    return None
