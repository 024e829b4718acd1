"""Stand-ins for removed sublayers, and the model classes of sublayer-pruned checkpoints.

This file is copied verbatim into every checkpoint that has attention-only or FFN-only removals
(as `modeling_surgery.py`, named by `auto_map` in its config.json), so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it without surgery
installed. It therefore imports nothing but torch and transformers. Inside the package the same
stand-ins serve the non-destructive ablation used while scoring, so a scored removal and an
exported one run exactly the same code.

The checkpoint's config carries a `surgery` entry:
    {"base_model_type": "llama", "layers": "model.layers",
     "removed": {"attn": [3], "mlp": [7]},          # block indices in this checkpoint
     "modules": {"attn": ["self_attn", "input_layernorm"], "mlp": ["mlp", "post_attention_layernorm"]},
     "mlp_extra_outputs": 0,                           # values the FFN returns beside its output
     "extra_outputs_flag": None,                       # (only in blocks where this attribute is true)
     "linear_attention": "linear_attn",                # hybrid families: the attention's place in some blocks
     "linear_norms": {"attn": [...], "mlp": [...]},    # (their norms, where they differ from the others')
     "linear_block_marker": ["block_type", "linear_attention"],  # (which blocks, where both have one name)
     "single_mixer": {"attribute": "block_type", "kinds": {"moe": "mlp", ...}},  # (one mixer a block: its kind)
     "companions": {"mlp": ["block_sparse_moe"]},      # modules beside a sublayer's, their outputs added to its
     "companion_outputs": {"router": 2},               # (values one returns after its first: None from its stand-in)
     "carried": ["prev_topk_indices"],                 # what an attention's stand-in passes on (GLM-5's selection)
     "attention_adds_residual": True,                  # (BLOOM: the attention's stand-in returns the stream it got)
     "returns_state": True}                            # (xLSTM: ... and the recurrent state it got)

The same file, shipped as `modeling_decilm.py`, is the configuration and model code of the
Nemotron-NAS (DeciLM) export (`decilm_classes`): NVIDIA's own files do not load under
transformers 5, and vLLM reads the layout through whatever config class `auto_map` names.
"""

from __future__ import annotations

import torch
from torch import nn

SURGERY_MODEL_TYPE_PREFIX = "surgery_"


def cache_slot(cache, layer_idx):
    """Layer `layer_idx`'s slot of a cache that keeps one per layer (`cache.layers`); None for a cache
    that does not, or no such layer."""
    slots = getattr(cache, "layers", None)
    return slots[layer_idx] if slots is not None and layer_idx is not None and layer_idx < len(slots) else None


def keep_cache_length(past_key_values, layer_idx, hidden_states: torch.Tensor) -> None:
    """Write a placeholder of the right length into this layer's KV-cache slot.

    Transformers reads the cache length from the first layer's slot (and sliding-window layers
    count tokens on update). A removed attention that never writes there makes the cache report
    a wrong length, which silently corrupts positions and masks in chunked prefill and padded
    batched generation. One value per token (shape B x 1 x T x 1) keeps the length right at a
    negligible cost.
    """
    if past_key_values is None or layer_idx is None:
        return
    slot = cache_slot(past_key_values, layer_idx)
    if slot is not None and type(slot).__name__ == "DummyLayer":
        return  # (a slot that stores nothing: Gemma 4 E2B's layers that attend to another's keys and values)
    if slot is not None and not hasattr(slot, "update"):
        return  # (a linear-attention slot, which keeps no keys: RecurrentGemma's recurrences keep their state themselves)
    batch, length = hidden_states.shape[:2]
    placeholder = hidden_states.new_zeros(batch, 1, length, 1)
    past_key_values.update(placeholder, placeholder, layer_idx)


