"""The Nemotron-NAS (DeciLM) layout: a sublayer-pruned Llama-family model written as NVIDIA's
heterogeneous-block checkpoint, which vLLM serves natively (`DeciLMForCausalLM`, with
--trust-remote-code for the config class) and transformers loads with `trust_remote_code=True`.

What goes into config.json follows vLLM's reader (vllm/model_executor/models/nemotron_nas.py,
see docs/serving.md for the field-by-field account): one `block_configs` entry per kept block, a
removed sublayer is `no_op` and has no weights (not even its norm). Blocks with both sublayers
removed were already deleted by the cut. Two things vLLM and llama.cpp cannot take are written
so that the model computes exactly the same:

- a kept FFN whose width is not a multiple of 256 is zero-padded to the next one, because
  `ffn_mult` (the key NVIDIA's config class and llama.cpp's converter require) only describes
  such widths; the extra channels compute silu(0) * 0 = 0 through zero columns;
- block 0 without attention gets a null attention (q, k, v and o all zeros, its norm ones): vLLM's
  first layer would unpack a missing residual and llama.cpp would take head_dim 0 from it.

The config and model classes are `surgery.hf_modeling.decilm_classes`, shipped as `modeling_decilm.py`.
Writing only: `surgery.export.checkpoint` stages, verifies and seals the folder.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.arch import base_model_type
from surgery.errors import SurgeryError

LAYOUT = "nemotron-nas"
FAMILIES = ("llama", "mistral")  # Llama's block exactly: q/k/v/o and gate/up/down, RMS pre-norms, SiLU
MODELING_FILE = "modeling_decilm.py"
FFN_MULTIPLE = 256  # DeciLM's ffn_mult only describes widths that are multiples of this


@dataclass(frozen=True)
class Block:
    """One kept block of the export: which sublayers it keeps, and whether its attention is the null one."""

    attention: bool
    ffn: bool
    null_attention: bool = False


def check_source(config: dict[str, Any]) -> None:
    """One line saying why a model cannot be written as Nemotron-NAS, before anything loads."""
    family = base_model_type(config)
    if family == LAYOUT:
        raise SurgeryError("this model is already a nemotron-nas export: cut the original checkpoint instead")
    if family not in FAMILIES:
        raise SurgeryError(f"--format nemotron-nas writes Llama's block (q/k/v/o and gate/up/down projections, RMS "
                           f"pre-norms) and {family or 'this model'}'s block is not one: use --format hf (the default)")
    from surgery.arch import has_sliding_window

    if has_sliding_window(config):
        raise SurgeryError(f"this {family} model uses sliding-window attention, which Nemotron-NAS cannot describe: "
                           "use --format hf (the default)")
    if config.get("hidden_act", "silu") != "silu":
        raise SurgeryError(f"this model's FFN uses {config['hidden_act']}; Nemotron-NAS runtimes use SiLU only: use --format hf")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim") not in (None, hidden // heads):
        raise SurgeryError(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads ({hidden // heads}), which "
                           "NVIDIA's DeciLM code and llama.cpp's converter assume: use --format hf (surgery gguf writes such a cut as deci)")


def check_export_source(folder: Path, layout: str) -> None:
    """A source this layout cannot write, or a Nemotron-NAS export given to cut again, fails before
    the model loads (cut and prune)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if layout == LAYOUT or config.get("model_type") == LAYOUT:
        check_source(config)


def ffn_mult(width: int, hidden_size: int) -> float:
    """The `ffn_mult` that vLLM's, NVIDIA's and llama.cpp's readers turn back into exactly `width`."""
    from types import SimpleNamespace

    from surgery.hf_modeling import ffn_width

    mult = round(1.5 * width / hidden_size, 6)
    if ffn_width(SimpleNamespace(ffn_mult=mult), hidden_size) != width:
        raise SurgeryError(f"no ffn_mult gives an FFN width of {width} at hidden size {hidden_size}: use --format hf, and "
                           "please report this")
    return mult


def padded_width(width: int) -> int:
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def kept_blocks(model: Any) -> list[Block]:
    """The export's blocks from the cut model's stand-ins; a first block without attention gets the null one."""
    from surgery.cut import removed_sublayers

    removed = {(u.layer, u.kind) for u in removed_sublayers(model)}
    blocks = [Block((i, "attn") not in removed, (i, "mlp") not in removed) for i in range(model.config.num_hidden_layers)]
    if not blocks[0].attention:
        blocks[0] = Block(True, blocks[0].ffn, null_attention=True)
    return blocks


def block_config(block: Block, config: Any, width: int) -> dict[str, Any]:
    """One block_configs entry with every key NVIDIA's v1 block_config.py writes (vLLM reads no_op,
    n_heads_in_group and ffn_mult; the rest keep NVIDIA's dataclasses and llama.cpp's converter content)."""
    attention = {"no_op": not block.attention, "replace_with_linear": False,
                 "n_heads_in_group": config.num_attention_heads // config.num_key_value_heads if block.attention else None,
                 "sparsify": None, "window_length": None, "num_sink_tokens": None, "unshifted_sink": False,
                 "use_prefill_window_in_sink_attention": False}
    ffn = {"no_op": not block.ffn, "replace_with_linear": False,
           "ffn_mult": ffn_mult(width, config.hidden_size) if block.ffn else None, "sparsify": None}
    return {"attention": attention, "ffn": ffn}


