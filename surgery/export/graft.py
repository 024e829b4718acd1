"""A cut text decoder put back into the multimodal checkpoint it was extracted from (`surgery graft`),
the way back from `surgery extract-text`: the source's vision tower, projector, processor and
tokenizer, with the cut (and healed) decoder in place of its own, so that an image-text model
stays one after its language model loses blocks.

The decoder must be one surgery can vouch for: its family's own checkpoint (whole blocks cut, so
the multimodal class builds it; sublayer stand-ins exist only in surgery's text classes), whose
config differs from the source's text decoder only where a cut changes a config (the block count,
per-layer lists, layer indices, leading-layer counts, MTP counts: surgery.cut.cut_keys). Anything else that
differs (a width, the vocabulary, tied embeddings) means it was not cut from this source, and the
graft is refused before anything is written.

Tensors are copied file to file from the two folders: the decoder's under the names the source
gives its language model (whichever layout it uses, as extract-text found them), every other
tensor of the source unchanged; experts the source stores fused a layer at a time (Qwen3-VL-MoE's)
are fused back from the decoder's per-expert tensors in the source's layout. The config is the source's, with the cut keys of its text_config
set as the decoder's. Before the folder moves into place:
(a) every tensor read back has the CRC-32 of the bytes it was written from;
(b) the decoder's tensors, named back, are those a skeleton of the written text_config implies,
    and the rest are the source's, by name and shape;
(c) where the grafted model fits in memory and transformers runs it on text, it loads with no
    missing or unexpected weight, and its logits on the same text equal the decoder's, run block
    by block.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from surgery.arch import architecture_of, base_model_type, mtp_modules, quantization_method, read_config
from surgery.errors import SurgeryError
from surgery.export.checkpoint import MANIFEST, ExportResult, keep_released_words, logit_diff_within_tolerance, write_manifest
from surgery.export.streamed import check_names_written, first_difference
from surgery.export.text_decoder import (
    LANGUAGE_MODEL_NAMES,
    PER_EXPERT,
    TextDecoder,
    as_text_family,
    fuse_experts,
    is_output_layer,
    multimodal_model,
    prepare_text_decoder,
)
from surgery.forward import VERIFY_PROMPT
from surgery.shards import SafetensorsFolder, TensorInfo

# what differs between two configs without saying anything about the model
BOOKKEEPING_KEYS = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"})
# files of the source that are not carried: weights, its config and records, and its model card
NOT_CARRIED = ("config.json", MANIFEST, "local.json", "README.md")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass
class Graft:
    """The multimodal checkpoint to write, mapped onto its two sources before anything is written."""

    source: Path  # the multimodal checkpoint
    decoder: Path  # the cut text decoder
    config: Any  # the multimodal config to write
    text_config: Any  # the decoder's config as the written one will give it
    tensors: dict[str, tuple[Path, TensorInfo]]  # name written -> (folder, tensor read there)
    decoder_names: dict[str, str]  # name written -> the decoder's name for it
    mtp: dict[str, tuple[int, ...]]  # the decoder's MTP tensors (its names) -> shape
    changed: dict[str, tuple[Any, Any]]  # text_config key -> (the source's, the decoder's)
    computed: dict[str, Callable[[], Any]] = field(default_factory=dict)  # name written -> its tensor, fused here
    fused_parts: frozenset[str] = frozenset()  # the decoder's per-expert tensors those are fused from

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    @property
    def parameters(self) -> int:
        return sum(math.prod(info.shape) for _, info in self.tensors.values())


def prepare_graft(decoder_folder: Path, source_folder: Path, trust_remote_code: bool = False) -> Graft:
    """Read both configs and every header; refuse in one line a decoder not cut from the source."""
    extracted = prepare_text_decoder(source_folder, trust_remote_code)
    family = base_model_type(extracted.config)
    _check_decoder_kind(decoder_folder, family)
    cut = _config(decoder_folder, trust_remote_code)
    changed = _changed(extracted.config, cut)
    from surgery.cut import cut_keys

    allowed = cut_keys(architecture_of(cut), cut)
    odd = sorted(set(changed) - allowed)
    if odd:
        before, after = changed[odd[0]]
        raise SurgeryError(f"{decoder_folder} differs from {source_folder}'s text decoder in {odd[0]} ({after!r} against "
                           f"{before!r}), which no cut changes: graft a decoder cut from this source's own "
                           f"(surgery extract-text {source_folder})")
    config = _config(source_folder, trust_remote_code)
    text = config.get_text_config()
    for key in sorted(changed, key=lambda key: key == "per_layer_config"):  # (last: its indices are checked against the count)
        setattr(text, key, changed[key][1] if key == "per_layer_config" else getattr(cut, key))
    _say_moved_deepstack(config, decoder_folder, changed)
    weights = SafetensorsFolder(decoder_folder, "graft reads safetensors weights only: export the decoder again")
    mtp = mtp_modules(weights.info, cut)
    names = _decoder_tensors(decoder_folder, cut, weights, mtp.tensors)
    tensors, decoder_names = _placed(decoder_folder, extracted, names)
    computed, fused_parts = _fused_back(decoder_folder, extracted, names, tensors)
    source = SafetensorsFolder(source_folder)
    used = {info.name for info in extracted.tensors.values()} | extracted.dropped  # (what loading drops stays dropped)
    for name, info in source.info.items():
        if name not in used and not is_output_layer(name):  # (one stored beside tied embeddings is not the decoder's)
            tensors[name] = (Path(source_folder), info)
    return Graft(Path(source_folder), Path(decoder_folder), config, cut, tensors, decoder_names,
                 {name: names[name].shape for name in mtp.tensors}, changed, computed, frozenset(fused_parts))


def _say_moved_deepstack(config: Any, decoder_folder: Path, changed: dict[str, tuple[Any, Any]]) -> None:
    """Qwen3-VL adds its vision tower's DeepStack features to the image tokens after each of the
    decoder's first blocks, by position: where the cut removed one of them, they now enter after the
    blocks that took those places, which nothing healed or measured. Said, not refused (the decoder's
    surgery.json names the blocks kept, where it is the cut's own)."""
    from surgery.console import console
    from surgery.export.checkpoint import read_manifest

    count = len(getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None) or [])
    if not count or "num_hidden_layers" not in changed:
        return
    try:
        kept = read_manifest(decoder_folder).get("kept_layers")
    except SurgeryError:
        kept = None
    if isinstance(kept, list) and kept[:count] == list(range(count)):
        return
    which = (f"the cut removed {', '.join(f'L{i}' for i in range(count) if i not in kept)} of" if isinstance(kept, list)
             else "if the cut removed any of")
    console.print(f"{which} the first {count} decoder blocks, after which {base_model_type(config)} adds its vision tower's "
                  "DeepStack features to the image tokens: they now enter after the blocks that took those places, which "
                  "no text healing trained or measured; evaluate the model on images before you rely on it")


