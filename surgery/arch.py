"""Architecture knowledge as data: where each family keeps its layers, attention, FFN/MoE and norms.

A new model family needs one entry in `ARCHITECTURES`, no new code, when its decoder block has
the shape `h = h + f(attn_part(h)); h = h + g(mlp_part(h))`, or the parallel `h = h + f(attn_part(h)) +
g(mlp_part(h))`: name the modules of each part (the sublayer itself and the norms that only serve
it) and the config entries that are per-layer.
Everything else in the package (ablation, cutting, scoring, healing, export) reads this table.
A folder's config.json, the architecture as stored, is read here too (`read_config`): the checks
made before any weight loads start from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.sublayers import KINDS, Sublayer

SURGERY_MODEL_TYPE_PREFIX = "surgery_"


@dataclass(frozen=True)
class StepRule:
    """Layers some runtimes place by a step alone, layer i when (i + 1) % step == 0 (none for 0),
    where transformers reads a list: Llama 4's MoE layers (`moe_layers`; vLLM and SGLang read
    `interleave_moe_layer_step`), a hybrid family's attention blocks (`layer_types`; llama.cpp's
    converter read `full_attention_interval` alone, 4 where the config is silent, until its PR
    #28208 wrote the list as well)."""

    listed: str  # the config list transformers reads
    step: str  # the config key the others read instead
    readers: str  # who they are
    marker: str | None = None  # `listed` is per layer, and marks these layers so (else it lists their indices)

    def layers(self, config: Any) -> list[int]:
        """The layers `config` lists."""
        values = list(getattr(config, self.listed, None) or [])
        return [i for i, value in enumerate(values) if value == self.marker] if self.marker else values


@dataclass(frozen=True)
class PeriodRule:
    """Blocks of one kind a config places by a period and an offset alone, block i when
    i % period == offset, from which transformers derives every per-layer list (Jamba's attention
    blocks, and its MoE blocks, which exist only where `count`, its num_experts, exceeds 1).
    llama.cpp's converter and vLLM read the same two keys, so a cut may rewrite both."""

    period: str
    offset: str
    count: str | None = None

    def values(self, config: Any) -> tuple[int, int] | None:
        """(period, offset) in `config`, None where the rule places nothing apart (a count of 1)."""
        if self.count is not None and (config_value(config, self.count) or 0) <= 1:
            return None
        return config_value(config, self.period), config_value(config, self.offset)

    def after(self, config: Any, kept: list[int]) -> tuple[int, int] | None:
        """The (period, offset) that place the kept blocks of this kind among `kept` (the source's
        period where it still does), None where no rule does; where the rule is moot, the source's."""
        values = self.values(config)
        if values is None:
            return config_value(config, self.period), config_value(config, self.offset)
        period, offset = values
        placed, count = [new for new, old in enumerate(kept) if old % period == offset], len(kept)
        if len(placed) > 1:
            candidates = [(placed[1] - placed[0], placed[0])]
        elif placed:
            candidates = [(period, placed[0]), (max(placed[0] + 1, count - placed[0]), placed[0])]
        else:
            candidates = [(period, period - 1), (count + 1, count)]
        return next(((p, o) for p, o in candidates
                     if 0 <= o < p and [i for i in range(count) if i % p == o] == placed), None)


@dataclass(frozen=True)
class SharedSelection:
    """Layers that reuse the keys an earlier layer's sparse-attention indexer selected (GLM-5.2's
    IndexShare): transformers reads a per-layer list of "full" and "shared" (`listed`), else derives
    it from an "F"/"S" string (`pattern`), else from a frequency and an offset; serving code for
    DeepSeek-V3.2's attention reads the string first, then the frequency. A shared layer reads the selection of the nearest full
    layer before it, which each block hands the next (Architecture.carried), so that full layer's
    attention is a *source* while any of its readers stays."""

    shares = "selected keys"  # what a reader takes from its source, and the config key that says so, in refusals
    marker = 'indexer_types "shared"'
    state = None  # (the selection travels from block to block: Architecture.carried)
    block_reads = False  # a reader reads only through its attention
    first_shared_attribute = None
    listed: str = "indexer_types"
    pattern: str = "index_topk_pattern"
    frequency: str = "index_topk_freq"
    offset: str = "index_skip_topk_offset"
    default_offset: int = 2  # transformers' (config classes and runtimes that read the frequency agree)

    def types(self, config: Any) -> list[str]:
        """Every layer's kind, "full" or "shared", from a config object or config.json's dict, as
        transformers derives it."""
        listed = config_value(config, self.listed)
        if listed:
            return list(listed)
        pattern = config_value(config, self.pattern)
        if pattern is not None:
            return [{"F": "full", "S": "shared"}.get(entry, entry) for entry in pattern]
        frequency = max(config_value(config, self.frequency) or 1, 1)
        offset = config_value(config, self.offset)
        offset = self.default_offset if offset is None else offset
        return ["full" if max(i - offset + 1, 0) % frequency == 0 else "shared"
                for i in range(config_value(config, "num_hidden_layers"))]

    def readers(self, config: Any) -> dict[int, list[int]]:
        """Each source (a full layer some shared layer reads) -> the shared layers that read it."""
        found: dict[int, list[int]] = {}
        source = None
        for index, kind in enumerate(self.types(config)):
            if kind == "full":
                source = index
            elif source is not None:
                found.setdefault(source, []).append(index)
        return found

    def pattern_after(self, config: Any, kept: list[int]) -> str:
        """The "F"/"S" string of the kept layers, which every runtime reads before the frequency."""
        types = self.types(config)
        return "".join("S" if types[i] == "shared" else "F" for i in kept)

    def config_keys(self) -> set[str]:
        """The config keys a cut rewrites for the kept layers."""
        return {self.listed, self.pattern}

    def config_after(self, config: Any, kept: list[int]) -> dict[str, Any]:
        """What a cut writes (the per-layer list itself is sliced as a per-layer config): the kept
        layers' pattern, which serving engines read, where the source shares or wrote one."""
        if self.readers(config) or config_value(config, self.pattern):
            return {self.pattern: self.pattern_after(config, kept)}
        return {}

    def unplaced(self, config: Any, kept: list[int]) -> str | None:
        """Any kept layer list places the selection; nothing to refuse."""
        return None


@dataclass(frozen=True)
class SharedKV:
    """Layers that compute no keys or values of their own (Gemma 4 E2B and E4B: the last
    `num_kv_shared_layers`): each attends to those the last earlier layer of its layer_types entry
    stored, which the decoder passes every block in one dict (transformers' kv_sharing_modes; vLLM
    and llama.cpp take the source from a fixed offset, which agrees on the released layouts and on
    every block cut this allows: docs/serving.md). That layer's attention is a *source* while any of
    its readers stays. Removing readers keeps the rule: they are the last layers, and the kept ones
    stay last."""

    shares = "keys and values"
    marker = "num_kv_shared_layers"
    state = "shared_kv_states"  # the keyword argument: one container per forward, which block-by-block runs make per stream
    block_reads = True  # a reader's block needs its type's source while it stays, whatever its attention (unplaced)
    first_shared_attribute = "first_kv_shared_layer_idx"  # where transformers' decoder keeps the first shared layer's index
    count: str = "num_kv_shared_layers"
    types: str = "layer_types"

    def readers(self, config: Any) -> dict[int, list[int]]:
        """Each source (the last layer of its type before the shared ones, where one of that type
        reads it) -> the shared layers that read it."""
        layers, shared = config_value(config, "num_hidden_layers"), config_value(config, self.count) or 0
        if not shared:
            return {}
        types, first = self.layer_types(config), layers - shared
        found: dict[int, list[int]] = {}
        for index in range(first, layers):
            source = max((i for i in range(first) if types[i] == types[index]), default=None)
            if source is not None:
                found.setdefault(source, []).append(index)
        return found

    def layer_types(self, config: Any) -> list[str]:
        """Every layer's type, from config.json's dict as transformers derives it where it lists none."""
        types = config_value(config, self.types)
        if types is None and isinstance(config, dict):
            from transformers import AutoConfig

            settings = {key: value for key, value in config.items() if key != "model_type"}
            types = AutoConfig.for_model(config["model_type"], **settings).layer_types
        return list(types or [])

    def config_keys(self) -> set[str]:
        return {self.count}

    def config_after(self, config: Any, kept: list[int]) -> dict[str, Any]:
        """The kept shared layers' count: they are still the last ones."""
        layers, shared = config_value(config, "num_hidden_layers"), config_value(config, self.count) or 0
        return {self.count: sum(1 for i in kept if i >= layers - shared)} if shared else {}

    def unplaced(self, config: Any, kept: list[int]) -> str | None:
        """Why the `kept` blocks' config would not load, or None: transformers requires a layer of
        every type among the shared ones before them, even where a shared layer's attention is
        gone (its block still reads its type's keys and values)."""
        layers, shared = config_value(config, "num_hidden_layers"), config_value(config, self.count) or 0
        if not shared:
            return None
        types, first = self.layer_types(config), layers - shared
        before = {types[i] for i in kept if i < first}
        for index in kept:
            if index >= first and types[index] not in before:
                return (f"that leaves L{index}, which reads the keys and values of an earlier {types[index]} layer "
                        f"({self.marker}), with none before the shared layers, and transformers refuses such a config: "
                        f"keep one of {', '.join(f'L{i}' for i in range(first) if types[i] == types[index])}, "
                        f"or remove L{index} too")
        return None


@dataclass(frozen=True)
class FixedPattern:
    """Layers a runtime places by a period it fixes in its own code for the family, whatever the
    checkpoint says (read in llama.cpp's loaders, vLLM's gpt_oss.py and gemma3.py): full attention in every 2nd
    layer of Gemma 2 and gpt-oss, every 4th of OLMo 3 and every 6th of Gemma 3 (a sliding window in
    the others; `set_swa_pattern`), no rotary embedding in every 4th layer of SmolLM3 and Llama 4
    (`n_no_rope_layer_step`); sliding windows in EXAONE 4 only at 64 layers, its 32B (`only_at`). A
    cut whose kept layers break the pattern runs there with those layers misplaced, so the cut says
    so; removing runs of `period` consecutive blocks keeps it, where the period holds at any count."""

    listed: str  # the per-layer config list transformers reads
    marker: Any  # the entry the runtime gives layer i where (i + 1) % period == 0
    period: int
    runtime: str
    gives: str  # what those layers get there, in words
    only_at: int | None = None  # the runtime keeps the period only at this layer count, and marks every layer otherwise

    def expected(self, count: int) -> list[int]:
        """The layers the runtime marks in a model of `count` layers."""
        if self.only_at is not None and count != self.only_at:
            return list(range(count))
        return [i for i in range(count) if (i + 1) % self.period == 0]

    def broken(self, config: Any) -> list[int] | None:
        """The layers `config` (object or config.json dict) marks, where the runtime marks others;
        None where it marks the same (or none are listed)."""
        values = list(config_value(config, self.listed) or [])
        marked = [i for i, value in enumerate(values) if value == self.marker]
        return marked if values and marked != self.expected(len(values)) else None

    def rule(self, layers: int, what: str | None = None) -> str:
        """What the runtime does in a model of `layers` layers, in words (`what`: how to name what it
        gives, its `gives` by default)."""
        verb = "give" if " and " in self.runtime else "gives"
        if self.only_at is not None and layers != self.only_at:
            where = f"every layer, keeping its period of {self.period} only in a model of {self.only_at} layers"
        else:
            nth = {1: "st", 2: "nd", 3: "rd"}.get(self.period % 10 if self.period not in (11, 12, 13) else 0, "th")
            where = f"every {self.period}{nth} layer"
        return f"{self.runtime} {verb} {what or self.gives} to {where}, whatever the checkpoint says"

    def problem(self, config: Any) -> str | None:
        """What the runtime would run wrongly in `config`, in words; None where it follows the pattern."""
        marked = self.broken(config)
        if marked is None:
            return None
        return f"its {self.listed} give {self.gives} to layers {marked}, where {self.rule(len(config_value(config, self.listed)), 'it')}"


