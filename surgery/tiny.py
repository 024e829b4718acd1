"""Tiny random models and a tiny tokenizer, built from configs in a second, for tests and benchmarks.

One config per supported family, small enough that a forward pass takes milliseconds on a CPU
but shaped like the real thing (grouped KV heads, sliding windows, MoE routing, sparse steps).
"""

from __future__ import annotations

from typing import Any

TINY_VOCAB = 384
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_LINEAR_ATTENTION = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                         linear_conv_kernel_dim=4, full_attention_interval=2)
# DeepSeek-V3's and GLM-4.5's experts (one group): routed ones beside a shared one
_ROUTED_AND_SHARED = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                      "n_group": 1, "topk_group": 1}
# DeepSeek's latent attention with a factored query, one latent KV per head as in the real configs
_LATENT = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8,
           "num_key_value_heads": 4}


def _full_then_sliding(layers: int) -> list[str]:
    return ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(layers)]


def _sliding_then_full(layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _lfm2_attention_blocks(layers: int) -> list[int]:
    return list(range(1, layers, 2))


def _lfm2_layer_types(layers: int) -> list[str]:
    return ["full_attention" if i % 2 else "conv" for i in range(layers)]


# Gemma 4 E2B's and E4B's layout (tiny_model("gemma4_text", n, **GEMMA4_E)): no experts, keys apart
# from values, a per-layer input in every block, and the last 3 layers attending to the keys and
# values of the last earlier layer of their type, with FFNs twice as wide
GEMMA4_E = {"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": TINY_VOCAB, "num_kv_shared_layers": 3,
            "use_double_wide_mlp": True, "enable_moe_block": False, "attention_k_eq_v": False,
            "num_global_key_value_heads": None}


TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 8, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 16},
    # Gemma 4 26B-A4B's layout: full-attention layers (the last always) with their own head size and
    # KV heads and no v_proj, routed experts beside every FFN; the 31B is the same without experts
    "gemma4_text": {"sliding_window": 8, "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                    "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0,
                    "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32,
                    "layer_types": lambda layers: ["full_attention" if i % 2 == 0 or i == layers - 1 else "sliding_attention"
                                                   for i in range(layers)]},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {"logits_scaling": 2.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    "ministral": {"sliding_window": 8},
    "smollm3": {"no_rope_layer_interval": 2},
    "starcoder2": {},
    "glm4": {},
    "minicpm3": {**_LATENT, "scale_depth": 1.4, "scale_emb": 12, "dim_model_base": 32},
    "hyperclovax": {"logits_scaling": 0.5, "residual_multiplier": 0.7, "embedding_multiplier": 2.0},
    "internlm3": {},
    "iquestcoder": {},
    "youtu": _LATENT,
    "ernie4_5": {},
    "seed_oss": {},
    "hunyuan_v1_dense": {},
    "helium": {},
    "ministral3": {},
    "olmo": {},
    "cwm": {"sliding_window": 8},
    "glm": {},
    "arcee": {},
    "apertus": {},
    "exaone": {},
    # its full-attention layers every other one and last, keys as values there; no layer reads another's keys and
    # values (tests/test_gemma4_e.py tries that rule on Gemma 4 E2B's layout)
    "gemma4_unified_text": {"sliding_window": 8, "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                            "final_logit_softcapping": 30.0, "num_kv_shared_layers": 0,
                            "layer_types": lambda layers: ["full_attention" if i % 2 == 0 or i == layers - 1 else "sliding_attention"
                                                           for i in range(layers)]},
    # llama3 rope as released, its original length below the tiny model's positions; the whole vocabulary
    # scored (random test tokens reach every row; tests/test_analysis.py prunes the head itself)
    "apertus1p5_text": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0}},
    "jais2": {},
    "nanochat": {},
    "stablelm": {"use_parallel_residual": False},  # StableLM 2 1.6B and 3B; the 12B's parallel blocks: a variant (tests)
    "gptj": {"rotary_dim": 8, "n_positions": 256},
    "codegen": {"rotary_dim": 8, "n_positions": 256},
    "gpt2": {"n_positions": 256, "tie_word_embeddings": True},
    "gpt_bigcode": {"n_positions": 256, "multi_query": True},
    "falcon": {"num_kv_heads": 2, "new_decoder_architecture": False, "parallel_attn": True, "bias": False, "alibi": False},
    "gpt_neox": {"rotary_pct": 0.5},  # Pythia: a parallel block, part of each head rotated
    "phi": {"partial_rotary_factor": 0.5, "qk_layernorm": True},  # Phi-2 rotates part of each head; qk_layernorm as some variants
    # Cohere ties its output layer to the embeddings; Command R+ norms each head's queries and keys
    "cohere": {"logit_scale": 0.5, "use_qk_norm": True, "tie_word_embeddings": True},
    "cohere2": {"logit_scale": 0.5, "sliding_window": 8, "tie_word_embeddings": True, "layer_types": _sliding_then_full},
    "cohere_compass_text": {"logit_scale": 0.5, "sliding_window": 8, "tie_word_embeddings": True, "layer_types": _sliding_then_full,
                            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
    "persimmon": {"qk_layernorm": True, "partial_rotary_factor": 0.5},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 128},
    "mpt": {"d_model": 64, "n_heads": 4, "expansion_ratio": 2, "max_seq_len": 128},
    "xglm": {"d_model": 64, "ffn_dim": 128, "attention_heads": 4, "max_position_embeddings": 128},
    "biogpt": {"max_position_embeddings": 128},
    "bloom": {"n_head": 4},
    "gpt_neo": {"attention_types": lambda layers: [[["global", "local"], layers // 2], *([[["global"], 1]] if layers % 2 else [])],
                "window_size": 4, "max_position_embeddings": 128},
    "cohere2_moe": {"logit_scale": 0.5, "sliding_window": 8, "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1,
                    "prefix_dense_intermediate_size": 96, "intermediate_size": 32, "sliding_window_pattern": 2,
                    "mlp_layer_types": lambda layers: ["dense"] + ["sparse"] * (layers - 1)},
    "vaultgemma": {"sliding_window": 8, "query_pre_attn_scalar": 16},
    "olmo3": {"sliding_window": 8},
    "exaone4": {"sliding_window": 8},
    "nemotron": {},
    "granite_swa": {"sliding_window": 8, "logits_scaling": 2.0, "residual_multiplier": 0.5,
                    "layer_types": _full_then_sliding},
    "granitemoe_swa": {"sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "logits_scaling": 2.0,
                       "layer_types": _full_then_sliding},
    "granitemoeshared": {"num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 48, "logits_scaling": 2.0},
    "flex_olmo": {"num_experts": 4, "num_experts_per_tok": 2},
    "kolibri1": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "sliding_window": 8},
    "axk1": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
             "n_group": 1, "topk_group": 1},
    "axk2": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
             "n_group": 1, "topk_group": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 64},
    # Trinity's heads are narrower than its width together, as the released sizes are
    "afmoe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_shared_experts": 1, "num_dense_layers": 1,
              "head_dim": 8, "sliding_window": 8,
              "layer_types": _sliding_then_full},
    "deepseek_v32": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                     "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                     "index_n_heads": 2, "index_head_dim": 16, "index_topk": 64},  # (as 2,048 in V3.2: every key of a short text)
    "glm_moe_dsa": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 64,  # (as 2,048 in GLM-5: every key of a short text)
                    # GLM-5.2's shared selection (its freq is 4): full L0-L2, L4; L3 reads L2's, L5 L4's
                    "index_topk_freq": 2, "index_skip_topk_offset": 3},
    "hy_v3": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_shared_experts": 1},
    "mimo_v2_flash": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "sliding_window": 8,
                      "layer_types": _full_then_sliding},
    "laguna": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "sliding_window": 8,
               "layer_types": _full_then_sliding,
               "num_attention_heads_per_layer": lambda layers: [4 if i % 2 == 0 else 2 for i in range(layers)]},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8},
    # Maverick's dense/MoE interleaving; no-RoPE layers apart from the MoE ones, with their temperature tuning at work
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128, "attention_chunk_size": 8,
                    "no_rope_layer_interval": 3, "interleave_moe_layer_step": 2, "floor_scale": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "logits_scaling": 2.0, "residual_multiplier": 0.5},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2,
                  "mlp_only_layers": []},
    "deepseek_v3": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1},
    "deepseek_v2": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "q_lora_rank": None},  # V2-Lite: one q_proj
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
              "first_k_dense_replace": 1, "sliding_window": 8, "max_window_layers": 2},
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_num_shared_experts": 1,
                     "moe_layer_start_index": 1},  # ERNIE-4.5-21B-A3B: a dense first block, then MoE ones
    "solar_open": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1},
    # Hunyuan-A13B lists its top-k per layer (a callable: one value per layer of the tiny model)
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": lambda layers: [1 + i % 2 for i in range(layers)]},
    "minimax_m2": {"num_local_experts": 4, "num_experts_per_tok": 2, "attn_type_list": lambda layers: [1] * layers},
    "glm4_moe_lite": {**_LATENT, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                      "n_group": 1, "topk_group": 1,
                      "mlp_layer_types": lambda layers: ["dense"] + ["sparse"] * (layers - 1), "first_k_dense_replace": 1},
    # DBRX's sizes under its own names; its attention reads rope_theta and clip_qkv from attn_config, as released
    "dbrx": {"d_model": 64, "n_heads": 4, "max_seq_len": 256, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    # Jamba places attention and MoE blocks every 8th and 2nd by default: here one attention block (L2)
    # and one MoE block (L1) in every 8, so that the family-wide tests' cuts keep both rules
    "jamba": {"num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 8, "attn_layer_offset": 2, "expert_layer_period": 8,
              "expert_layer_offset": 1, "mamba_d_state": 8, "mamba_expand": 2, "mamba_dt_rank": 8},
    "mamba": {"state_size": 8, "expand": 2, "time_step_rank": 8},
    "mamba2": {"state_size": 8, "expand": 2, "num_heads": 8, "head_dim": 16, "n_groups": 1, "chunk_size": 16},
    "falcon_mamba": {"state_size": 8, "expand": 2, "time_step_rank": 8},
    "mellum": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "sliding_window": 8,
               "layer_types": _sliding_then_full, "mlp_layer_types": lambda layers: ["dense"] + ["sparse"] * (layers - 1)},
    "flint": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
              "sliding_window": 8, "mlp_only_layers": [0], "layer_types": _full_then_sliding},
    "aria_text": {"moe_num_experts": 4, "moe_topk": 2, "moe_num_shared_experts": 1},
    "exaone_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_shared_experts": 1,
                   "sliding_window": 8, "first_k_dense_replace": 1,
                   "is_moe_layer": lambda layers: [False] + [True] * (layers - 1)},
    "kimi_linear": {"num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                    "head_dim": 8, "num_key_value_heads": 4, "linear_head_dim": 16, "linear_num_heads": 4,
                    "layer_types": lambda layers: ["full_attention" if i % 2 else "linear_attention" for i in range(layers)],
                    "mlp_layer_types": lambda layers: ["dense"] + ["sparse"] * (layers - 1)},
    "bailing_hybrid": {"num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                       "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                       "qk_nope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4, "layer_group_size": 2,
                       "first_k_dense_replace": 1, "num_mtp_layers": 0},
    "glm4_moe": {**_ROUTED_AND_SHARED, "first_k_dense_replace": 2},
    # Param2 ties its output layer to the embeddings, which its files name in Bailing's words (word_embeddings)
    "param2moe": {**_ROUTED_AND_SHARED, "first_k_dense_replace": 1, "tie_word_embeddings": True},
    "sarvam_moe": {**_ROUTED_AND_SHARED, "first_k_dense_replace": 1},
    "sarvam_mla": {**_LATENT, **_ROUTED_AND_SHARED, "q_lora_rank": None, "first_k_dense_replace": 1},
    "minicpm5_moe": {**_ROUTED_AND_SHARED, "mlp_layer_types": lambda layers: ["dense"] + ["sparse"] * (layers - 1)},
    # indexed and sliding layers in turn, the sliding ones with half the heads and another key/value latent rank (the
    # released swa_* geometry, the same q_lora_rank as released); a dense first block; index_topk 64 as deepseek_v32's
    "dots3_note_text": {**_LATENT, "head_dim": 16, **_ROUTED_AND_SHARED, "shared_experts_intermediate_size": 48,
                        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 64, "sliding_window": 8,
                        "swa_num_attention_heads": 2, "swa_num_key_value_heads": 2, "swa_q_lora_rank": 32, "swa_kv_lora_rank": 8,
                        "swa_head_dim": 16, "swa_qk_nope_head_dim": 8, "swa_qk_rope_head_dim": 8, "swa_v_head_dim": 16,
                        "layer_types": lambda layers: ["indexed_attention" if i % 2 == 0 else "sliding_attention" for i in range(layers)],
                        "mlp_layer_types": lambda layers: ["dense"] + ["sparse"] * (layers - 1)},
    # (qk_dim, half the width, a multiple of 64: transformers' layer and cache agree on the head size)
    "xlstm": {"num_heads": 4, "hidden_size": 128, "ffn_round_up_to_multiple_of": 16},
    # block_types left to transformers' default, the released R R A pattern, which it repeats to the layer count
    "recurrent_gemma": {"attention_window_size": 8},
    # hybrid attention: linear-attention blocks (Gated DeltaNet) before each attention one
    "qwen3_next": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                   "decoder_sparse_step": 2, "mlp_only_layers": [], **_LINEAR_ATTENTION},
    "qwen3_5_text": {**_LINEAR_ATTENTION},
    "olmo_hybrid": {**_LINEAR_ATTENTION, "layer_types": lambda layers: ["full_attention" if i % 2 else "linear_attention"
                                                                         for i in range(layers)]},
    # Falcon-H1: a Mamba-2 mixer beside each attention, muP multipliers not 1 so that misplaced scales show
    "falcon_h1": {"mamba_d_ssm": None, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
                  "mamba_rms_norm": True, "mlp_multipliers": [0.9, 1.1], "ssm_out_multiplier": 0.7, "attention_out_multiplier": 0.8,
                  "attention_in_multiplier": 1.2, "key_multiplier": 0.9, "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5,
                  "ssm_multipliers": [1.0, 0.9, 1.1, 1.0, 0.8]},
    # Granite 4.0-H: Mamba-2 blocks before each attention one, named as its releases name them
    "granitemoehybrid": {"num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 48, "mamba_n_heads": 4,
                         "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16, "position_embedding_type": "rope",
                         "logits_scaling": 2.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                         "attention_multiplier": 0.25,
                         "layer_types": lambda layers: ["attention" if i % 2 else "mamba" for i in range(layers)]},
    # Bamba: Mamba-2 blocks, the attention ones listed by index
    "bamba": {"mamba_n_heads": 4, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
              "attn_layer_indices": lambda layers: [i for i in range(layers) if i % 2]},
    # Nemotron-H: one mixer a block, every kind in turn (Mamba-2, MLP, attention, MoE)
    "nemotron_h": {"mamba_num_heads": 4, "mamba_head_dim": 32, "ssm_state_size": 16, "n_groups": 1, "chunk_size": 16,
                   "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "moe_shared_expert_intermediate_size": 48, "use_mamba_kernels": False,
                   "layers_block_type": lambda layers: [("linear_attention", "mlp", "full_attention", "moe")[i % 4]
                                                        for i in range(layers)]},
    # LFM2 lists its attention blocks twice (layer_types and full_attn_idxs), as its releases do
    "lfm2": {"norm_eps": 1e-5, "conv_L_cache": 3, "block_auto_adjust_ff_dim": False, "tie_word_embeddings": True,
             "layer_types": _lfm2_layer_types, "full_attn_idxs": _lfm2_attention_blocks},
    "lfm3": {"norm_eps": 1e-5, "conv_L_cache": 3, "sliding_window": 4,  # its attention blocks alternate sliding and full
             "layer_types": lambda layers: ["conv" if i % 2 == 0 else ("sliding_attention", "full_attention")[i // 2 % 2]
                                            for i in range(layers)]},
    "lfm2_moe": {"norm_eps": 1e-5, "conv_L_cache": 3, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                 "num_dense_layers": 1, "layer_types": _lfm2_layer_types, "full_attn_idxs": _lfm2_attention_blocks},
    "qwen3_5_moe_text": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 48, **_LINEAR_ATTENTION},
    # its layer_types left to the config's default, the released pattern: with 4 layers linear, sliding, linear, full
    "lara_mini": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                  "linear_conv_kernel_dim": 4, "sliding_window": 8, "tie_word_embeddings": True},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
    },
}