def _check_decoder_kind(folder: Path, family: str) -> None:
    """Refuse what no multimodal class can hold: another family, stand-ins, other layouts, quantised weights."""
    from surgery.arch import SURGERY_MODEL_TYPE_PREFIX

    data = read_config(folder)
    model_type = str(data.get("model_type", ""))
    if model_type.startswith(SURGERY_MODEL_TYPE_PREFIX) or data.get("surgery"):
        raise SurgeryError(f"{folder} has sublayers removed inside its blocks, whose stand-ins only surgery's text classes "
                           "build: cut whole blocks for a graft (--granularity block, or ids such as L5)")
    if model_type != family:
        raise SurgeryError(f"{folder} is a '{model_type or 'unknown'}' checkpoint, but the source's text decoder is "
                           f"'{family}': graft the decoder cut from that source's `surgery extract-text` output")
    if quantization_method(data):
        raise SurgeryError(f"{folder} is stored {quantization_method(data)}-quantised: graft full-precision weights "
                           "(export the decoder without --quantize)")


def _config(folder: Path, trust_remote_code: bool) -> Any:
    """A folder's config as transformers reads it, or one line naming the file."""
    from transformers import AutoConfig

    from surgery.arch import config_error

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise config_error(folder, error) from None


def _changed(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """Config keys whose values differ (missing on one side counts as None), bookkeeping aside."""
    old, new = before.to_dict(), after.to_dict()
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in BOOKKEEPING_KEYS and old.get(key) != new.get(key)}


def _decoder_tensors(folder: Path, config: Any, weights: SafetensorsFolder, mtp: dict[str, str]) -> dict[str, TensorInfo]:
    """The decoder's tensors, after checking they are those its config implies (and its MTP modules)."""
    import torch

    from surgery.layerwise import checkpoint_shapes, skeleton

    expected = checkpoint_shapes(skeleton(config, torch.float32))
    expected.update({name: weights.info[name].shape for name in mtp})
    odd = first_difference({name: info.shape for name, info in weights.info.items()}, expected)
    if odd is not None:
        raise SurgeryError(f"{folder}'s tensors are not those its config.json implies ({odd}): export the decoder again")
    return dict(weights.info)