class RemovedAttention(nn.Module):
    """An attention sublayer that adds nothing to the residual stream. `carried`: the arguments the
    family's attention returns after its output and weights (GLM-5: the keys an indexer selected),
    which the stand-in passes on as it got them."""

    def __init__(self, layer_idx: int | None = None, carried: tuple[str, ...] = (), adds_residual: bool = False,
                 returns_state: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.carried = tuple(carried)
        self.adds_residual = adds_residual  # (BLOOM's attention adds the stream, its second argument, itself)
        self.returns_state = returns_state  # (xLSTM's mLSTM layer takes its recurrent state second and returns it second)

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, layer_past=None, **kwargs):
        if self.returns_state:
            return torch.zeros_like(hidden_states), args[0] if args else kwargs.get("state")
        # transformers 5.25 calls the cache `cache`; earlier releases `past_key_values` (GPT-NeoX: `layer_past`)
        found = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        keep_cache_length(found, self.layer_idx, hidden_states)
        output = kwargs.get("residual", args[0] if args else None) if self.adds_residual else torch.zeros_like(hidden_states)
        return output, None, *(kwargs.get(name) for name in self.carried)


class RemovedMLP(nn.Module):
    """An FFN/MoE sublayer that adds nothing to the residual stream. `extra_outputs`: how many
    values the family's FFN returns after its output (gpt-oss: the router scores), as None."""

    def __init__(self, extra_outputs: int = 0) -> None:
        super().__init__()
        self.extra_outputs = extra_outputs

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, *[None] * self.extra_outputs) if self.extra_outputs else zeros


class RemovedNorm(nn.Identity):
    """A norm that only served a removed sublayer (its input is ignored, or its input is zero)."""


class RemovedLinearAttention(nn.Module):
    """A hybrid family's linear attention (Gated DeltaNet, LFM2's short convolution) that adds nothing: it returns
    its output alone, as the module it replaces does, and keeps no recurrent state, which no other
    block reads. It does count the tokens in its cache slot, as the module it replaces does: from
    transformers 5.25 the cache reads its length from the first layer's slot, which is a linear
    one in most hybrids (Qwen3.5's layer 0)."""

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs) -> torch.Tensor:
        found = cache if cache is not None else past_key_values
        if hasattr(cache_slot(found, self.layer_idx), "cumulative_length_linear"):  # (a slot that counts linear-attention tokens)
            batch, length = hidden_states.shape[:2]
            found.update_conv_state(hidden_states.new_zeros(batch, 1, length), self.layer_idx, conv_kernel_size=1)
        return torch.zeros_like(hidden_states)


STAND_INS = (RemovedAttention, RemovedMLP, RemovedNorm, RemovedLinearAttention)


def sublayer_names(layer: nn.Module, kind: str, spec: dict) -> list[str]:
    """The module names in decoder block `layer` that make up sublayer `kind`: the spec's, with a
    hybrid block's linear attention where the block has it instead of the attention (some families
    set the other one to None), and such a block's own norms where the family places them otherwise."""
    single = spec.get("single_mixer")
    if single is not None and single["kinds"].get(_mixer_type(layer, single)) != kind:
        return []  # this block's one mixer is the other kind: it has no such sublayer
    names = [spec["modules"][kind][0], *(name for name in spec["modules"][kind][1:] if has_module(layer, name))]  # (a block may lack some)
    if is_linear_block(layer, spec):
        if kind == "attn":
            names[0] = spec["linear_attention"]
        norms = spec.get("linear_norms", {}).get(kind)
        if norms is not None:
            names = names[:1 + len(spec.get("companions", {}).get(kind, []))] + list(norms)
    return names


def _mixer_type(layer: nn.Module, single: dict) -> str | None:
    """A single-mixer block's type: its attribute's value, or the family's one type where its blocks
    have no attribute (Mamba's)."""
    return getattr(layer, single["attribute"], None) if single["attribute"] else next(iter(single["kinds"]))