def tiny_config(model_type: str, num_layers: int = 4, **overrides: Any) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = {key: value(num_layers) if callable(value) else value for key, value in TINY_OVERRIDES[model_type].items()}
    values = {**_COMMON, **family, "num_hidden_layers": num_layers, **overrides}
    derived = {key for key in values if isinstance(getattr(CONFIG_MAPPING[model_type], key, None), property)}  # (Falcon's head_dim)
    return AutoConfig.for_model(model_type, **{key: value for key, value in values.items() if key not in derived})


def tiny_model(model_type: str, num_layers: int = 4, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised float32 model in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, **overrides), dtype=torch.float32)
    if scaled_blocks(model):  # as surgery loads it
        from surgery.arch import ARCHITECTURES
        from surgery.scales import fold_block_scalars

        fold_block_scalars(model, ARCHITECTURES[model_type])
    return model.eval()


def scaled_blocks(model: Any) -> bool:
    """Give each block's output scale, where the family has one (Architecture.block_scalar: Gemma 4's
    layer_scalar, which checkpoints store), values apart from 1, as trained models have, so that a
    path that misses it shows; True where there was one."""
    from surgery.arch import ARCHITECTURES, decoder_layers

    arch = ARCHITECTURES[model.config.model_type]  # (the table entry alone: a test may build a variant surgery refuses)
    if arch.block_scalar is None:
        return False
    for index, layer in enumerate(decoder_layers(model, arch)):
        getattr(layer, arch.block_scalar[0]).fill_(0.6 + 0.1 * index)
    return True


_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model is cut, healed and exported. "
    "Layers matter; some more than others. Paris is the capital of France. Question: Answer: "
    "yes no true false the of and to in is was for on that with as by at from it an be this "
) * 4


def tiny_tokenizer(*, split_digits: bool = False, extra_text: str = "") -> Any:
    """A byte-level BPE tokenizer with TINY_VOCAB entries: any text encodes, no download needed.

    split_digits puts every digit in a token of its own first (Digits, then ByteLevel), as
    StarCoder's and SmolLM's tokenizers do; extra_text is trained on too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           tokenizer.pre_tokenizer])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_TEXT + extra_text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