def _placed(folder: Path, extracted: TextDecoder, names: dict[str, TensorInfo]) -> tuple[dict[str, tuple[Path, TensorInfo]], dict[str, str]]:
    """Each decoder tensor under the name the source gives its language model's: the layout extract-text found."""
    prefixes = _language_model_prefixes(extracted)
    tensors, decoder_names = {}, {}
    for name, info in names.items():
        if extracted.fused_experts and PER_EXPERT.match(name):
            continue  # (fused back: _fused_back)
        if name in extracted.mtp:
            written = extracted.tensors[name].name
        else:
            ours = next((p for p in prefixes if name.startswith(p)), None)
            if ours is None:
                raise SurgeryError(f"{folder} holds {name}, which the source's text decoder has no place for: "
                                   "graft the decoder cut from that source's `surgery extract-text` output")
            written = prefixes[ours] + name[len(ours):]
        tensors[written] = (Path(folder), info)
        decoder_names[written] = name
    return tensors, decoder_names


def _language_model_prefixes(extracted: TextDecoder) -> dict[str, str]:
    """Where the source keeps what the text checkpoint names `model.` and `lm_head.`, as extract-text found it."""
    prefixes = {}
    for ours in ("model.", "lm_head."):
        probe = next((name for name in extracted.tensors if name.startswith(ours) and name not in extracted.mtp
                      and name not in extracted.computed), None)  # (a tensor copied under its own name)
        if probe is not None:
            where = extracted.tensors[probe].name
            prefixes[ours] = where[: len(where) - len(probe) + len(ours)]
    return prefixes


def _fused_back(folder: Path, extracted: TextDecoder, names: dict[str, TensorInfo],
                tensors: dict[str, tuple[Path, TensorInfo]]) -> tuple[dict[str, Callable[[], Any]], set[str]]:
    """The decoder's per-expert tensors fused a layer at a time as the source stores its experts
    (Qwen3-VL-MoE's), added to `tensors` under the source's names: name written -> how to make it,
    and the decoder's names they are made from."""
    parts = {name: match.group(1) for name in names if (match := PER_EXPERT.match(name)) and extracted.fused_experts}
    if not parts:
        return {}, set()
    prefix = _language_model_prefixes(extracted)["model."]
    computed = {}
    for layer in sorted(set(parts.values())):
        for kind, shape in extracted.fused_experts.items():
            written = f"{prefix}{layer.removeprefix('model.')}.{kind}"
            part = names[next(name for name, of in parts.items() if of == layer)]
            size = part.nbytes // math.prod(part.shape) * math.prod(shape)
            tensors[written] = (Path(folder), TensorInfo(written, part.dtype, shape, size))
            computed[written] = partial(fuse_experts, partial(_read_tensor, names), layer, kind, shape[0], extracted.experts_transposed)
    return computed, set(parts)


def _read_tensor(names: dict[str, TensorInfo], name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(names[name].file), "pt") as handle:
        return handle.get_tensor(name)


def export_graft(graft: Graft, tokenizer: Any, out: Path, *, record: dict[str, Any], max_shard_size: int, force: bool = False,
                 protected: list[Path] = (), extra_files: dict[str, str] | None = None, unpublished: tuple[str, ...] = (),
                 device: str = "cpu", trust_remote_code: bool = False) -> ExportResult:
    """Write the grafted checkpoint to `out`, checked as the module docstring says, atomically."""
    from surgery.export.checkpoint import add_files
    from surgery.files import check_free_space, check_output_folder, staged_folder

    out = check_output_folder(out, force=force, protected=list(protected))
    check_free_space(out, graft.nbytes, "the checkpoint")
    with staged_folder(out) as staging:
        digests = _write(graft, staging, max_shard_size)
        add_files(staging, None, extra_files or {})
        verified = _check_folder(graft, staging, tokenizer, device, trust_remote_code)
        manifest = write_manifest(staging, {**record, "layout": "hf", "unpublished": list(unpublished)}, verified, digests)
    return ExportResult(out, verified["max_abs_logit_diff"], "transformers", manifest)