def write_folder(model: Any, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Write the cut Llama-family `model` into `folder` as Nemotron-NAS; returns what the manifest records."""
    from huggingface_hub import save_torch_state_dict

    config = model.config
    check_source(config.to_dict())
    blocks = kept_blocks(model)
    width = padded_width(config.intermediate_size)
    state, added = _state_dict(model, blocks, width)
    save_torch_state_dict(state, folder, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config_json(config, blocks, width, model.dtype), indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MODELING_FILE).write_text(modeling_file_text())
    return {"layout": LAYOUT, "ffn_width": width,
            "ffn_zero_padded_from": config.intermediate_size if width != config.intermediate_size else None,
            "null_attention_blocks": [i for i, b in enumerate(blocks) if b.null_attention], "added_parameters": added}


def _state_dict(model: Any, blocks: list[Block], width: int) -> tuple[dict[str, Any], int]:
    """The model's weights under vLLM's names, FFNs zero-padded to `width` and null attentions added;
    returns them with the number of parameters added."""
    config = model.config
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    added = 0
    for index, block in enumerate(blocks):
        prefix = f"model.layers.{index}."
        if block.ffn and width != config.intermediate_size:
            added += _pad_ffn(state, prefix + "mlp.", width)
        if block.null_attention:
            added += _null_attention(state, prefix, config, model.dtype)
    return state, added


def _pad_ffn(state: dict[str, Any], prefix: str, width: int) -> int:
    """Zero rows for gate and up (and their biases), zero columns for down: each new channel is silu(0) * 0 = 0."""
    import torch.nn.functional as F

    before = sum(state[k].numel() for k in state if k.startswith(prefix))
    for name in ("gate_proj", "up_proj"):
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            if key in state:
                tensor = state[key]
                pad = (0, 0) * (tensor.dim() - 1) + (0, width - tensor.shape[0])
                state[key] = F.pad(tensor, pad)
    down = f"{prefix}down_proj.weight"
    state[down] = F.pad(state[down], (0, width - state[down].shape[1]))
    return sum(state[k].numel() for k in state if k.startswith(prefix)) - before


def _null_attention(state: dict[str, Any], prefix: str, config: Any, dtype: Any) -> int:
    """An attention whose every projection is zero adds exactly nothing, and gives runtimes a first layer with heads."""
    import torch

    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    rows = {"q_proj": config.num_attention_heads * head_dim, "k_proj": config.num_key_value_heads * head_dim,
            "v_proj": config.num_key_value_heads * head_dim, "o_proj": hidden}
    new = {f"{prefix}input_layernorm.weight": torch.ones(hidden, dtype=dtype)}
    for name, out in rows.items():
        new[f"{prefix}self_attn.{name}.weight"] = torch.zeros(out, hidden if name != "o_proj" else rows["q_proj"], dtype=dtype)
        if getattr(config, "attention_bias", False):
            new[f"{prefix}self_attn.{name}.bias"] = torch.zeros(out, dtype=dtype)
    state.update(new)
    return sum(t.numel() for t in new.values())


# Copied from the source config as they are; the layout's own keys are written by _config_json.
_KEPT_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
              "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp",
              "tie_word_embeddings", "attention_bias", "attention_dropout", "mlp_bias")


def _config_json(config: Any, blocks: list[Block], width: int, dtype: Any) -> dict[str, Any]:
    """config.json as NVIDIA writes it (legacy rope_theta / rope_scaling keys, which transformers 5,
    vLLM and llama.cpp's converter all read), written by hand: save_pretrained would rename them."""
    import transformers

    from surgery.arch import rope_settings
    from surgery.hf_modeling import decilm_classes

    source = config.to_dict()
    theta, scaling = rope_settings(source)
    config_class, model_class = decilm_classes()
    data = {key: source[key] for key in _KEPT_KEYS if key in source}
    data.update({
        "architectures": [model_class.__name__],
        "model_type": LAYOUT,
        "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.{config_class.__name__}",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_class.__name__}"},
        "num_hidden_layers": len(blocks),
        "intermediate_size": width,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "rope_theta": theta,
        "rope_scaling": scaling if scaling and scaling.get("rope_type", "default") != "default" else None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
        "block_configs": [block_config(block, config, width) for block in blocks],
    })
    return data


def modeling_file_text() -> str:
    """surgery.hf_modeling verbatim, with the two classes auto_map names bound at module level."""
    from surgery import hf_modeling

    footer = ("\n\n# The classes named by this checkpoint's auto_map (and by their own names, which a model loaded\n"
              "# from here and saved again with save_pretrained writes into its auto_map).\n"
              "DeciLMConfig, DeciLMForCausalLM = decilm_classes()\n")
    return inspect.getsource(hf_modeling) + footer