def is_linear_block(layer: nn.Module, spec: dict) -> bool:
    """Whether a hybrid's block holds the linear attention: as its marker attribute says where both
    kinds share one name, else as the module it has (some families set the other one to None)."""
    linear = spec.get("linear_attention")
    if not linear:
        return False
    if "linear_block_marker" in spec:
        attribute, value = spec["linear_block_marker"]
        return getattr(layer, attribute, None) == value
    return get_module(layer, spec["modules"]["attn"][0], None) is None and get_module(layer, linear, None) is not None


def remove_sublayer(layer: nn.Module, kind: str, layer_idx: int, spec: dict) -> dict[str, nn.Module]:
    """Replace sublayer `kind` of one decoder block by stand-ins; return the originals.

    `spec` is what a checkpoint's `surgery` entry records beside the removals: the module names of
    each kind (the sublayer itself, then the norms that only serve it), a hybrid family's
    `linear_attention`, the arguments an attention's stand-in passes on (`carried`), and `mlp_extra_outputs`, the values the FFN's stand-in returns beside its
    output in blocks where the attribute `extra_outputs_flag` (if given) is true.
    """
    names = sublayer_names(layer, kind, spec)
    if not names:
        return {}  # a sublayer the block does not have (a single-mixer block's other kind)
    originals = {name: get_module(layer, name) for name in names}
    slot = getattr(originals[names[0]], "layer_idx", getattr(originals[names[0]], "layer_id", layer_idx))  # its cache slot (GPT-Neo's name)
    if kind == "mlp":
        flag = spec.get("extra_outputs_flag")
        stand_in = RemovedMLP(spec.get("mlp_extra_outputs", 0) if flag is None or getattr(layer, flag, False) else 0)
    elif is_linear_block(layer, spec):
        stand_in = RemovedLinearAttention(slot)
    else:
        stand_in = RemovedAttention(slot,
                                    spec.get("carried", ()), spec.get("attention_adds_residual", False),
                                    spec.get("returns_state", False))
    _put(layer, names[0], stand_in, originals[names[0]])
    companions = spec.get("companions", {}).get(kind, [])
    for name in names[1:]:
        if name not in companions:
            if "single_mixer" not in spec:  # (a single-mixer block reads its norm's dtype; the stand-in ignores its output)
                set_module(layer, name, RemovedNorm())
        elif originals[name] is not None:  # a block without experts keeps its None
            extra = spec.get("companion_outputs", {}).get(name, 0)
            _put(layer, name, RemovedMLP(extra) if kind == "mlp" else RemovedLinearAttention(), originals[name])
    return originals


def _put(layer: nn.Module, name: str, stand_in: nn.Module, original: nn.Module) -> None:
    """Put `stand_in` where `original` was, with the original's non-persistent buffers: the family's
    weight-init code fills them by name in every block as a model loads (Falcon-H1's mup_vector),
    and a stand-in without them would stop it halfway, leaving later blocks' buffers unset."""
    for buffer in sorted(getattr(original, "_non_persistent_buffers_set", ())):
        stand_in.register_buffer(buffer, getattr(original, buffer), persistent=False)
    set_module(layer, name, stand_in)


_REQUIRED = object()


def get_module(root: nn.Module, dotted: str, default=_REQUIRED):
    """The module at a dotted path below `root` (DBRX keeps its attention at norm_attn_norm.attn);
    `default` where a step is missing, if given."""
    node = root
    for name in dotted.split("."):
        if not hasattr(node, name):
            if default is _REQUIRED:
                raise AttributeError(f"'{type(root).__name__}' object has no attribute '{dotted}'")
            return default
        node = getattr(node, name)
    return node


def has_module(root: nn.Module, dotted: str) -> bool:
    missing = object()
    return get_module(root, dotted, missing) is not missing


def set_module(root: nn.Module, dotted: str, module) -> None:
    owner, _, name = dotted.rpartition(".")
    setattr(get_module(root, owner) if owner else root, name, module)


def apply_removals(model: nn.Module, spec: dict) -> None:
    """Put stand-ins where the checkpoint's `surgery` entry says sublayers were removed."""
    layers = get_module(model, spec["layers"])
    for kind, indices in spec["removed"].items():
        for index in indices:
            remove_sublayer(layers[index], kind, index, spec)