def _write(graft: Graft, folder: Path, max_shard_size: int) -> dict[str, str]:
    """The shards (check a), the multimodal config, and the source's processor, tokenizer and other files."""
    from surgery.shards import tensor_bytes, write_checkpoint_shards

    readers = {graft.source: SafetensorsFolder(graft.source), graft.decoder: SafetensorsFolder(graft.decoder)}
    planned = {name: TensorInfo(name, info.dtype, info.shape, info.nbytes) for name, (_, info) in graft.tensors.items()}

    def chunks(info: TensorInfo) -> Any:
        if info.name in graft.computed:
            return [tensor_bytes(graft.computed[info.name]())]
        where, held = graft.tensors[info.name]
        return readers[where].read(held.name)

    try:
        digests = write_checkpoint_shards(folder, planned, chunks, max_shard_size=max_shard_size, parameters=graft.parameters,
                                          lies_in=lambda info: None if info.name in graft.computed else graft.tensors[info.name][1],
                                          label="writing shards")
    finally:
        for reader in readers.values():
            reader.close()
    for file in sorted(graft.source.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.name not in NOT_CARRIED and not file.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(file, folder / file.name)
    graft.config.save_pretrained(folder)
    keep_released_words(folder, graft.source)
    _drop_flat_text_settings(folder, graft)
    return digests


def _drop_flat_text_settings(folder: Path, graft: Graft) -> None:
    """A source released with its text settings at the top of config.json (arch.FLAT_TEXT_CONFIGS) is
    written with them in text_config, where transformers reads them. Some configs (dots3 Note's) also
    keep every flat key at the top, where it would still name the uncut decoder (num_hidden_layers,
    layer_types) to a reader of the released layout: those go, save the multimodal config's own."""
    import json

    if "text_config" in read_config(graft.source):
        return
    path = folder / "config.json"
    data = json.loads(path.read_text())
    own = set(type(graft.config)().to_dict())
    stale = [key for key in data.get("text_config", {}) if key in data and key not in own]
    if stale:
        path.write_text(json.dumps({key: value for key, value in data.items() if key not in stale}, indent=2, sort_keys=True) + "\n")


def _as_decoders(name: str) -> str:
    """A multimodal model's name for a decoder tensor in the text decoder's words (model.language_model.layers.3.x:
    model.layers.3.x; LANGUAGE_MODEL_NAMES, as extract-text reads them), where its MTP modules are found:
    transformers skips them only under the released block number (dots3 Note's model.layers.46.), and they
    are carried, not unexpected (loading.check_loading_info says so for text-only checkpoints)."""
    return next((ours + name[len(where):] for ours, places in LANGUAGE_MODEL_NAMES for where in places if name.startswith(where)),
                name)


def _check_folder(graft: Graft, folder: Path, tokenizer: Any, device: str, trust_remote_code: bool) -> dict[str, Any]:
    """Checks (b) and (c) of the module docstring: the manifest's `verified` record."""
    import torch

    from surgery.console import console, task
    from surgery.forward import verification_ids
    from surgery.layerwise import LayerwiseModel, checkpoint_shapes, skeleton
    from surgery.memory import available_memory, fits_in_memory

    text = as_text_family(_config(folder, trust_remote_code).get_text_config(), base_model_type(graft.text_config))
    text.tie_word_embeddings = graft.text_config.tie_word_embeddings
    expected = {name: shape for name, shape in checkpoint_shapes(skeleton(text, torch.float32)).items() if name not in graft.fused_parts}
    expected.update({**graft.mtp, **{name: graft.tensors[name][1].shape for name in graft.computed}})  # (fused: in the source's names)
    expected.update({name: info.shape for name, (where, info) in graft.tensors.items() if where == graft.source})
    check_names_written({graft.decoder_names.get(name, name): info.shape
                         for name, info in SafetensorsFolder(folder, strict=True).info.items()}, expected)
    verified = {"max_abs_logit_diff": None, "loader": "transformers", "method": "copied, names and shapes checked",
                "prompt": VERIFY_PROMPT, "cached_generation": False, "tensors_checked": len(graft.tensors)}
    if not fits_in_memory(graft.nbytes, available_memory(device)):
        console.print("the grafted model does not fit in memory: its logits were not compared with the decoder's "
                      "(every tensor was checked as copied)")
        return verified
    decoder = LayerwiseModel(graft.decoder, device=device)
    try:
        loaded = multimodal_model(folder, decoder.dtype, device, trust_remote_code)
        if loaded is None:
            console.print("transformers has no class that runs the grafted model on text: its logits were not compared "
                          "with the decoder's (every tensor was checked as copied)")
            return verified
        model, info = loaded
        unexpected = {_as_decoders(name): name for name in info.get("unexpected_keys", ())}
        carried = set(mtp_modules(unexpected, read_config(graft.decoder)).tensors.values())
        odd = sorted(info.get("missing_keys", ())) + sorted(name for ours, name in unexpected.items() if ours not in carried)
        if odd:
            raise SurgeryError(f"export check failed: transformers loads the grafted model without {odd[0]}; nothing was written")
        ids = verification_ids(tokenizer, decoder.config.vocab_size)
        with task("comparing the grafted model with the decoder on text"), torch.no_grad():
            want = decoder.forward(ids)
            got = model(input_ids=ids.to(device), use_cache=False).logits.float().to(want.device)
    finally:
        decoder.close()
    diff = logit_diff_within_tolerance(want, got, decoder.dtype, "the grafted model's logits differ from the decoder's")
    return {**verified, "max_abs_logit_diff": diff, "method": "copied, loaded, compared with the decoder"}