@dataclass(frozen=True)
class Architecture:
    """Where things live in one family's `*ForCausalLM`, as dotted paths and config keys. Module
    names inside a block may be dotted too, where a family nests them (DBRX's norm_attn_norm.attn).

    attention_norms / mlp_norms: norms whose only job is to feed (pre-norm) or rescale
    (post-norm) that sublayer's output; they go together with the sublayer.
    parallel: the block's FFN reads the block's input, as its attention does, and both outputs are
    added to the stream together (Cohere), so the stream between them is no FFN's input: a block's
    output is its input plus each sublayer's output, each computed from the input. Where a config
    flag decides it (GPT-NeoX's use_parallel_residual), a variant sets it.
    shared_norms: norms both sublayers of a parallel block read; they go only with the whole block.
    depth_scaled_config: (config key, runtime that fixes its value in code, or None): keys a family
    divides by the square root of the layer count when it builds each block (MiniCPM3 scales every
    sublayer's output by scale_depth / sqrt(num_hidden_layers)). A cut multiplies them by
    sqrt(kept / before), so that every kept block scales as it did, and says which runtime would not.
    per_layer_config: config lists with one entry per layer (sliced when blocks go).
    layer_index_config: config lists of layer indices (renumbered when blocks go).
    tiled_config: config lists that runtimes repeat to the layer count, layer i taking entry i % len
    (RecurrentGemma's block_types, and its 2B's _block_types, which transformers 5 ignores and
    transformers 4 and mlx-lm read): a cut writes each as the kept layers' entries, one per layer.
    moe_range_config: (start, end, interval) keys where the config places MoE blocks by rule alone,
    block i when (i + 1) % interval == 0 and start <= i <= end (end -1: the last), with no list to
    write instead (ERNIE 4.5): a cut sets them for the kept blocks, and refuses a cut no rule describes.
    period_configs: blocks of a kind the config places by a period and an offset alone (PeriodRule:
    Jamba's attention and MoE blocks): a cut writes the period and offset that place the kept ones
    and refuses a cut no rule describes; --granularity period removes aligned runs of the largest
    period. The first places the attention blocks of a hybrid family.
    sparse_step_config: a "every k-th layer is MoE" key; turned into an explicit list of dense
    layers (the first layer_index_config key) before blocks go, so the pattern survives.
    prefix_count_config: counts of leading layers that differ from the rest ("the first k layers
    are dense": DeepSeek, GLM-MoE; "the first k layers use full attention": Qwen's
    max_window_layers); recounted over the surviving blocks.
    mlp_extra_outputs: values the FFN/MoE returns after its output (gpt-oss: router scores).
    carried: arguments the decoder hands each block from what the block before returned after the
    stream, which its attention takes and returns after its output and weights (GLM-5: the top-k
    indices of the keys an indexer selected, `prev_topk_indices`); an attention's stand-in passes
    them on as it got them.
    expanded_config: (per-layer list, key it is derived from): a per-layer list transformers derives from a
    compressed key and does not read back (GPT-Neo's attention_layers, expanded from attention_types' runs of
    patterns); a cut slices the list and writes the key as one run of it.
    attention_adds_residual: the attention adds the stream, its second argument, to its own output (BLOOM's), so its
    stand-in returns that argument rather than zeros.
    attention_returns_state: the attention takes the block's recurrent state as its second argument and returns it,
    updated, as its second value, which the model copies into its cache (xLSTM's mLSTM layer): its stand-in returns
    zeros and the state it got.
    output_rows_config: the config key counting the output layer's rows where it may keep fewer than the
    embeddings (Apertus 1.5: the text rows); None where it scores the whole vocabulary.
    positions_config: the config key that holds the positions the model was trained on, where its config class
    maps no max_position_embeddings to it (MPT's max_seq_len).
    shared_attention: layers whose attention reuses what an earlier layer's attention made: its
    selection of keys (SharedSelection, GLM-5.2) or its keys and values (SharedKV, Gemma 4 E2B and
    E4B). A cut keeps a source's attention while any of its readers stays, and prune protects it;
    scoring drops a source's output and keeps what it shares (surgery.ablation).
    attention_output / mlp_output: the linear layer inside the sublayer (mlp_output "": the FFN's module itself) whose output is added to
    the stream (a linear bridge folds into it); None where a norm follows it.
    moe_outputs: for MoE blocks, every place inside the mlp sublayer whose output is summed into
    the stream: the experts' stacked down projections, shared experts, the FFN of dense layers.
    The routing weights scale each expert's output, so a bridge folds into all of them; those a
    layer lacks (a dense layer has no experts) are skipped.
    gguf_arch: llama.cpp's architecture name, for families surgery.export.gguf_write writes.
    variants: (config key, value, fields): where the config holds that value (or the value, a
    predicate, holds for it; for the whole config where the key is None), the family's entry with
    those fields replaced (StableLM's parallel residual, where attention and FFN read one norm); the
    first that matches, by architecture_of.
    refused_configs: (config key, value, why) for variants of a family whose block the entry does
    not describe (Gemma 4's layers that share another's KV cache), the value
    a predicate where one value does not say it.
    step_rule: layers transformers places by a config list and other runtimes by a step alone
    (StepRule); a cut sets the step the cut's list follows, and says so when it follows none.
    fixed_patterns: layers a runtime places by a period fixed in its code (FixedPattern); a cut says
    when its layers break it.
    extra_outputs_flag: a block attribute; where given, only blocks where it is true return
    mlp_extra_outputs (Llama 4: `is_moe_layer`; its dense FFNs return their output alone).
    experts_output_last: stacked experts stored [experts, in, out] by a class that does not say so
    with `is_transposed` (Llama 4).
    mtp_prefix: where the checkpoint keeps its multi-token-prediction modules, when the config
    counts some (`mtp_count_config`): None for extra blocks numbered on after the last
    (DeepSeek-V3, GLM-4.5: `model.layers.61`), else the prefix of their names (K-EXAONE, Qwen3-Next:
    `mtp.`).
    mtp_count_config: the config keys that may count them, the one a cut writes first (vLLM reads
    Qwen3-Next's count as num_nextn_predict_layers, Qwen3.5's as mtp_num_hidden_layers). Where
    the config names none, a family with an `mtp_prefix` counts what its files hold under it (the
    names say which modules they are; vLLM assumes one).
    linear_attention / linear_attention_output / linear_layer_type: hybrid families (Qwen3-Next,
    Qwen3.5, LFM2): the module that takes the attention's place in blocks of that `layer_types`
    entry (Gated DeltaNet, LFM2's short convolution), and its output projection. It keeps a
    recurrent state instead of a KV cache and returns its output alone, so its stand-in differs
    (hf_modeling.RemovedLinearAttention); it is the block's "attn" sublayer.
    lora_may_lack: groups of LoRA targets a model of the family may lack, one group at a time (the
    query layout latent attention does not use; a hybrid cut that kept no block of one layer type).
    attention_companions / mlp_companions: modules beside `attention` / `mlp` in the block whose
    outputs the block adds to theirs, each with the weight that writes it: Falcon-H1's Mamba-2
    mixer, which reads the same input as its attention (a parallel hybrid), and Granite 4.0-H's
    routed experts (`block_sparse_moe`) beside the `shared_mlp` every block has. They are part of
    that sublayer: they go with it (their stand-ins add nothing and keep no state) and a bridge
    folds into them too. A block may hold None there (Granite's dense sizes have no experts), or
    lack the module (Gemma 4's dense sizes). The weight is None where a norm follows the module.
    block_scalar: (buffer, post norms, raw readers): a scale each block applies to the whole stream it
    returns (Gemma 4's layer_scalar), so that a block is not its input plus its sublayers' outputs.
    Loading folds it into the norms that end each sublayer or the block tail, and into the linear
    layers that read the stream without a norm (the tail's gate) (surgery.scales.fold_block_scalars),
    exactly but for the norms' epsilon, and surgery then works on a model whose blocks only add to the stream.
    block_tail: modules a block runs after both sublayers that add to the stream, the last one's
    output added (Gemma 4 E2B and E4B's per-layer input: a gate reads the stream, multiplies it by the
    block's slice of the per-layer embeddings, and a projection and a norm write it back). They go
    only with the whole block; a sublayer cut keeps them.
    packed_per_layer: (tensor under the decoder stack, dimension) for model-level tensors that pack one
    slice of `packed_width_config` entries per block along that dimension (Gemma 4 E2B's per-layer
    embeddings and their projection from the stream): a block cut keeps the kept blocks' slices.
    released_config_keys: config.json keys transformers reads into other settings and does not save,
    which other runtimes read (Gemma 4's global_head_dim and num_global_key_value_heads, saved as
    per_layer_config): an export writes the source's back.
    last_layer_type: the layer_types entry transformers gives the last layer whatever the config
    lists (Gemma 4: full attention, whose head size differs), so a cut must end on such a layer.
    companion_outputs: (companion, n): a companion that returns n values after its first, which
    its stand-in returns as None (Gemma 4's router: its top-k weights and indices, which only the
    experts beside it read).
    linear_block_norms: where a hybrid's linear-attention blocks place their norms unlike its
    attention blocks, (attention norms, FFN norms) of those blocks: OLMo-Hybrid norms its attention
    blocks' sublayer outputs (OLMo 2) and its linear blocks' inputs, so one norm name serves the FFN
    in one kind of block and the attention in the other.
    output_norms: (kind, norm) pairs: a norm the family's config may put between sublayer `kind`'s
    output projection and the stream (LFM3's post norms, nn.Identity under use_sandwich_norm=False);
    a bridge folds into the projection only where the block's is nn.Identity, as a linear map does
    not pass through a norm.
    linear_block_mlp_output: the FFN's output projection in a hybrid's linear-attention blocks where
    only those blocks let it write the stream (OLMo-Hybrid: its attention blocks norm the FFN's
    output, its linear blocks norm the FFN's input), so a bridge folds there in those blocks alone.
    linear_block_marker: (block attribute, value) that marks a linear-attention block where both
    kinds of attention have one name (Kimi-Linear's `self_attn`; its blocks' `block_type`).
    block_outputs: how many values the family's decoder blocks return, the stream first, where
    they return a tuple (Falcon-H1's (hidden_states,), Bamba's (hidden_states, attention weights));
    0 for the tensor alone. Whatever stands in for a block answers alike.
    attention_index_config: a config list of a hybrid's attention blocks, where it lists no
    layer_types in config.json (Bamba's attn_layer_indices; transformers derives layer_types from it).
    single_mixer: (block attribute, ((its value, sublayer kind), ...)) for families whose every
    block holds one mixer behind one norm (Nemotron-H: a Mamba-2 mixer, an attention, an MLP or an
    MoE, by `block_type`): the block's one sublayer is of the kind its value maps to, and the other
    kind is absent (`absent_sublayers`), so removing the mixer deletes the block. Attribute None:
    every block holds the one type listed (Mamba's), and the config lists none.
    mtp_block_config: config keys (a list, or a pattern string) whose length is the number of blocks
    one MTP module spans, at mtp.layers.{k * length + i} (Nemotron 3's mtp_hybrid_override_pattern
    "*E": an attention and an MoE block a module); one block a module where none is given.
    pattern_configs / pattern_letters: (string key, list key) pairs of per-block types that released
    configs write as one string, which vLLM reads, and transformers 5 turns into the list (Nemotron-H's
    hybrid_override_pattern "M-M*-E" and layers_block_type), with each type's letter.
    unquantized: module names (suffixes) 4-bit healing keeps in full precision, beside the output
    layer: weights a fused kernel reads directly rather than through the module (Mamba-2's out_proj
    in mamba_ssm's training kernel, which a 4-bit packed weight would break).
    """

    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    per_layer_config: tuple[str, ...] = ()
    layer_index_config: tuple[str, ...] = ()
    tiled_config: tuple[str, ...] = ()
    sparse_step_config: str | None = None
    moe_range_config: tuple[str, str, str] | None = None
    period_configs: tuple[PeriodRule, ...] = ()
    prefix_count_config: tuple[str, ...] = ()
    logit_softcap_config: str | None = None
    logit_divisor_config: str | None = None
    logit_multiplier_config: str | None = None
    output_rows_config: str | None = None
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    attention_output: str | None = "o_proj"
    mlp_output: str | None = "down_proj"
    moe_outputs: tuple[str, ...] = ()
    mlp_extra_outputs: int = 0
    carried: tuple[str, ...] = ()
    attention_adds_residual: bool = False
    attention_returns_state: bool = False
    expanded_config: tuple[tuple[str, str], ...] = ()
    positions_config: str = "max_position_embeddings"
    shared_attention: SharedSelection | SharedKV | None = None
    gguf_arch: str | None = None
    refused_configs: tuple[tuple[str, Any, str], ...] = ()
    step_rule: StepRule | None = None
    fixed_patterns: tuple[FixedPattern, ...] = ()
    extra_outputs_flag: str | None = None
    experts_output_last: bool = False
    mtp_prefix: str | None = None
    mtp_count_config: tuple[str, ...] = ("num_nextn_predict_layers",)
    linear_attention: str | None = None
    linear_attention_output: str | None = None
    linear_layer_type: str = "linear_attention"
    lora_may_lack: tuple[tuple[str, ...], ...] = ()
    attention_companions: tuple[tuple[str, str], ...] = ()
    mlp_companions: tuple[tuple[str, str | None], ...] = ()
    companion_outputs: tuple[tuple[str, int], ...] = ()
    last_layer_type: str | None = None
    released_config_keys: tuple[str, ...] = ()
    block_scalar: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
    block_tail: tuple[str, ...] = ()
    packed_per_layer: tuple[tuple[str, int], ...] = ()
    packed_width_config: str | None = None
    linear_block_norms: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    linear_block_mlp_output: str | None = None
    output_norms: tuple[tuple[str, str], ...] = ()
    unquantized: tuple[str, ...] = ()
    block_outputs: int = 0
    attention_index_config: str | None = None
    single_mixer: tuple[str | None, tuple[tuple[str, str], ...]] | None = None
    mtp_block_config: tuple[str, ...] = ()
    pattern_configs: tuple[tuple[str, str], ...] = ()
    pattern_letters: tuple[tuple[str, str], ...] = ()
    linear_block_marker: tuple[str, str] | None = None
    shared_norms: tuple[str, ...] = ()
    parallel: bool = False
    depth_scaled_config: tuple[tuple[str, str | None], ...] = ()
    variants: tuple[tuple[str | None, Any, tuple[tuple[str, Any], ...]], ...] = ()

    def output_projections(self, kind: str, linear_block: bool = False) -> tuple[str, ...]:
        """Dotted paths, inside a decoder block, of what writes sublayer `kind`'s output into the
        stream (a block has some of them: a hybrid block one of its two attentions);
        `linear_block`: in a hybrid's linear-attention block (linear_block_mlp_output)."""
        beside = tuple(f"{module}.{output}" for module, output in self.companions(kind) if output)
        if kind == "attn":
            pairs = ((self.attention, self.attention_output), (self.linear_attention, self.linear_attention_output))
            paths = dict.fromkeys(f"{module}.{output}" for module, output in pairs if module and output)  # once each (Kimi-Linear)
            return tuple(paths) + beside
        mlp_output = self.linear_block_mlp_output if linear_block and self.linear_block_mlp_output else self.mlp_output
        inner = ((mlp_output,) if mlp_output is not None else ()) + self.moe_outputs
        return tuple(f"{self.mlp}.{name}" if name else self.mlp for name in inner) + beside  # ("": the module itself, OPT's fc2)

    def companions(self, kind: str) -> tuple[tuple[str, str], ...]:
        """(module, the weight that writes its output) beside sublayer `kind`'s own module."""
        return self.attention_companions if kind == "attn" else self.mlp_companions

    def stand_in_spec(self) -> dict[str, Any]:
        """What hf_modeling.remove_sublayer needs to put stand-ins in this family's blocks; a
        sublayer-pruned checkpoint records it in its config (`surgery`) to rebuild them."""
        return {"layers": self.layers, "modules": {kind: list(self.sublayer_modules(kind)) for kind in ("attn", "mlp")},
                "mlp_extra_outputs": self.mlp_extra_outputs,
                **({"carried": list(self.carried)} if self.carried else {}),
                **({"attention_adds_residual": True} if self.attention_adds_residual else {}),
                **({"returns_state": True} if self.attention_returns_state else {}),
                **({"extra_outputs_flag": self.extra_outputs_flag} if self.extra_outputs_flag else {}),
                **({"linear_attention": self.linear_attention} if self.linear_attention else {}),
                **({"linear_norms": dict(zip(("attn", "mlp"), map(list, self.linear_block_norms)))}
                   if self.linear_block_norms else {}),
                **({"linear_block_marker": list(self.linear_block_marker)} if self.linear_block_marker else {}),
                **({"single_mixer": {"attribute": self.single_mixer[0], "kinds": dict(self.single_mixer[1])}}
                   if self.single_mixer else {}),
                **({"companions": {kind: [module for module, _ in self.companions(kind)] for kind in ("attn", "mlp")
                                   if self.companions(kind)}} if self.attention_companions or self.mlp_companions else {}),
                **({"companion_outputs": dict(self.companion_outputs)} if self.companion_outputs else {})}

    def runtime_period(self, config: Any) -> int | None:
        """The period a block cut keeps the layer pattern by, for --granularity period: the largest of
        the config's own rules (period_configs), else that of the first pattern a runtime fixes
        (fixed_patterns) that `config` follows; None where it follows none (a cut of whole periods
        would keep nothing)."""
        if self.period_configs:
            config = self.with_rule_defaults(config)
            return max((rule.values(config) or (1, 0))[0] for rule in self.period_configs)
        return next((p.period for p in self.fixed_patterns
                     if p.only_at is None and config_value(config, p.listed) and p.broken(config) is None), None)

    def last_block_guard(self, config: Any) -> Sublayer | None:
        """The last block's attention where the family's last layer must be of `last_layer_type` and
        the model's is: what a prune protects so that the block stays (its FFN may still go)."""
        types = config_value(config, "layer_types")
        if self.last_layer_type and isinstance(types, list) and types and types[-1] == self.last_layer_type:
            return Sublayer(len(types) - 1, "attn")
        return None

    def first_block_guard(self, config: Any) -> Sublayer | None:
        """The first block's mixer where some blocks have none (Nemotron-H's MLP and MoE blocks) and
        the first has one: what a prune protects, as transformers reads a cache's length from the
        first block's slot, which a block without a mixer leaves empty."""
        kinds = self._block_kinds(config)
        return Sublayer(0, "attn") if kinds and "mlp" in kinds and kinds[0] == "attn" else None

    def mixerless_first(self, config: Any, kept: list[int]) -> str | None:
        """Why a cut whose first kept block is one without a mixer (the first blocks removed) would not
        generate in transformers, or None (see first_block_guard)."""
        kinds = self._block_kinds(config)
        if not kinds or not kept or kept[0] == 0 or kinds[kept[0]] != "mlp":
            return None
        return (f"that leaves L{kept[0]}, a block with no attention or Mamba mixer ({self.block_types(config)[kept[0]]}), "
                "first: transformers reads a cache's length from the first block, so the cut model would fail to generate; "
                f"keep one of the blocks before it, or remove L{kept[0]} too")

    def _block_kinds(self, config: Any) -> list[str] | None:
        """A single-mixer family's sublayer kind of each block ("attn" for a mixer, "mlp" for an MLP or MoE)."""
        types = self.block_types(config)
        return [dict(self.single_mixer[1]).get(kind) for kind in types] if types else None

    def attention_blocks(self, config: Any) -> list[int] | None:
        """A hybrid config's (object or config.json dict) attention blocks (the others are linear);
        None for other families."""
        if self.single_mixer:
            kinds = dict(self.single_mixer[1])
            if not any(kind == "attn" and value != self.linear_layer_type for value, kind in kinds.items()):
                return None  # no attention at all (Mamba): no hybrid cache to keep
            return [i for i, kind in enumerate(self.block_types(config) or []) if kinds.get(kind) == "attn"
                    and kind != self.linear_layer_type]
        types = config_value(config, "layer_types")
        if self.linear_attention and self.period_configs and not isinstance(types, list):  # (a config.json: Jamba's)
            period, offset = self.period_configs[0].values(self.with_rule_defaults(config))
            return [i for i in range(config_value(config, "num_hidden_layers")) if i % period == offset]
        if self.linear_attention and self.attention_index_config and not isinstance(types, list):
            return sorted(config_value(config, self.attention_index_config) or [])
        if self.linear_attention and types is None and isinstance(config, dict):  # (RecurrentGemma's: derived, never saved)
            from transformers import AutoConfig

            settings = {key: value for key, value in config.items() if key not in ("model_type", "surgery", "auto_map")}
            types = getattr(AutoConfig.for_model(base_model_type(config), **settings), "layer_types", None)
        if not self.linear_attention or not isinstance(types, list):
            return None
        from transformers.configuration_utils import remap_legacy_layer_types

        # a config.json may use the released names (Granite 4.0-H's "mamba"), which a config object reads as its own
        return [i for i, kind in enumerate(remap_legacy_layer_types(types)) if kind != self.linear_layer_type]

    def with_rule_defaults(self, config: Any) -> Any:
        """`config` (an object, or a config.json dict), with the family's defaults for the keys of
        its period_configs that a dict leaves out."""
        keys = [key for rule in self.period_configs for key in (rule.period, rule.offset, rule.count) if key]
        missing = [key for key in keys if config_value(config, key) is None]
        if not missing or not isinstance(config, dict):
            return config
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(base_model_type(config))
        return {**config, **{key: getattr(defaults, key) for key in missing}}

    def block_types(self, config: Any) -> list[str] | None:
        """A single-mixer family's type of each block, from a config object or a config.json dict
        (which may give them as a list or, as released ones do, as a `pattern_configs` string)."""
        if not self.single_mixer:
            return None
        if self.single_mixer[0] is None:  # one type for every block
            return [self.single_mixer[1][0][0]] * config_value(config, "num_hidden_layers")
        from transformers.configuration_utils import remap_legacy_layer_types

        types = config_value(config, "layer_types")
        if not isinstance(types, list):
            types = config_value(config, "layers_block_type")  # (Nemotron-H's name for the list, in config.json)
        if not isinstance(types, list) and self.pattern_configs:
            pattern = config_value(config, self.pattern_configs[0][0])
            if isinstance(pattern, str):
                by_letter = {letter: kind for kind, letter in self.pattern_letters}
                types = [by_letter.get(letter, letter) for letter in pattern]
        return remap_legacy_layer_types(list(types)) if isinstance(types, list) else None

    def has_block_tail(self, config: Any) -> bool:
        """Whether this config's blocks end in a tail (Architecture.block_tail: Gemma 4 E2B's, whose
        per-layer width is not 0; the 31B has none)."""
        return bool(self.block_tail) and (self.packed_width_config is None
                                          or bool(config_value(config, self.packed_width_config)))

    @property
    def shared_state(self) -> str | None:
        """The keyword argument under which the decoder hands every block the one container its
        shared layers read (SharedKV.state), or None."""
        return self.shared_attention.state if self.shared_attention else None

    def shared_readers(self, config: Any) -> dict[int, list[int]]:
        """Each layer whose attention's selection or keys and values later layers reuse
        (Architecture.shared_attention) -> those layers; none for families that share none."""
        return self.shared_attention.readers(config) if self.shared_attention else {}

    def absent_sublayers(self, config: Any) -> list[Sublayer]:
        """The sublayers a single-mixer family's blocks do not have (each holds one); none for others."""
        types = self.block_types(config)
        if types is None:
            return []
        kinds = dict(self.single_mixer[1])
        return [Sublayer(i, kind) for i, value in enumerate(types) for kind in KINDS if kinds.get(value) != kind]

    def attention_in(self, layer: Any) -> str:
        """The name of `layer`'s attention sublayer: a hybrid family's linear attention in the
        blocks that have it instead of the attention."""
        return self.sublayer_modules("attn", layer)[0]

    def sublayer_modules(self, kind: str, layer: Any = None) -> tuple[str, ...]:
        """The module names inside decoder block `layer` that make up sublayer `kind` ("attn"/"mlp");
        without a block, the family's usual ones (a hybrid block may name its linear attention
        instead: hf_modeling.sublayer_names, which a checkpoint's own code runs too)."""
        if layer is not None:
            from surgery.hf_modeling import sublayer_names

            return tuple(sublayer_names(layer, kind, self.stand_in_spec()))
        main, norms = (self.attention, self.attention_norms) if kind == "attn" else (self.mlp, self.mlp_norms)
        return (main, *(module for module, _ in self.companions(kind)), *norms)