_CLASSES: dict[str, tuple[type, type]] = {}


def surgery_classes(base_model_type: str) -> tuple[type, type]:
    """(config class, model class) for sublayer-pruned checkpoints of one family.

    They subclass the family's own classes; the model only swaps in stand-ins after building
    itself, so the weights, the cache and generation are the family's own code. The model type
    is `surgery_<family>`: plain `from_pretrained` without this code refuses the checkpoint
    instead of loading random weights where sublayers were removed.
    """
    if base_model_type not in _CLASSES:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        base_config = CONFIG_MAPPING[base_model_type]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        config_class = type(
            f"Surgery{base_config.__name__}",
            (base_config,),
            {"model_type": SURGERY_MODEL_TYPE_PREFIX + base_model_type, "__module__": __name__},
        )

        def __init__(self, config, *args, **kwargs):
            base_model.__init__(self, config, *args, **kwargs)
            apply_removals(self, config.surgery)

        def is_custom_code(cls) -> bool:
            # transformers skips the weight init of composite modules in code defined outside it (Falcon-H1
            # fills every block's mup_vector buffer from its model's init); the weights here are all the family's
            return False

        model_class = type(
            f"Surgery{base_model.__name__}",
            (base_model,),
            {"config_class": config_class, "__init__": __init__, "__module__": __name__,
             "is_custom_code": classmethod(is_custom_code)},
        )
        _share_weight_conversions(base_model_type, config_class.model_type)
        _share_weight_conversions(base_model.__name__, model_class.__name__)  # (GPT-NeoX's are its class's)
        _CLASSES[base_model_type] = (config_class, model_class)
    return _CLASSES[base_model_type]