_LLAMA = Architecture()
_FULL = "full attention (and a sliding window to the others)"  # what a FixedPattern's marked layers get
_NO_ROPE = "no rotary embedding"
_SANDWICH_NORMS = dict(  # Gemma 2/3: a norm before and after each sublayer
    attention_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    per_layer_config=("layer_types",),
    attention_output=None,  # the post-norms sit between the projections and the stream
    mlp_output=None,
)
_ATTENTION_ONLY_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")
# Cohere, Phi-2, GPT-J: a parallel block, attention and FFN reading one normed input (the norm goes with the block)
_PARALLEL = dict(attention_norms=(), mlp_norms=(), shared_norms=("input_layernorm",), parallel=True)
_COHERE = dict(**_PARALLEL, logit_multiplier_config="logit_scale")
_GPTJ = dict(_PARALLEL, shared_norms=("ln_1",), layers="transformer.h", attention="attn", final_norm="transformer.ln_f",
             attention_output="out_proj", mlp_output="fc_out")
# OPT's block (XGLM's and BioGPT's too): the FFN lies in the block itself, fc1, its activation, fc2; fc2, which
# writes to the stream, is the sublayer's module (mlp_output "": the module itself) and fc1 and the norm go with it
_OPT_BLOCK = replace(_LLAMA, attention_norms=("self_attn_layer_norm",), mlp="fc2", mlp_norms=("fc1", "final_layer_norm"),
                     attention_output="out_proj", mlp_output="", lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
_UNGATED_LORA = (*_ATTENTION_ONLY_LORA, "up_proj", "down_proj")


def _sliced_projections(config: Any) -> bool:
    """Whether a BLOOM config runs its output projections slice by slice (slow_but_exact with pretraining_tp > 1)."""
    return bool(config_value(config, "slow_but_exact")) and (config_value(config, "pretraining_tp") or 1) > 1


def _projects_embeddings(config: Any) -> bool:
    """Whether an OPT config embeds tokens narrower than its blocks (project_in, project_out)."""
    width = config_value(config, "word_embed_proj_dim")
    return width is not None and width != config_value(config, "hidden_size")


def _falcon_two_norms(config: Any) -> bool:
    """Falcon 40B's and 180B's layout: parallel blocks with a norm for each sublayer (transformers
    counts two where new_decoder_architecture leaves num_ln_in_parallel_attn unset)."""
    count = config_value(config, "num_ln_in_parallel_attn")
    return bool(config_value(config, "new_decoder_architecture")) and config_value(config, "parallel_attn", True) is not False \
        and (count or 2) == 2


# OLMo 2/3, EXAONE 4: a norm on each sublayer's output instead of its input.
_POST_NORM = replace(_LLAMA, attention_norms=("post_attention_layernorm",), mlp_norms=("post_feedforward_layernorm",),
                     attention_output=None, mlp_output=None)
# MoE: the whole sparse block (router, experts, shared expert) is the mlp sublayer. Experts are
# fused 3-D parameters in transformers 5, so LoRA heals through attention.
_APERTUS = replace(_LLAMA, attention_norms=("attention_layernorm",), mlp_norms=("feedforward_layernorm",), lora_targets=_UNGATED_LORA)
_MOE = replace(_LLAMA, lora_targets=_ATTENTION_ONLY_LORA, mlp_output=None, moe_outputs=("experts.down_proj",))
_QWEN_MOE = replace(_MOE, layer_index_config=("mlp_only_layers",), sparse_step_config="decoder_sparse_step",
                    moe_outputs=("experts.down_proj", "shared_expert.down_proj", "down_proj"))
_SHARED_EXPERTS = ("experts.down_proj", "shared_experts.down_proj", "down_proj")  # DeepSeek, GLM: dense layers first
# DeepSeek's latent attention: the query is factored (q_a_proj, q_b_proj) where the config gives a
# q_lora_rank, one q_proj where it does not (DeepSeek-V2-Lite, Moonlight); peft adapts whichever exists.
_LATENT_ATTENTION_LORA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
QUERY_LAYOUTS = (("q_proj",), ("q_a_proj", "q_b_proj"))  # the LoRA targets a latent-attention model has one of
# DeepSeek-V2/V3's block: dense FFNs first (first_k_dense_replace), then routed experts beside shared ones
_DEEPSEEK_MOE = replace(_MOE, prefix_count_config=("first_k_dense_replace",), moe_outputs=_SHARED_EXPERTS,
                        lora_targets=_LATENT_ATTENTION_LORA, lora_may_lack=QUERY_LAYOUTS)
_GLM4_MOE = replace(_MOE, prefix_count_config=("first_k_dense_replace",), moe_outputs=_SHARED_EXPERTS)  # (Llama's attention)
_RG_ATTENTION_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")  # RecurrentGemma's two kinds of temporal block
_RG_RECURRENT_LORA = ("linear_x", "linear_y", "linear_out")
# Kimi-Linear: its MLA blocks' own projections (q_proj, o_proj are also its KDA blocks'), and its KDA ones'
_MLA_ONLY_LORA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_KDA_LORA = ("k_proj", "v_proj", "b_proj", "f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj")
_BAILING_KDA_LORA = ("k_proj", "v_proj", "b_proj", "f_proj")  # (its g_proj gates both kinds of attention)
# Hybrid attention (Qwen3-Next, Qwen3.5): Gated DeltaNet blocks between the attention ones; their
# projections differ between the two generations. A cut may keep no block of one of the two types.
_HYBRID = dict(linear_attention="linear_attn", linear_attention_output="out_proj", per_layer_config=("layer_types",),
               mtp_prefix="mtp.", mtp_count_config=("mtp_num_hidden_layers", "num_nextn_predict_layers"),
               step_rule=StepRule("layer_types", "full_attention_interval", "llama.cpp converters older than its PR #28208 (2026-09)",
                                  marker="full_attention"))
_NEXT_LINEAR_LORA = ("in_proj_qkvz", "in_proj_ba", "out_proj")
_QWEN35_LINEAR_LORA = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Mamba-2: its fused training kernel (mamba_ssm, on GPUs) reads out_proj's weight directly, past any
# adapter on it (peft refuses it for the Mamba families it knows), so LoRA adapts in_proj alone and
# 4-bit healing leaves out_proj unquantized.
_MAMBA_LORA = ("in_proj",)
_OLMO_LINEAR_LORA = ("a_proj", "b_proj", "g_proj")  # beside q/k/v/o_proj, which its attention blocks name alike
# LFM2: short-convolution blocks between attention ones; the attention's output is out_proj too
_LFM2 = dict(linear_attention="conv", linear_attention_output="out_proj", linear_layer_type="conv", attention_output="out_proj",
             attention_norms=("operator_norm",), mlp="feed_forward", mlp_norms=("ffn_norm",), final_norm="model.embedding_norm",
             per_layer_config=("layer_types",), layer_index_config=("full_attn_idxs",),
             lora_may_lack=(("q_proj", "k_proj", "v_proj", "out_proj"), ("in_proj", "out_proj")))

# Mamba's blocks: the mixer is the linear attention of every block; `attention` names a module no block has, which
# is what tells a linear-attention block (hf_modeling.is_linear_block)
_MAMBA = replace(_LLAMA, layers="backbone.layers", attention="attention", linear_attention="mixer", linear_attention_output="out_proj",
                 mlp="mlp", attention_norms=("norm",), mlp_norms=(), final_norm="backbone.norm_f",
                 single_mixer=(None, (("linear_attention", "attn"),)), unquantized=("mixer.out_proj",), lora_targets=_MAMBA_LORA)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": replace(_LLAMA, gguf_arch="llama"),
    "mistral": replace(_LLAMA, gguf_arch="llama"),  # llama.cpp runs Mistral as Llama (convert_hf_to_gguf.py too)
    "granite": replace(_LLAMA, logit_divisor_config="logits_scaling"),
    "gemma": _LLAMA,
    "qwen2": replace(_LLAMA, per_layer_config=("layer_types",), prefix_count_config=("max_window_layers",), gguf_arch="qwen2"),
    "qwen3": replace(_LLAMA, per_layer_config=("layer_types",), prefix_count_config=("max_window_layers",), gguf_arch="qwen3"),
    "gemma2": replace(_LLAMA, **_SANDWICH_NORMS, logit_softcap_config="final_logit_softcapping",
                      fixed_patterns=(FixedPattern("layer_types", "full_attention", 2, "llama.cpp", _FULL),)),
    "gemma3_text": replace(_LLAMA, **_SANDWICH_NORMS, logit_softcap_config="final_logit_softcapping",
                           fixed_patterns=(FixedPattern("layer_types", "full_attention", 6, "llama.cpp and vLLM's 2025 gemma3.py", _FULL),)),
    # Gemma 4 (31B, 26B-A4B, E2B, E4B; their text decoder, after surgery extract-text): Gemma 3's
    # sandwich norms, full-attention layers with their own head size (transformers' per_layer_config)
    # and keys that are their values (no v_proj), and in the MoE size routed experts beside the FFN,
    # each with its own norms. E2B and E4B: their last layers attend to the keys and values of the
    # last earlier layer of their type (SharedKV), and each block adds a per-layer input (block_tail)
    # from its slice of two model-level tensors (packed_per_layer).
    "gemma4_text": replace(_LLAMA, **{**_SANDWICH_NORMS, "mlp_norms": (*_SANDWICH_NORMS["mlp_norms"], "post_feedforward_layernorm_1",
                                                                     "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")},
                           logit_softcap_config="final_logit_softcapping",
                           mlp_companions=(("router", None), ("experts", None)), companion_outputs=(("router", 2),),
                           lora_may_lack=(("v_proj",),), last_layer_type="full_attention",
                           released_config_keys=("global_head_dim", "num_global_key_value_heads"),
                           block_scalar=("layer_scalar", ("post_attention_layernorm", "post_feedforward_layernorm",
                                                          "post_per_layer_input_norm"), ("per_layer_input_gate",)),
                           shared_attention=SharedKV(),
                           block_tail=("per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm"),
                           packed_per_layer=(("embed_tokens_per_layer.weight", 1), ("per_layer_model_projection.weight", 0)),
                           packed_width_config="hidden_size_per_layer_input"),
    # Gemma 4 unified (Gemma 4 12B; its text decoder after extract-text): Gemma 4's dense block (no experts, no
    # per-layer inputs), its block scale, full-attention layers with their own head size and keys as values,
    # and where num_kv_shared_layers says so last layers that attend to an earlier layer's keys and values
    "gemma4_unified_text": replace(_LLAMA, **_SANDWICH_NORMS, logit_softcap_config="final_logit_softcapping",
                                   lora_may_lack=(("v_proj",),), last_layer_type="full_attention",
                                   released_config_keys=("global_head_dim", "num_global_key_value_heads"),
                                   block_scalar=("layer_scalar", ("post_attention_layernorm", "post_feedforward_layernorm"), ()),
                                   shared_attention=SharedKV()),
    "phi3": replace(_LLAMA, lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "ministral": replace(_LLAMA, per_layer_config=("layer_types",)),
    "smollm3": replace(_LLAMA, per_layer_config=("layer_types", "no_rope_layers"),
                       fixed_patterns=(FixedPattern("no_rope_layers", 0, 4, "llama.cpp", _NO_ROPE),)),
    "starcoder2": replace(_LLAMA, mlp_output="c_proj", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
    # HyperCLOVA X: a norm after each sublayer's output too (use_post_norm, the default; nn.Identity without),
    # muP multipliers, the logits multiplied by logits_scaling
    "hyperclovax": replace(_LLAMA, attention_norms=("input_layernorm", "post_norm1"), mlp_norms=("post_attention_layernorm", "post_norm2"),
                           output_norms=(("attn", "post_norm1"), ("mlp", "post_norm2")), logit_multiplier_config="logits_scaling"),
    # MiniCPM3: latent attention, each sublayer's output scaled by scale_depth / sqrt(num_hidden_layers),
    # the last hidden state divided by hidden_size / dim_model_base (logits_scaling) before the output layer
    "minicpm3": replace(_LLAMA, depth_scaled_config=(("scale_depth", "llama.cpp's minicpm3 graph, which fixes it at 1.4"),),
                        logit_divisor_config="logits_scaling", lora_targets=(*_LATENT_ATTENTION_LORA, "gate_proj", "up_proj", "down_proj"), lora_may_lack=QUERY_LAYOUTS),
    # Llama's block under other names: ERNIE 4.5, Seed-OSS, Hunyuan, Helium, Ministral 3, InternLM 3,
    # IQuest-Coder (the last two run by transformers' Llama classes).
    "internlm3": _LLAMA,
    "iquestcoder": _LLAMA,
    # Youtu-LLM: Llama's block with DeepSeek's latent attention, the query factored or not
    "youtu": replace(_LLAMA, lora_targets=(*_LATENT_ATTENTION_LORA, "gate_proj", "up_proj", "down_proj"),
                     lora_may_lack=QUERY_LAYOUTS),
    "ernie4_5": _LLAMA,
    "seed_oss": _LLAMA,
    "hunyuan_v1_dense": _LLAMA,
    "helium": _LLAMA,
    # EXAONE 3.0 and 3.5 (LG): transformers runs them with Llama's classes; their files keep EXAONE's tensor
    # names (transformer.h.N.attn.attention.*, ln_1, mlp.c_fc_0), renamed as they load and back as they save,
    # and config.json names settings its own way (num_layers, layer_norm_epsilon, activation_function), which a
    # cut writes back (export.checkpoint.keep_released_words): llama.cpp's converters read them
    "exaone": _LLAMA,
    "ministral3": _LLAMA,
    "olmo": _LLAMA,
    "cwm": replace(_LLAMA, per_layer_config=("layer_types",)),
    "glm": replace(_LLAMA, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")),
    # Arcee AFM and Apertus: an ungated FFN (up, activation, down); Jais 2 too, with LayerNorms.
    "arcee": replace(_LLAMA, lora_targets=_UNGATED_LORA),
    "apertus": _APERTUS,
    # Apertus 1.5's text decoder (after surgery extract-text): Apertus's block; its output layer may keep only
    # the text rows of the vocabulary (output_vocab_size), fewer than the embeddings
    "apertus1p5_text": replace(_APERTUS, output_rows_config="output_vocab_size"),
    "jais2": replace(_LLAMA, lora_targets=_UNGATED_LORA),
    # StableLM 2 1.6B and 3B are Llama's block; the 12B's is parallel (use_parallel_residual), one norm for both
    "stablelm": replace(_LLAMA, variants=(("use_parallel_residual", True, tuple(_PARALLEL.items())),)),
    # Command R, R+ (cohere), Command R7B, A (cohere2) and Cohere's MoE (cohere2_moe): a parallel block,
    # attention and FFN both read one normed input and add their outputs to the stream together, so
    # each is still a sublayer that adds to it (the shared norm goes with the block). Cohere 2's
    # full-attention layers have no rotary embedding, which llama.cpp places every 4th layer.
    # GPT-NeoX (Pythia): parallel where use_parallel_residual says so (its default), each sublayer with its own norm
    "gpt_neox": replace(_LLAMA, layers="gpt_neox.layers", attention="attention", final_norm="gpt_neox.final_layer_norm",
                        attention_output="dense", mlp_output="dense_4h_to_h", parallel=True,
                        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                        variants=(("use_parallel_residual", False, (("parallel", False),)),)),
    # GPT-J and CodeGen: a parallel block under transformer.h, one LayerNorm both read (ln_1)
    "gptj": replace(_LLAMA, **_GPTJ, lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")),
    "codegen": replace(_LLAMA, **_GPTJ, lora_targets=("qkv_proj", "out_proj", "fc_in", "fc_out")),
    # StarCoder (1) and SantaCoder: GPT-2's block with linear layers and multi-query attention, learned positions
    "gpt_bigcode": replace(_LLAMA, layers="transformer.h", attention="attn", attention_norms=("ln_1",), mlp_norms=("ln_2",),
                           final_norm="transformer.ln_f", attention_output="c_proj", mlp_output="c_proj",
                           lora_targets=("c_attn", "c_proj", "c_fc")),
    # GPT-2 (and its Cerebras-GPT, DistilGPT2 releases): StarCoder's block with Conv1D layers ([in, out] weights),
    # its output layer tied to the embeddings. With scale_attn_by_inverse_layer_idx each block divides its attention
    # scores by its index plus one, which a block cut would change for every later block: refused.
    "gpt2": replace(_LLAMA, layers="transformer.h", attention="attn", attention_norms=("ln_1",), mlp_norms=("ln_2",),
                    final_norm="transformer.ln_f", attention_output="c_proj", mlp_output="c_proj",
                    lora_targets=("c_attn", "c_proj", "c_fc"),
                    refused_configs=(("scale_attn_by_inverse_layer_idx", True, "each block scales its attention by its "
                                      "index, which a block cut would change for every later block"),)),
    # Falcon 7B and Falcon 2 11B: a parallel block with one norm; 40B and 180B (new_decoder_architecture):
    # a norm for each of the two; the sequential variant (parallel_attn false): Llama's norms
    "falcon": replace(_LLAMA, **_PARALLEL, layers="transformer.h", attention="self_attention", final_norm="transformer.ln_f",
                      attention_output="dense", mlp_output="dense_4h_to_h", block_outputs=2,
                      lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                      variants=((None, _falcon_two_norms, (("attention_norms", ("ln_attn",)), ("mlp_norms", ("ln_mlp",)),
                                                           ("shared_norms", ()))),
                                ("parallel_attn", False, (("attention_norms", ("input_layernorm",)),
                                                          ("mlp_norms", ("post_attention_layernorm",)), ("shared_norms", ()),
                                                          ("parallel", False))))),
    # OPT (125M to 66B, 175B): a pre-norm block whose FFN lies in the block itself (fc1, its activation, fc2): fc2,
    # which writes to the stream, is the sublayer's module, and its norm and fc1 go with it; learned positions
    # before the first block. OPT-350M's post-norm blocks and input/output projections are refused.
    "opt": replace(_OPT_BLOCK, layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
                   refused_configs=(("do_layer_norm_before", False, "its norms follow each sublayer's addition to the stream "
                                     "(OPT-350M), so removing a sublayer would still normalise the stream"),
                                    (None, _projects_embeddings, "its embeddings are narrower than its blocks (word_embed_proj_dim, "
                                     "OPT-350M), which the final norm's path does not follow"))),
    # GPT-Neo (125M to 2.7B): GPT-2's block with linear layers, global and local attention layers listed in
    # attention_layers, which transformers expands from attention_types (repeated patterns)
    "gpt_neo": replace(_LLAMA, layers="transformer.h", attention="attn", attention_norms=("ln_1",), mlp_norms=("ln_2",),
                       final_norm="transformer.ln_f", attention_output="attention.out_proj", mlp_output="c_proj", block_outputs=2,
                       per_layer_config=("attention_layers",), expanded_config=(("attention_layers", "attention_types"),),
                       lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")),
    # BLOOM (560M to 176B, BLOOMZ): ALiBi; its attention and its FFN each add the stream to their own output, so the
    # attention's stand-in returns the stream and the FFN's output projection is its module (as MPT's)
    "bloom": replace(_LLAMA, layers="transformer.h", attention="self_attention", mlp="mlp.dense_4h_to_h",
                     mlp_norms=("mlp.dense_h_to_4h", "post_attention_layernorm"), final_norm="transformer.ln_f",
                     attention_output="dense", mlp_output="", block_outputs=2, attention_adds_residual=True,
                     lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                     refused_configs=(("apply_residual_connection_post_layernorm", True, "its blocks add the normed stream "
                                       "back, so a block without its sublayers would still change the stream"),
                                      (None, _sliced_projections, "slow_but_exact reads the output projections' weights "
                                       "slice by slice, past the module a removed FFN leaves"))),
    # XGLM (564M to 7.5B) and BioGPT: OPT's pre-norm block (its FFN in the block itself), sinusoidal or learned
    # positions before the first block; BioGPT's output layer is named output_projection
    "xglm": replace(_OPT_BLOCK, final_norm="model.layer_norm"),
    "biogpt": replace(_OPT_BLOCK, layers="biogpt.layers", final_norm="biogpt.layer_norm", lm_head="output_projection"),
    # MPT (7B, 30B): ALiBi, one norm before each sublayer; its FFN adds the stream to its own output, so its output
    # projection is the sublayer's module (zeros in its place leave the stream) and its input projection goes with it
    "mpt": replace(_LLAMA, layers="transformer.blocks", attention="attn", attention_norms=("norm_1",), mlp="ffn.down_proj",
                   mlp_norms=("ffn.up_proj", "norm_2"), final_norm="transformer.norm_f", attention_output="out_proj", mlp_output="",
                   block_outputs=2, positions_config="max_seq_len", lora_targets=("Wqkv", "out_proj", "up_proj", "down_proj")),
    # Persimmon (Adept Persimmon-8B, Fuyu's decoder): LayerNorms, a fused query-key-value projection, a squared-ReLU FFN
    "persimmon": replace(_LLAMA, final_norm="model.final_layernorm", attention_output="dense", mlp_output="dense_4h_to_h",
                         lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    # Phi-1, 1.5 and 2: a parallel block as Cohere's, LayerNorms, an output layer with a bias
    "phi": replace(_LLAMA, **_PARALLEL, final_norm="model.final_layernorm", attention_output="dense", mlp_output="fc2",
                   lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "cohere": replace(_LLAMA, **_COHERE),
    # Cohere's North Vision decoder (CohereCompass): Cohere 2's parallel blocks and sliding layers
    "cohere_compass_text": replace(_LLAMA, **_COHERE, per_layer_config=("layer_types",)),
    "cohere2": replace(_LLAMA, **_COHERE, per_layer_config=("layer_types",),
                       fixed_patterns=(FixedPattern("layer_types", "full_attention", 4, "llama.cpp", "full attention and no "
                                                    "rotary embedding (a sliding window and rotary embedding to the others)"),)),
    "cohere2_moe": replace(_MOE, **_COHERE, per_layer_config=("layer_types", "mlp_layer_types"),
                           prefix_count_config=("first_k_dense_replace",), moe_outputs=_SHARED_EXPERTS),
    "nanochat": replace(_LLAMA, mlp_output="fc2", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
                        logit_softcap_config="final_logit_softcapping"),
    # VaultGemma: Gemma 2's block with a pre-norm only before each sublayer.
    "vaultgemma": replace(_LLAMA, mlp_norms=("pre_feedforward_layernorm",), per_layer_config=("layer_types",),
                          logit_softcap_config="final_logit_softcapping"),
    # GLM-4: a norm after each sublayer as well as before (named differently from Gemma's).
    "glm4": replace(_LLAMA, attention_norms=("input_layernorm", "post_self_attn_layernorm"),
                    mlp_norms=("post_attention_layernorm", "post_mlp_layernorm"), attention_output=None,
                    mlp_output=None, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")),
    "olmo2": _POST_NORM,
    "olmo3": replace(_POST_NORM, per_layer_config=("layer_types",),  # llama.cpp runs OLMo 3 as its olmo2
                     fixed_patterns=(FixedPattern("layer_types", "full_attention", 4, "llama.cpp", _FULL),)),
    # OLMo-Hybrid: OLMo 3's post-norm attention blocks between pre-norm Gated DeltaNet ones, whose
    # output projections alone (the Gated DeltaNet's and the FFN's) are followed by no norm: a bridge folds there.
    "olmo_hybrid": replace(_POST_NORM, linear_attention="linear_attn", linear_attention_output="o_proj",
                           per_layer_config=("layer_types",),
                           linear_block_norms=(("input_layernorm",), ("post_attention_layernorm",)), linear_block_mlp_output="down_proj",
                           lora_targets=(*_ATTENTION_ONLY_LORA, *_OLMO_LINEAR_LORA, "gate_proj", "up_proj", "down_proj"),
                           lora_may_lack=(_OLMO_LINEAR_LORA,)),
    "exaone4": replace(_POST_NORM, per_layer_config=("layer_types",),  # llama.cpp: windows only for the 64-layer 32B
                       fixed_patterns=(FixedPattern("layer_types", "full_attention", 4, "llama.cpp", _FULL, only_at=64),)),
    # NVIDIA's Nemotron-4 and Minitron: Llama's block with an ungated squared-ReLU FFN and LayerNorm1P
    "nemotron": replace(_LLAMA, lora_targets=_UNGATED_LORA),
    # Granite with sliding-window layers, each layer its own RoPE base (layer_rope_theta)
    "granite_swa": replace(_LLAMA, logit_divisor_config="logits_scaling", per_layer_config=("layer_types", "layer_rope_theta")),
    "granitemoe_swa": replace(_MOE, mlp="block_sparse_moe", logit_divisor_config="logits_scaling",
                              per_layer_config=("layer_types", "layer_rope_theta")),
    # Granite 3 MoE with a shared MLP beside the routed experts (shared_mlp, absent where its size is 0)
    "granitemoeshared": replace(_MOE, mlp="block_sparse_moe", logit_divisor_config="logits_scaling",
                                mlp_companions=(("shared_mlp", "output_linear"),)),
    # FlexOlmo: OLMo 2's norms on each sublayer's output, an MoE FFN
    "flex_olmo": replace(_MOE, attention_norms=("post_attention_layernorm",), mlp_norms=("post_feedforward_layernorm",),
                         attention_output=None, moe_outputs=()),
    # Kolibri 1: GLM-4's norm before and after each sublayer, sliding windows, shared experts beside routed ones
    "kolibri1": replace(_MOE, attention_norms=("input_layernorm", "post_self_attn_layernorm"),
                        mlp_norms=("post_attention_layernorm", "post_mlp_layernorm"), attention_output=None, moe_outputs=(),
                        per_layer_config=("layer_types",)),
    # A.X K1: DeepSeek's latent attention (its query always factored), dense FFNs then experts whose sum is
    # normed inside the FFN (post_mlp_layernorm), so no bridge folds there
    "axk1": replace(_MOE, per_layer_config=("mlp_layer_types",), moe_outputs=(), lora_targets=_MLA_ONLY_LORA + ("o_proj",)),
    # A.X K2: DeepSeek-V3.2's layout (an indexer in each attention; one projection, q_gate_proj, makes its
    # query and an output gate) with gated norms (an RMSNorm and a small gate MLP before the attention,
    # and before each MoE FFN)
    "axk2": replace(_MOE, per_layer_config=("mlp_layer_types", "layer_types"), moe_outputs=_SHARED_EXPERTS,
                    lora_targets=("q_a_proj", "q_gate_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    # Arcee's AFMoE (Trinity): a norm before and after each sublayer, dense FFNs first (num_dense_layers); LoRA
    # on the attention (peft refuses gate_proj, its output gate's name, as the experts fuse one of that name)
    "afmoe": replace(_MOE, attention_norms=("input_layernorm", "post_attention_layernorm"),
                     mlp_norms=("pre_mlp_layernorm", "post_mlp_layernorm"), attention_output=None, moe_outputs=(),
                     per_layer_config=("layer_types",), prefix_count_config=("num_dense_layers",),
                     fixed_patterns=(FixedPattern("layer_types", "full_attention", 4, "llama.cpp", _FULL),)),
    # DeepSeek-V3.2: V3's layout (its query always factored) with an indexer (sparse attention) inside each
    # attention, which goes with it
    "deepseek_v32": replace(_MOE, per_layer_config=("mlp_layer_types", "layer_types"), prefix_count_config=("first_k_dense_replace",),
                            moe_outputs=_SHARED_EXPERTS, lora_targets=_MLA_ONLY_LORA + ("o_proj",)),
    # GLM-5: DeepSeek-V3.2's layout, each block handing the next the keys its indexer selected; GLM-5.2's
    # "shared" layers reuse the nearest earlier "full" layer's selection instead of running an indexer
    "glm_moe_dsa": replace(_MOE, per_layer_config=("mlp_layer_types", "layer_types", "indexer_types"),
                           prefix_count_config=("first_k_dense_replace",), moe_outputs=_SHARED_EXPERTS,
                           lora_targets=_MLA_ONLY_LORA + ("o_proj",), block_outputs=2, carried=("prev_topk_indices",),
                           shared_attention=SharedSelection()),
    # dots3 Note's text decoder (extract-text; its released config.json is flat): DeepSeek-V3.2's block with a
    # per-head sigmoid output gate (g_proj) and a norm on the rotary key; sliding-window layers with their own
    # head count and latent ranks (transformers' per_layer_config, built from the released swa_* keys, which a
    # cut writes back for the engines that read them); dense FFNs then routed experts beside shared ones, by
    # mlp_layer_types (transformers derives it from first_k_dense_replace and moe_layer_freq and keeps only the list)
    "dots3_note_text": replace(_MOE, per_layer_config=("layer_types", "mlp_layer_types"), moe_outputs=_SHARED_EXPERTS,
                               lora_targets=(*_MLA_ONLY_LORA, "o_proj", "g_proj"),
                               released_config_keys=("swa_num_attention_heads", "swa_num_key_value_heads", "swa_q_lora_rank",
                                                     "swa_kv_lora_rank", "swa_head_dim", "swa_qk_nope_head_dim",
                                                     "swa_qk_rope_head_dim", "swa_v_head_dim", "swa_rope_theta")),
    # Hunyuan 3, MiMo-V2-Flash, Laguna: dense FFNs then routed experts, each layer's kind listed
    "hy_v3": replace(_MOE, per_layer_config=("mlp_layer_types",), moe_outputs=_SHARED_EXPERTS),
    "mimo_v2_flash": replace(_MOE, per_layer_config=("layer_types", "mlp_layer_types"), moe_outputs=("experts.down_proj", "down_proj")),
    "laguna": replace(_MOE, per_layer_config=("layer_types", "num_attention_heads_per_layer", "mlp_layer_types"),
                      moe_outputs=_SHARED_EXPERTS),
    "mixtral": _MOE,
    "qwen2_moe": replace(_QWEN_MOE, per_layer_config=("layer_types",)),  # its max_window_layers is no prefix count
    "qwen3_moe": _QWEN_MOE,
    "olmoe": _MOE,
    "phimoe": _MOE,
    "gpt_oss": replace(_MOE, per_layer_config=("layer_types",), mlp_extra_outputs=1,
                       fixed_patterns=(FixedPattern("layer_types", "full_attention", 2, "llama.cpp and vLLM", _FULL),)),
    "granitemoe": replace(_MOE, mlp="block_sparse_moe", logit_divisor_config="logits_scaling"),
    # Falcon-H1: a Mamba-2 mixer beside the attention in every block, both reading the same normed
    # input: one sublayer. Its muP multipliers scale outputs linearly, so bridges fold.
    "falcon_h1": replace(_LLAMA, attention_companions=(("mamba", "out_proj"),), mlp="feed_forward",
                         mlp_norms=("pre_ff_layernorm",), final_norm="model.final_layernorm",
                         logit_multiplier_config="lm_head_multiplier", unquantized=("mamba.out_proj",), block_outputs=1,
                         lora_targets=(*_LLAMA.lora_targets, *_MAMBA_LORA)),
    # Granite 4.0-H: Mamba-2 blocks between attention ones (layer_types; released configs say "mamba"
    # and "attention", which transformers reads as linear_attention and full_attention); each FFN
    # is a shared MLP plus, in the MoE sizes, routed experts beside it. LoRA reaches all but the experts.
    "granitemoehybrid": replace(_LLAMA, linear_attention="mamba", linear_attention_output="out_proj", per_layer_config=("layer_types",),
                                mlp="shared_mlp", mlp_output="output_linear",
                                mlp_companions=(("block_sparse_moe", "experts.down_proj"),),
                                logit_divisor_config="logits_scaling", unquantized=("mamba.out_proj",),
                                lora_targets=(*_ATTENTION_ONLY_LORA, *_MAMBA_LORA, "input_linear", "output_linear"),
                                lora_may_lack=(_ATTENTION_ONLY_LORA, _MAMBA_LORA)),
    # Bamba: Mamba-2 blocks between attention ones, placed by attn_layer_indices (transformers derives
    # layer_types from it); a gated FFN after each, pre-normed by pre_ff_layernorm.
    "bamba": replace(_LLAMA, linear_attention="mamba", linear_attention_output="out_proj", layer_index_config=("attn_layer_indices",),
                     attention_index_config="attn_layer_indices", mlp="feed_forward", mlp_norms=("pre_ff_layernorm",),
                     final_norm="model.final_layernorm", unquantized=("mamba.out_proj",), block_outputs=2,
                     lora_targets=(*_ATTENTION_ONLY_LORA, *_MAMBA_LORA, "gate_proj", "up_proj", "down_proj"),
                     lora_may_lack=(_ATTENTION_ONLY_LORA, _MAMBA_LORA)),
    # Jamba (AI21: Jamba 1.5 to 1.7, Jamba Reasoning): Mamba blocks between attention ones and MoE FFNs
    # between dense ones, both placed by a period and an offset alone (period_configs); LoRA and 4-bit
    # healing treat its Mamba mixer as Bamba's.
    "jamba": replace(_MOE, linear_attention="mamba", linear_attention_output="out_proj", mlp="feed_forward",
                     mlp_norms=("pre_ff_layernorm",), final_norm="model.final_layernorm", moe_outputs=("experts.down_proj", "down_proj"),
                     period_configs=(PeriodRule("attn_layer_period", "attn_layer_offset"),
                                     PeriodRule("expert_layer_period", "expert_layer_offset", count="num_experts")),
                     unquantized=("mamba.out_proj",), lora_targets=(*_ATTENTION_ONLY_LORA, *_MAMBA_LORA),
                     lora_may_lack=(_ATTENTION_ONLY_LORA, _MAMBA_LORA)),
    # Mamba, Mamba-2 (Codestral Mamba) and Falcon Mamba: every block a norm and a Mamba mixer, no
    # attention and no FFN; LoRA and 4-bit healing treat the mixer as Bamba's.
    "mamba": _MAMBA,
    "mamba2": _MAMBA,
    "falcon_mamba": _MAMBA,
    # Nemotron-H (and Nemotron Nano 2, Nemotron 3): every block is one norm and one mixer, a Mamba-2
    # mixer, an attention, an MLP or an MoE by its block_type; the mixer is the block's one sublayer.
    # Released configs give the types as hybrid_override_pattern ("M-M*-"), which vLLM reads.
    "nemotron_h": replace(_LLAMA, attention="mixer", linear_attention="mixer", mlp="mixer", attention_norms=("norm",),
                          mlp_norms=("norm",), final_norm="model.norm_f", linear_attention_output="out_proj",
                          moe_outputs=("experts.down_proj", "shared_experts.down_proj", "fc2_latent_proj"),
                          linear_block_marker=("block_type", "linear_attention"),
                          single_mixer=("block_type", (("linear_attention", "attn"), ("full_attention", "attn"), ("mlp", "mlp"),
                                                       ("moe", "mlp"))),
                          pattern_configs=(("hybrid_override_pattern", "layers_block_type"),
                                           ("mtp_hybrid_override_pattern", "mtp_layers_block_type")),
                          pattern_letters=(("linear_attention", "M"), ("full_attention", "*"), ("mlp", "-"), ("moe", "E")),
                          per_layer_config=("layers_block_type",), mtp_prefix="mtp.", unquantized=("mixer.out_proj",),
                          mtp_block_config=("mtp_layers_block_type", "mtp_hybrid_override_pattern"),
                          lora_targets=(*_ATTENTION_ONLY_LORA, *_MAMBA_LORA, "up_proj", "down_proj"),
                          lora_may_lack=(_ATTENTION_ONLY_LORA, _MAMBA_LORA, ("up_proj", "down_proj"))),
    # DeepSeek-V2/V3 / GLM-4.5: multi-head latent attention (DeepSeek), dense FFNs in the first k
    # layers, then routed experts beside shared ones. LoRA heals through attention alone: peft
    # turns FFN names of these families into the fused experts' parameters, which it cannot train
    # with dropout (tests/test_heal.py tries every family's targets).
    "deepseek_v3": _DEEPSEEK_MOE,
    "deepseek_v2": _DEEPSEEK_MOE,
    "sarvam_mla": _DEEPSEEK_MOE,  # Sarvam-105B: DeepSeek-V3's classes, its query one q_proj (no q_lora_rank)
    "glm4_moe": _GLM4_MOE,
    # Param2 (BharatGen) and Sarvam-30B: transformers runs them with GLM-4.5's classes (RoPE over the whole
    # head, q/k norms); their files keep Bailing's tensor names (word_embeddings, a fused query_key_value),
    # which transformers converts as it loads and back as it saves
    "param2moe": _GLM4_MOE,
    "sarvam_moe": _GLM4_MOE,
    # MiniCPM 5 MoE: DeepSeek-V3's experts (dense FFNs where mlp_layer_types says so) behind Llama's attention
    # with an output gate (q_gate_proj makes the query and the gate; o_proj writes the stream); none of
    # MiniCPM3's depth scaling or logit divisor. (transformers derives mlp_layer_types from
    # first_k_dense_replace and keeps only the list.)
    "minicpm5_moe": replace(_MOE, per_layer_config=("mlp_layer_types",), moe_outputs=_SHARED_EXPERTS,
                            lora_targets=("q_gate_proj", "k_proj", "v_proj", "o_proj")),
    # Kimi-Linear: Kimi Delta Attention blocks between latent-attention (MLA) ones, both named
    # self_attn (block_type tells them apart); DeepSeek-style routed and shared experts, dense first.
    "kimi_linear": replace(_MOE, linear_attention="self_attn", linear_attention_output="o_proj",
                           linear_block_marker=("block_type", "linear_attention"),
                           per_layer_config=("layer_types", "mlp_layer_types"), moe_outputs=_SHARED_EXPERTS,
                           lora_targets=(*_LATENT_ATTENTION_LORA, *_KDA_LORA),
                           lora_may_lack=(_MLA_ONLY_LORA, _KDA_LORA, ("q_a_proj", "q_b_proj", *_KDA_LORA))),
    # Ling/Ring 2.5 (bailing_hybrid): Kimi-Linear's layout in groups of layer_group_size blocks, the
    # last of each MLA, from which transformers derives layer_types where config.json lists none;
    # its MTP modules are extra blocks after the last.
    "bailing_hybrid": replace(_MOE, linear_attention="self_attn", linear_attention_output="o_proj",
                              linear_block_marker=("block_type", "linear_attention"),
                              per_layer_config=("layer_types", "mlp_layer_types", "expert_swiglu_limit_list",
                                                "share_expert_swiglu_limit_list"),
                              prefix_count_config=("first_k_dense_replace",),
                              step_rule=StepRule("layer_types", "layer_group_size",
                                                 "loaders that derive its layer_types from layer_group_size", marker="full_attention"),
                              moe_outputs=_SHARED_EXPERTS,
                              lora_targets=("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "g_proj", *_BAILING_KDA_LORA),
                              lora_may_lack=(("kv_a_proj_with_mqa", "kv_b_proj"), _BAILING_KDA_LORA)),
    # dots.llm1: DeepSeek's layout with Qwen's sliding-window prefix; Solar Open: every layer routed.
    "dots1": replace(_MOE, per_layer_config=("layer_types",), prefix_count_config=("first_k_dense_replace", "max_window_layers"),
                     moe_outputs=_SHARED_EXPERTS),
    "solar_open": replace(_MOE, moe_outputs=_SHARED_EXPERTS),
    "ernie4_5_moe": replace(_MOE, moe_outputs=_SHARED_EXPERTS,
                            moe_range_config=("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")),
    "minimax_m2": replace(_MOE, per_layer_config=("attn_type_list",)),  # the released config lists it; transformers ignores it
    # GLM-4.7-Flash (DeepSeek's latent attention) and K-EXAONE: each layer's FFN kind listed per layer.
    # (their released configs also carry the keys other loaders read: first_k_dense_replace, is_moe_layer)
    "glm4_moe_lite": replace(_MOE, per_layer_config=("mlp_layer_types",), prefix_count_config=("first_k_dense_replace",),
                             moe_outputs=_SHARED_EXPERTS, lora_targets=_LATENT_ATTENTION_LORA,
                             lora_may_lack=QUERY_LAYOUTS),
    # DBRX: attention and both norms in one module (norm_attn_norm), the second norm the FFN's; its
    # experts' down projections stacked flat, [experts x intermediate, hidden]
    "dbrx": replace(_MOE, layers="transformer.blocks", attention="norm_attn_norm.attn", mlp="ffn",
                    attention_norms=("norm_attn_norm.norm_1",), mlp_norms=("norm_attn_norm.norm_2",), final_norm="transformer.norm_f",
                    attention_output="out_proj", moe_outputs=("experts.mlp.w2",), experts_output_last=True,
                    lora_targets=("Wqkv", "out_proj")),
    # Mellum 2 (JetBrains): Qwen3's attention on full and sliding layers, MoE and dense FFNs by mlp_layer_types,
    # one MTP module kept under mtp. and counted as num_nextn_predict_layers
    "mellum": replace(_MOE, per_layer_config=("layer_types", "mlp_layer_types"), moe_outputs=("experts.down_proj", "down_proj"),
                      mtp_prefix="mtp."),
    # Flint: Qwen3-MoE's block with attention sinks, full and sliding layers and an always-on shared expert
    "flint": replace(_QWEN_MOE, per_layer_config=("layer_types",)),
    # Aria's text decoder (after surgery extract-text): routed experts stored [experts, in, out] and shared experts
    "aria_text": replace(_MOE, moe_outputs=("experts.down_proj", "shared_experts.down_proj")),
    "exaone_moe": replace(_MOE, per_layer_config=("layer_types", "mlp_layer_types", "is_moe_layer"),
                          prefix_count_config=("first_k_dense_replace",),
                          moe_outputs=_SHARED_EXPERTS, mtp_prefix="mtp."),
    # Llama 4 (Scout, Maverick; their text decoder, after surgery extract-text): routed and shared
    # experts, dense FFNs interleaved (Maverick), chunked attention with no-RoPE layers between.
    "llama4_text": replace(_MOE, mlp="feed_forward", per_layer_config=("no_rope_layers", "layer_types"),
                           layer_index_config=("moe_layers",),
                           step_rule=StepRule("moe_layers", "interleave_moe_layer_step", "vLLM and SGLang"),
                           mlp_extra_outputs=1, extra_outputs_flag="is_moe_layer",
                           moe_outputs=("experts.down_proj", "shared_expert.down_proj", "down_proj"), experts_output_last=True,
                           fixed_patterns=(FixedPattern("no_rope_layers", 0, 4, "llama.cpp",
                                                        _NO_ROPE + " (and full attention where the others are chunked)"),)),
    "hunyuan_v1_moe": replace(_MOE, moe_outputs=("experts.down_proj", "shared_mlp.down_proj"),
                              per_layer_config=("moe_topk", "num_experts")),  # each an int, or a list per layer
    # Hybrid attention: three Gated DeltaNet blocks to each attention block (layer_types), MTP under
    # `mtp.`. Qwen3-Next routes Qwen-MoE style; Qwen3.5 (its text decoder, after extract-text) is
    # dense or routes in every block.
    "qwen3_next": replace(_QWEN_MOE, **{**_HYBRID, "mtp_count_config": ("num_nextn_predict_layers", "mtp_num_hidden_layers")},
                          lora_targets=(*_ATTENTION_ONLY_LORA, *_NEXT_LINEAR_LORA),
                          lora_may_lack=(_ATTENTION_ONLY_LORA, _NEXT_LINEAR_LORA)),
    "qwen3_5_text": replace(_LLAMA, **_HYBRID, lora_targets=(*_ATTENTION_ONLY_LORA, *_QWEN35_LINEAR_LORA, "gate_proj", "up_proj",
                                                             "down_proj"),
                            lora_may_lack=(_ATTENTION_ONLY_LORA, _QWEN35_LINEAR_LORA)),
    "qwen3_5_moe_text": replace(_MOE, **_HYBRID, moe_outputs=("experts.down_proj", "shared_expert.down_proj"),
                                lora_targets=(*_ATTENTION_ONLY_LORA, *_QWEN35_LINEAR_LORA),
                                lora_may_lack=(_ATTENTION_ONLY_LORA, _QWEN35_LINEAR_LORA)),
    # Lara-4-Mini (Translated): Qwen3.5's Gated DeltaNet blocks between attention ones (its full-attention
    # layers have no rotary embedding, its sliding ones do), routed experts and an ungated shared expert in
    # every block; no MTP modules and no full_attention_interval
    "lara_mini": replace(_MOE, linear_attention="linear_attn", linear_attention_output="out_proj", per_layer_config=("layer_types",),
                         moe_outputs=("experts.down_proj", "shared_expert.down_proj"),
                         lora_targets=(*_ATTENTION_ONLY_LORA, *_QWEN35_LINEAR_LORA),
                         lora_may_lack=(_ATTENTION_ONLY_LORA, _QWEN35_LINEAR_LORA)),
    # LFM2 and LFM3 (Liquid): short-convolution blocks between attention ones; LFM2-MoE's first
    # blocks dense; LFM3 norms each sublayer's output as well (no bridge folds through a norm).
    "lfm3": replace(replace(_LLAMA, **_LFM2), attention_norms=("operator_norm", "post_operator_norm"),
                    mlp_norms=("ffn_norm", "post_ffn_norm"), attention_output="o_proj", mlp_output="w2",
                    output_norms=(("attn", "post_operator_norm"), ("mlp", "post_ffn_norm")),  # (its attention's is o_proj)
                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "in_proj", "w1", "w2", "w3"),
                    lora_may_lack=(("q_proj", "k_proj", "v_proj", "o_proj"), ("in_proj", "out_proj"))),
    "lfm2": replace(_LLAMA, **_LFM2, mlp_output="w2", lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1",
                                                                    "w2", "w3")),
    "lfm2_moe": replace(_MOE, **_LFM2, moe_outputs=("experts.down_proj", "w2"), prefix_count_config=("num_dense_layers",),
                        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "in_proj")),
    # xLSTM (xLSTM-7B): pre-norm blocks of an mLSTM layer, which takes the block's recurrent state and returns it
    # updated (the model copies it into its own cache, by block position), then a gated FFN; soft-capped logits.
    # Both num_hidden_layers and num_blocks count the blocks.
    "xlstm": replace(_LLAMA, layers="backbone.blocks", attention="mlstm_layer", mlp="ffn", attention_norms=("norm_mlstm",),
                     mlp_norms=("norm_ffn",), final_norm="backbone.out_norm", attention_output="out_proj", mlp_output="proj_down",
                     logit_softcap_config="output_logit_soft_cap", block_outputs=2, attention_returns_state=True,
                     prefix_count_config=("num_blocks",),  # (every block is below the count: a cut writes the blocks kept)
                     lora_targets=("q", "k", "v", "ogate_preact", "out_proj", "proj_up_gate", "proj_up", "proj_down")),
    # RecurrentGemma (Griffin: recurrentgemma-2b, -9b): every block a pre-norm temporal mixer, an RG-LRU recurrence
    # behind a short convolution (block_types "recurrent") or a local attention ("attention"), both named
    # temporal_block and both returning (output, None), so one stand-in serves both; then a gated FFN (mlp_block).
    # The recurrences keep their state in their own modules, not in the cache. block_types is a pattern repeated to
    # the layer count (the 2B's file says _block_types, which transformers 5 ignores and transformers 4 and mlx-lm
    # read): a cut writes both as the kept blocks' list. Soft-capped logits.
    "recurrent_gemma": replace(_LLAMA, attention="temporal_block", mlp="mlp_block", attention_norms=("temporal_pre_norm",),
                               mlp_norms=("channel_pre_norm",), final_norm="model.final_norm",
                               linear_attention="temporal_block", linear_attention_output="linear_out",
                               logit_softcap_config="logits_soft_cap", tiled_config=("block_types", "_block_types"),
                               lora_targets=(*_RG_ATTENTION_LORA, *_RG_RECURRENT_LORA, "gate_proj", "up_proj", "down_proj"),
                               lora_may_lack=(_RG_ATTENTION_LORA, _RG_RECURRENT_LORA)),
}


# Model types whose models are, in memory, another family's modules: surgery's Nemotron-NAS (DeciLM)
# classes are transformers' Llama with stand-ins (surgery.hf_modeling.decilm_classes).
MODULE_ALIASES = {"nemotron-nas": "llama"}

# Families whose blocks are not "the stream plus what each sublayer adds", so that no table entry can
# say what removing a block or a sublayer is: each is refused with why, not as merely unknown.
_HYPER_CONNECTIONS = ("hyper-connections mix several residual streams in every block, so a block without its sublayers "
                      "still changes the stream and is not removed by taking it out")
_QWEN4_EXP = ("each block's n-gram embedding table depends on its rank among the blocks that have one (ple_layer_ids), "
              "which a cut changes for every later block, and its stream is four streams wide (hyper-connections)")
_SCALED_RESIDUAL = "{} scales the residual stream itself in every sublayer, so a removed sublayer is not the identity"
_GEMMA3N = "its blocks carry four streams (AltUp) and a Laurel branch beside the attention"
_LOOPED_INKLING = ("each block reads the stream through learned attention over earlier blocks' states, and its middle layers "
                   "run several times")
_GROUPED_RESIDUALS = ("each block reads its input through learned attention over the sums of earlier groups of "
                      "n_layers_per_attn_res_block blocks, and the first block of each group restarts the stream, so "
                      "removing a block regroups every later one")
NOT_REMOVABLE = {
    "gemma3n": _GEMMA3N,
    "gemma3n_text": _GEMMA3N,
    "deepseek_v4": _HYPER_CONNECTIONS,
    "hy_v4": _HYPER_CONNECTIONS,
    "qwen4_exp": _QWEN4_EXP,
    "qwen4_exp_text": _QWEN4_EXP,
    "kolibri1_1": ("its layers read other layers' keys and values (kv_source_layers) and an earlier indexer's key pool "
                   "(index_layers), two kinds of sharing a cut would have to keep at once"),
    "ergo": _SCALED_RESIDUAL.format("a per-channel gate"),
    "zaya": _SCALED_RESIDUAL.format("a learned affine scale") + ", and its router carries state from block to block",
    "doge": _SCALED_RESIDUAL.format("a learned scale"),
    "minimax": _SCALED_RESIDUAL.format("MiniMax-01 (alpha and beta)"),
    "dory": "each block pulls the stream towards its sublayers' outputs instead of adding them, and its middle layers run "
            "several times",
    "inkling2_loop": _LOOPED_INKLING,
    "inkling2_loop_text": _LOOPED_INKLING,
    "zamba": ("its hybrid blocks add the output of one transformer they all share to their Mamba mixer's input, not to "
              "the stream, so no part of a block but its mixer can go, and the shared weights are stored with the first "
              "hybrid block"),
    "zamba2": ("its hybrid blocks take turns at num_mem_blocks shared transformers, each turn with its own adapters picked "
               "by the block's rank among the hybrid blocks, so removing one changes the weights every later one runs; and "
               "a shared transformer's output joins its block's Mamba input, not the stream"),
    "inkling2": _GROUPED_RESIDUALS,
    "inkling2_text": _GROUPED_RESIDUALS,
    "diffllama": "each attention's lambda depends on its block's index, which a cut changes for every later block",
    "longcat_flash": ("each block holds two attentions (KV-cache slots 2i and 2i+1) and two FFNs, and an MoE that reads the "
                      "stream after the first attention adds its output at the block's end"),
    "hrm_text": ("its blocks form two stacks that run in loops, and num_hidden_layers counts the blocks' runs, not the "
                 "blocks"),
}


def base_model_type(config: Any) -> str:
    """The family of a config (object or config.json dict); a surgery checkpoint reports the
    family it was cut from."""
    model_type = config_value(config, "model_type") or ""
    if model_type.startswith(SURGERY_MODEL_TYPE_PREFIX):
        return model_type[len(SURGERY_MODEL_TYPE_PREFIX) :]
    return model_type


def architecture_of(config: Any) -> Architecture:
    """The table entry for `config`, or a clear error naming the supported families."""
    model_type = base_model_type(config)
    model_type = MODULE_ALIASES.get(model_type, model_type)
    if model_type not in ARCHITECTURES and (decoder := text_family(config)):
        raise SurgeryError(f"'{model_type}' is a multimodal checkpoint: surgery works on its text decoder "
                           f"({decoder}); write that as a text-only checkpoint with "
                           "`surgery extract-text MODEL --out FOLDER`, then give FOLDER")
    if model_type in NOT_REMOVABLE:
        raise SurgeryError(f"{model_type} is not supported: {NOT_REMOVABLE[model_type]}")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise SurgeryError(
            f"architecture '{model_type or 'unknown'}' is not supported (supported: {supported}); "
            "to add one, describe its modules in ARCHITECTURES in surgery/arch.py"
        )
    arch = ARCHITECTURES[model_type]
    arch = next((replace(arch, **dict(fields)) for key, value, fields in arch.variants if _holds(config, key, value)), arch)
    for key, value, why in arch.refused_configs:
        if _holds(config, key, value):
            setting = "this config" if key is None else f"{key}={config_value(config, key)}"
            raise SurgeryError(f"{model_type} with {setting} is not supported: {why}")
    return arch


# multimodal text decoders transformers has no causal-LM class for -> the family whose text-only
# checkpoint computes the same on text: Qwen2-VL's and Qwen2.5-VL's decoder is Qwen2's block,
# Qwen3-VL's Qwen3's (interleaved), GLM-4.1V's and GLM-4.5V's GLM-4's and GLM-4.5's, HunYuan-VL's
# Hunyuan's dense one, and their M-RoPE is plain RoPE where the position ids agree, as on text (not
# PaddleOCR-VL's, whose M-RoPE rotates otherwise than ERNIE 4.5: its logits differ)
TEXT_DECODER_AS = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3", "qwen3_vl_moe_text": "qwen3_moe",
                   "glm4v_text": "glm4", "glm4v_moe_text": "glm4_moe", "hunyuan_vl_text": "hunyuan_v1_dense"}
# settings a multimodal text decoder's code fixes, which its text family reads from its config: Qwen3-VL-MoE's
# router always renormalises its top-k weights, Qwen3-MoE's where norm_topk_prob says so
TEXT_DECODER_FIXED = {"qwen3_vl_moe_text": {"norm_topk_prob": True}}
# multimodal families released with the text decoder's settings at the top of config.json (which
# transformers builds their text_config from) -> that text config's model type
FLAT_TEXT_CONFIGS = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text", "dots3_note": "dots3_note_text"}
# multimodal families whose model leaves out its text decoder's logit multiplier (transformers'
# Cohere2Vision applies no logit_scale, which Cohere's causal-LM classes do; AyaVision did not before
# 5.25): their decoder is written with the multiplier 1, so that it computes on text what the model computes
UNSCALED_LOGITS = frozenset({"cohere2_vision"})


def multimodal_text_config(config: Any) -> Any:
    """A multimodal config's text decoder settings (object or config.json dict): its text_config, or
    for FLAT_TEXT_CONFIGS the top level as that text config; None for a text-only config."""
    text = config_value(config, "text_config")
    kind = FLAT_TEXT_CONFIGS.get(base_model_type(config))
    if text is None and kind and isinstance(config, dict):
        return {**config, "model_type": kind}
    return text


def text_family(config: Any) -> str | None:
    """The supported family of a multimodal config's text decoder (Gemma 3's gemma3_text, Mistral
    3's mistral, Qwen2.5-VL's qwen2: TEXT_DECODER_AS), None for any other config."""
    text = multimodal_text_config(config)
    if text is None or base_model_type(config) in ARCHITECTURES:
        return None
    family = TEXT_DECODER_AS.get(base_model_type(text), base_model_type(text))
    return family if family in ARCHITECTURES else None


def get_module(root: Any, dotted: str) -> Any:
    """`get_module(model, "model.layers")`. Unwraps a peft model transparently."""
    node = root
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def unwrap(model: Any) -> Any:
    """The plain transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: Any, arch: Architecture | None = None) -> Any:
    """The `nn.ModuleList` of decoder blocks."""
    model = unwrap(model)
    arch = arch or architecture_of(model.config)
    return get_module(model, arch.layers)


def decoder_stack(model: Any, arch: Architecture | None = None) -> Any:
    """The module that embeds, runs the blocks and applies the final norm (`model.model`): the
    owner of `arch.layers`. Not `base_model`, which some families point elsewhere (Llama 4's
    text model names the multimodal model's `language_model`)."""
    model = unwrap(model)
    arch = arch or architecture_of(model.config)
    return get_module(model, arch.layers.rpartition(".")[0])


def num_layers(model: Any) -> int:
    return len(decoder_layers(model))


# ------------------------------------------------------------------ multi-token-prediction modules

@dataclass(frozen=True)
class MtpModules:
    """A checkpoint's multi-token-prediction (MTP) modules: drafting heads that serving engines
    (vLLM, SGLang, llama.cpp) load beside the model for speculative decoding, and transformers skips
    when it loads the model. A cut carries them unchanged, since the config still counts them."""

    tensors: dict[str, str]  # name in the checkpoint written -> name in the checkpoint read
    layers: int  # how many modules those tensors make


def _entry_or_default(config: Any) -> Architecture:
    """The table entry for `config`, or Llama's where the family is not supported (what the MTP
    questions below fall back to, as `surgery info` asks them before anything is refused)."""
    family = base_model_type(config)
    return ARCHITECTURES.get(MODULE_ALIASES.get(family, family), _LLAMA)


def mtp_count_keys(config: Any) -> tuple[str, ...]:
    """The config keys that may count a checkpoint's MTP modules (Architecture.mtp_count_config):
    the first is the one serving engines read for the family."""
    return _entry_or_default(config).mtp_count_config


def _holds(config: Any, key: str | None, value: Any) -> bool:
    """Whether `config`'s `key` has `value`, or `value` (a predicate) holds for it (for the whole
    config, where no key is named)."""
    found = config if key is None else config_value(config, key)
    return bool(value(found)) if callable(value) else found == value


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """`key` of a config object or of the dict read from config.json (`default` where it has none).
    A dict is read as transformers reads it: under the name the family's config class maps `key` to
    (GPT-2's n_layer for num_hidden_layers, DBRX's n_layers) where it lacks `key` itself, or under
    a name the class maps to `key` (EXAONE's files say num_layers for num_hidden_layers)."""
    if not isinstance(config, dict):
        return getattr(config, key, default)
    if key in config:
        return config[key]
    aliases = config_aliases(str(config.get("model_type") or ""))
    names = [aliases[key]] if key in aliases else [alias for alias, field in aliases.items() if field == key]
    return next((config[name] for name in names if name in config), default)


@functools.cache
def config_aliases(model_type: str) -> dict[str, str]:
    """The family's config class's `attribute_map`: {a name it reads: the name it keeps the setting under}
    (GPT-2's num_hidden_layers: n_layer; EXAONE's num_layers: num_hidden_layers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {})) if model_type in CONFIG_MAPPING else {}


def has_config_key(config: Any, key: str) -> bool:
    """Whether the config (object or config.json dict) itself holds `key`."""
    return key in config if isinstance(config, dict) else key in vars(config)


def mtp_count_key(config: Any) -> str:
    """The config key that counts a checkpoint's MTP modules: the first of the family's keys the
    config has, else the one serving engines read."""
    keys = mtp_count_keys(config)
    return next((key for key in keys if has_config_key(config, key)), keys[0])


def mtp_counted_from_files(config: Any) -> bool:
    """Whether the files, not the config, say how many MTP modules there are: the config names no
    count and the family keeps them under a prefix (whose names say which modules they are)."""
    entry = _entry_or_default(config)
    return bool(entry.mtp_prefix) and not any(has_config_key(config, key) for key in entry.mtp_count_config)


def mtp_layer_count(config: Any, names: Any = ()) -> int:
    """How many MTP modules the config (object or config.json dict) says the checkpoint holds; where
    the files say it (mtp_counted_from_files), those held under the prefix among tensor `names`."""
    if mtp_counted_from_files(config):
        prefix = f"{_entry_or_default(config).mtp_prefix}layers."
        held = {name[len(prefix):].partition(".")[0] for name in names if name.startswith(prefix)}
        return next(k for k in range(len(held) + 1) if str(k) not in held)
    key = mtp_count_key(config)
    value = config_value(config, key, 0)
    return value if isinstance(value, int) and value > 0 else 0


def mtp_modules(names: Any, config: Any, num_layers: int | None = None) -> MtpModules:
    """The MTP modules among a checkpoint's tensor `names` (its config.json: `config`), renamed for
    a checkpoint of `num_layers` blocks (default: as many). Serving engines read extra blocks at
    `num_hidden_layers` onwards (vLLM's mtp_start_layer_idx, llama.cpp's block count plus
    num_nextn_predict_layers), so a cut numbers them on after its last block; K-EXAONE's
    `mtp.layers.{k}` keep their names. Modules count from the first up to the first the files
    lack; a prefixed family's shared tensors (`mtp.fc`, `mtp.norm`) go with any.
    `config` is best the dict read from config.json: a config object counts the class's default
    (1 for DeepSeek-V3) where the file says nothing."""
    count = mtp_layer_count(config, names)
    if not count:
        return MtpModules({}, 0)
    arch = architecture_of(config)
    if arch.mtp_prefix:  # mtp.layers.{k}: numbered apart from the blocks
        blocks, first, start = f"{arch.mtp_prefix}layers.", 0, 0
    else:  # model.layers.{num_hidden_layers + k}
        blocks, first = f"{arch.layers}.", config_value(config, "num_hidden_layers")
        start = first if num_layers is None else num_layers
    span = next((len(value) for key in arch.mtp_block_config if (value := config_value(config, key))), 1)  # blocks a module
    by_module: dict[int, dict[str, str]] = {}
    seen: dict[int, set[int]] = {}
    shared: dict[str, str] = {}
    for name in names:
        index, dot, rest = name[len(blocks):].partition(".") if name.startswith(blocks) else ("", "", "")
        if dot and index.isdigit() and first <= int(index) < first + count * span:
            module = (int(index) - first) // span
            by_module.setdefault(module, {})[f"{blocks}{start + int(index) - first}.{rest}"] = name
            seen.setdefault(module, set()).add(int(index))
        elif arch.mtp_prefix and name.startswith(arch.mtp_prefix) and not name.startswith(blocks):
            shared[name] = name
    layers = next((k for k in range(count) if len(seen.get(k, ())) < span), count)
    tensors = {new: old for k in range(layers) for new, old in by_module[k].items()}
    return MtpModules({**tensors, **shared} if layers else {}, layers)


# ------------------------------------------------------------------ facts read from a config.json


def has_sliding_window(config: dict[str, Any]) -> bool:
    """Per-layer types where the family lists them (Qwen2/3), else one window for every layer (Mistral)."""
    layer_types = config.get("layer_types")
    if layer_types:
        return any(kind != "full_attention" for kind in layer_types)
    window = config.get("sliding_window")
    return bool(window) and config.get("use_sliding_window", True) and window < config_value(config, "max_position_embeddings", window + 1)


def rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, rope scaling) from either the transformers 5 `rope_parameters` or the older keys."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or ({k: v for k, v in params.items() if k != "rope_theta"} or None)
    if scaling and "rope_type" not in scaling and "type" in scaling:  # the older spelling, which transformers still reads
        scaling = {**scaling, "rope_type": scaling["type"]}
    return float(theta), scaling


# ------------------------------------------------------------------ config.json of a model folder


def read_config(path: Path, missing: str = "it is not a Hugging Face model folder") -> dict[str, Any]:
    """A model folder's config.json, or one line saying why it cannot be read (`missing`: what to do without one)."""
    if not (Path(path) / "config.json").is_file():
        raise SurgeryError(f"{path} has no config.json: {missing}")
    from surgery.files import read_json

    config = read_json(Path(path) / "config.json", "download or export the model again")
    if not isinstance(config, dict):
        raise SurgeryError(f"{path}/config.json is not a model configuration: download or export the model again")
    return config


def config_error(folder: Path, error: Exception) -> SurgeryError:
    """transformers validates a config's fields as it builds it (a layer count given as text, a hidden
    size the heads do not divide): its multi-line error as one line naming the file."""
    reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    return SurgeryError(f"{folder}/config.json is not a valid configuration ({reason}): fix it or download the model again")


def text_config(path: Path) -> dict[str, Any]:
    """config.json's decoder settings (a multimodal config nests them under text_config)."""
    config = read_config(path)
    return multimodal_text_config(config) or config


def quantization_method(config: Path | dict[str, Any]) -> str | None:
    """How config.json (a folder's, or the dict read from it) says the stored weights are quantised
    ('bitsandbytes', 'fp8', 'gptq', ...), None for full-precision weights: such files hold packed
    tensors, not the config's shapes."""
    quantization = (config if isinstance(config, dict) else read_config(config)).get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    return str(quantization.get("quant_method") or "unknown")


def trained_positions(config: Any) -> int | None:
    """The positions a model (config object or config.json's dict) was trained on, under its family's key."""
    value = config_value(config, _entry_or_default(config).positions_config)
    return value if isinstance(value, int) else None


def check_sequence_fits(path: Path, length: int, option: str) -> None:
    """Calibration or training sequences longer than the positions the model was trained on would
    score or train it where it never learned anything: refused before it loads."""
    trained = trained_positions(text_config(path))
    if trained is not None and length > trained:
        raise SurgeryError(f"{option} {length} is longer than the model's context ({trained} positions): "
                           f"give {trained} or less")


def config_layers(path: Path) -> int:
    """The decoder's block count as config.json states it: for checks before any weight loads."""
    config = text_config(path)
    types = _entry_or_default(config).block_types(config)
    if types is not None:  # (Nemotron-H: transformers 5 derives the count from the types and does not save it)
        return len(types)
    layers = config_value(config, "num_hidden_layers")
    if not isinstance(layers, int):
        raise SurgeryError(f"{path}/config.json has no num_hidden_layers: is it a decoder-only LLM?")
    return layers