def _share_weight_conversions(base_model_type: str, model_type: str) -> None:
    """Give the surgery model type (or class) the family's (or its class's) checkpoint key conversions
    (MoE experts are stored per expert on disk and fused in memory; GPT-NeoX's output layer is stored
    as embed_out); without them those weights would not load."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # transformers without conversions: keys are stored as they are
        return
    mapping = conversion_mapping.get_checkpoint_conversion_mapping(base_model_type)
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def register_classes(config_dict: dict) -> None:
    """Let plain `AutoModelForCausalLM` load a sublayer-pruned checkpoint (ours or a Nemotron-NAS
    one) without remote code (inside surgery; a checkpoint's users load it through its auto_map)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.get("model_type", "")
    if model_type == NEMOTRON_MODEL_TYPE:
        config_class, model_class = decilm_classes()
    elif model_type.startswith(SURGERY_MODEL_TYPE_PREFIX):
        config_class, model_class = surgery_classes(model_type[len(SURGERY_MODEL_TYPE_PREFIX):])
    else:
        return
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


# ------------------------------------------------------------------ Nemotron-NAS (DeciLM)

NEMOTRON_MODEL_TYPE = "nemotron-nas"
# A Llama block's sublayers, each with its pre-norm (remove_sublayer's spec)
DECILM_STAND_INS = {"modules": {"attn": ["self_attn", "input_layernorm"], "mlp": ["mlp", "post_attention_layernorm"]}}


def find_multiple(n: int, k: int) -> int:
    """n rounded up to a multiple of k (DeciLM's `_find_multiple`)."""
    return n if n % k == 0 else n + k - n % k


def ffn_width(ffn, hidden_size: int) -> int:
    """A kept FFN's width as vLLM's nemotron_nas.py reads it: from `ffn_mult` whenever the block
    config has that key (2/3 of mult x hidden, rounded up to a multiple of 256), else `intermediate_size`."""
    if hasattr(ffn, "ffn_mult"):
        return find_multiple(int(2 * ffn.ffn_mult * hidden_size / 3), 256)
    return int(ffn.intermediate_size)


def block_namespace(block):
    """A block_configs entry with attribute access (`block.attention.no_op`), as vLLM reads it."""
    from types import SimpleNamespace

    if isinstance(block, dict):
        return SimpleNamespace(attention=SimpleNamespace(**block["attention"]), ffn=SimpleNamespace(**block["ffn"]))
    return block


def apply_block_configs(model: nn.Module, config) -> None:
    """Make each decoder block what its block config says: a no-op sublayer becomes the stand-in
    (its norm too), a kept attention gets its own KV-head count, a kept FFN its own width."""
    layers = model.model.layers
    blocks = config.block_configs
    if blocks is None or len(blocks) != len(layers):
        raise ValueError(f"block_configs has {0 if blocks is None else len(blocks)} entries for {len(layers)} layers")
    for index, (layer, block) in enumerate(zip(layers, blocks)):
        _shape_attention(layer, block.attention, config, index)
        _shape_ffn(layer, block.ffn, config, index)


def _shape_attention(layer: nn.Module, attention, config, index: int) -> None:
    if attention.no_op:
        remove_sublayer(layer, "attn", index, DECILM_STAND_INS)
        return
    if getattr(attention, "replace_with_linear", False) or attention.n_heads_in_group is None:
        raise ValueError(f"block {index}: linear attention (replace_with_linear) is not supported by this code")
    module = layer.self_attn
    kv_heads = config.num_attention_heads // attention.n_heads_in_group
    if kv_heads * module.head_dim != module.k_proj.out_features:
        module.num_key_value_groups = attention.n_heads_in_group
        module.k_proj = nn.Linear(config.hidden_size, kv_heads * module.head_dim, bias=config.attention_bias)
        module.v_proj = nn.Linear(config.hidden_size, kv_heads * module.head_dim, bias=config.attention_bias)


def _shape_ffn(layer: nn.Module, ffn, config, index: int) -> None:
    if ffn.no_op:
        remove_sublayer(layer, "mlp", index, DECILM_STAND_INS)
        return
    if getattr(ffn, "replace_with_linear", False):
        raise ValueError(f"block {index}: a linear FFN (replace_with_linear) is not supported by this code")
    module = layer.mlp
    width = ffn_width(ffn, config.hidden_size)
    if width != module.intermediate_size:
        module.intermediate_size = width
        module.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        module.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        module.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)


def decilm_classes() -> tuple[type, type]:
    """(DeciLMConfig, DeciLMForCausalLM) for model type `nemotron-nas`, written for transformers 5.

    The config is Llama's plus `block_configs` (objects with attribute access, as vLLM's reader
    needs; plain dicts again in config.json). The model is transformers' own Llama with each block
    shaped by its block config, so the weights, the KV cache and generation are Llama's code; a
    no-op sublayer is the same stand-in the analysis measured and `surgery cut` leaves.
    """
    if NEMOTRON_MODEL_TYPE not in _CLASSES:
        from transformers import LlamaConfig, LlamaForCausalLM

        class DeciLMConfig(LlamaConfig):
            model_type = NEMOTRON_MODEL_TYPE

            def __init__(self, block_configs=None, **kwargs):
                super().__init__(**kwargs)
                self.block_configs = None if block_configs is None else [block_namespace(b) for b in block_configs]

            def to_dict(self):
                data = super().to_dict()
                if self.block_configs is not None:
                    data["block_configs"] = [{"attention": dict(vars(b.attention)), "ffn": dict(vars(b.ffn))}
                                             for b in self.block_configs]
                return data

        class DeciLMForCausalLM(LlamaForCausalLM):
            config_class = DeciLMConfig

            def __init__(self, config):
                super().__init__(config)
                apply_block_configs(self, config)

        for cls in (DeciLMConfig, DeciLMForCausalLM):  # module-level names: pickling (vLLM's workers) and auto_map
            cls.__qualname__ = cls.__name__
        _CLASSES[NEMOTRON_MODEL_TYPE] = (DeciLMConfig, DeciLMForCausalLM)
    return _CLASSES[NEMOTRON_MODEL_TYPE]
