"""`surgery extract-text`: a multimodal checkpoint's text decoder written as a text-only checkpoint
of its family (tiny Gemma 3 and Mistral 3 built from configs, saved by transformers), which every
other command then takes; the multimodal checkpoint itself is refused with the way out named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.export.checkpoint import read_manifest
from tests.cli import one_line, run

VOCAB = 384  # the tiny tokenizer's


def gemma3(folder, tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                patch_size=8)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    return save(Gemma3ForConditionalGeneration(config), folder, tokenizer)


def gemma4(folder, tokenizer):
    """Gemma 4 26B-A4B's layout (its text decoder's tiny config: full-attention layers with their own
    head size, routed experts), its config.json as released: the full-attention head settings as
    global_head_dim and num_global_key_value_heads, which transformers saves as per_layer_config."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    from surgery.tiny import tiny_config

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    config = Gemma4Config(text_config=tiny_config("gemma4_text", 4).to_dict(), vision_config=vision.to_dict(), audio_config=None,
                          image_token_id=VOCAB - 1, boi_token_id=VOCAB - 3, eoi_token_id=VOCAB - 2)
    model = save(Gemma4ForConditionalGeneration(config), folder, tokenizer)
    released = json.loads((folder / "config.json").read_text())
    del released["text_config"]["per_layer_config"]
    released["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    (folder / "config.json").write_text(json.dumps(released))
    return model


def gemma4_e(folder, tokenizer):
    """Gemma 4 E2B's layout: an audio tower beside the vision tower, and a decoder whose last layers
    share keys and values and whose blocks add per-layer inputs (surgery.tiny.GEMMA4_E)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig, Gemma4VisionConfig

    from surgery.tiny import GEMMA4_E, tiny_config

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                              output_proj_dims=32)
    config = Gemma4Config(text_config=tiny_config("gemma4_text", 6, **GEMMA4_E).to_dict(), vision_config=vision.to_dict(),
                          audio_config=audio.to_dict(), image_token_id=VOCAB - 1, boi_token_id=VOCAB - 3, eoi_token_id=VOCAB - 2,
                          audio_token_id=VOCAB - 4)
    return save(Gemma4ForConditionalGeneration(config), folder, tokenizer)


def mistral3(folder, tokenizer):
    """Mistral Small 3.1's layout: an untied output layer, kept at language_model.lm_head."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                 patch_size=8, head_dim=16)
    config = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=VOCAB - 1,
                            spatial_merge_size=2, tie_word_embeddings=False)
    return save(Mistral3ForConditionalGeneration(config), folder, tokenizer)


def cohere2_vision(folder, tokenizer, aya=False):
    """Command A Vision's layout (Aya Vision's with `aya`): Cohere 2's parallel decoder (tied output
    layer) beside a SigLIP tower, under transformers' own names. Command A Vision does not apply the
    decoder's logit scale, which the text-only class does: the decoder is written with a scale of 1."""
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        Cohere2Config,
        Cohere2VisionConfig,
        Cohere2VisionForConditionalGeneration,
        SiglipVisionConfig,
    )

    text = Cohere2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, sliding_window=8, logit_scale=0.5, eos_token_id=2,
                         layer_types=["sliding_attention", "full_attention"] * 2)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                patch_size=8)
    if aya:
        config = AyaVisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=VOCAB - 1,
                                 adapter_layer_norm_eps=1e-6, alignment_intermediate_size=64)
        return save(AyaVisionForConditionalGeneration(config), folder, tokenizer)
    config = Cohere2VisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=VOCAB - 1,
                                 alignment_intermediate_size=64)
    return save(Cohere2VisionForConditionalGeneration(config), folder, tokenizer)


def cohere_compass(folder, tokenizer):
    """Cohere's North Vision layout (CohereCompass): Cohere 2's parallel decoder, each layer type its own
    RoPE base, beside a Qwen3-VL-style tower with DeepStack features; an untied output layer, and a
    logit scale the image-text model applies as the text-only class does."""
    from transformers import CohereCompassConfig, CohereCompassForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8, logit_scale=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                layer_types=["sliding_attention", "full_attention"] * 2,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    config = CohereCompassConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                                 vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)
    return save(CohereCompassForConditionalGeneration(config), folder, tokenizer)


def fuyu(folder, tokenizer):
    """Fuyu's layout: a Persimmon decoder whose image patches enter through one linear layer
    (vision_embed_tokens), no vision tower; an untied output layer."""
    from transformers import FuyuConfig, FuyuForCausalLM

    text = dict(model_type="persimmon", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, qk_layernorm=True, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = FuyuConfig(text_config=text, vocab_size=VOCAB, hidden_size=64, patch_size=8, num_channels=3, image_token_id=VOCAB - 1,
                        pad_token_id=0)
    return save(FuyuForCausalLM(config), folder, tokenizer)


def aya_vision(folder, tokenizer):
    return cohere2_vision(folder, tokenizer, aya=True)


def llama4(folder, tokenizer):
    """Llama 4 Scout's layout: routed and shared experts (Maverick's interleaved dense FFNs in the
    tiny config), chunked attention, an untied output layer."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    from transformers.models.llama4.configuration_llama4 import Llama4VisionConfig

    from surgery.tiny import tiny_config

    vision = Llama4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=64,
                                pixel_shuffle_ratio=0.5)
    config = Llama4Config(text_config=tiny_config("llama4_text", 4).to_dict(), vision_config=vision.to_dict(),
                          image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    return save(Llama4ForConditionalGeneration(config), folder, tokenizer)


def aria(folder, tokenizer):
    """Aria's layout: its MoE decoder (routed experts stored [experts, in, out], shared experts) beside an
    Idefics 3 vision tower and a projector, an untied output layer."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    from surgery.tiny import tiny_config

    vision = dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = AriaConfig(text_config=tiny_config("aria_text", 4).to_dict(), vision_config=vision, image_token_index=VOCAB - 1,
                        projector_patch_to_query_dict={16: 4})
    return save(AriaForConditionalGeneration(config), folder, tokenizer)


def qwen3_5(folder, tokenizer, mtp=1):
    """Qwen3.5's layout (hybrid attention, M-RoPE, its vision tower at model.visual.), with the
    `mtp` multi-token-prediction modules its releases keep at mtp.* and count in text_config."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from surgery.tiny import tiny_config

    text = tiny_config("qwen3_5_text", 4, mtp_num_hidden_layers=mtp)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64,
                  num_position_embeddings=16)
    config = Qwen3_5Config(text_config=text.to_dict(), vision_config=vision, image_token_id=VOCAB - 1,
                           video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)
    model = save(Qwen3_5ForConditionalGeneration(config), folder, tokenizer)
    weights = load_file(folder / "model.safetensors")
    block = {name.removeprefix("model.language_model.layers.3."): t for name, t in weights.items()
             if name.startswith("model.language_model.layers.3.")}  # an attention block, as released MTP layers are
    generator = torch.Generator().manual_seed(7)
    for k in range(mtp):
        weights.update({f"mtp.layers.{k}.{name}": torch.randn(t.shape, generator=generator) for name, t in block.items()})
    if mtp:
        weights.update({f"mtp.{name}.weight": torch.randn(shape, generator=generator) for name, shape in
                        (("fc", (64, 128)), ("norm", (64,)), ("pre_fc_norm_embedding", (64,)), ("pre_fc_norm_hidden", (64,)))})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return model


def qwen2_5_vl(folder, tokenizer):
    """Qwen2.5-VL's layout: a Qwen2 decoder with M-RoPE (three position sections), its vision tower at
    visual., an untied output layer (the 7B's); transformers saves it in the released names, model. and visual."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64,
                  fullatt_block_indexes=[0], window_size=32, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                              vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4, tie_word_embeddings=False)
    return save(Qwen2_5_VLForConditionalGeneration(config), folder, tokenizer)


def glm4v(folder, tokenizer, moe=False):
    """GLM-4.1V's layout (GLM-4.5V's with `moe`: GLM-4.5's experts after a dense first block): GLM-4's
    block with M-RoPE over half of each head, a head size the config derives, its vision tower at
    model.visual."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    if moe:
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64, spatial_merge_size=2,
                  temporal_patch_size=2, image_size=32)
    config_class, model_class = (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration) if moe else (Glm4vConfig, Glm4vForConditionalGeneration)
    config = config_class(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                          image_start_token_id=VOCAB - 3, image_end_token_id=VOCAB - 4, video_start_token_id=VOCAB - 5,
                          video_end_token_id=VOCAB - 6)
    return save(model_class(config), folder, tokenizer)


def glm4v_moe(folder, tokenizer):
    return glm4v(folder, tokenizer, moe=True)


def hunyuan_vl(folder, tokenizer):
    """HunYuan-VL's layout: Hunyuan's dense decoder (query and key norms after the rotation) with
    M-RoPE in four sections, its vision tower at vit."""
    from transformers import HunYuanVLConfig, HunYuanVLForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0, eod_token_id=3, sep_token_id=4,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2, 2]})
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, out_hidden_size=64, patch_size=8,
                  text_hidden_size=64)
    config = HunYuanVLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, im_start_id=VOCAB - 2,
                             im_end_id=VOCAB - 3, im_newline_id=VOCAB - 4)
    return save(HunYuanVLForConditionalGeneration(config), folder, tokenizer)


def apertus1p5(folder, tokenizer):
    """Apertus 1.5's layout: Apertus's decoder, whose embeddings also hold the image and audio codes its
    two tokenizers (a VQ image encoder, WavTokenizer) turn media into; no projector."""
    from transformers.models.apertus1p5 import Apertus1p5Config, Apertus1p5ForConditionalGeneration

    from surgery.tiny import tiny_config

    text = tiny_config("apertus1p5_text", num_layers=4).to_dict()
    vision = dict(codebook_size=64, embed_dim=8, latent_channels=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                  attn_resolutions=[], resolution=32)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2, 2], hidden_size=16, codebook_size=32,
                 codebook_dim=16, num_lstm_layers=1)
    config = Apertus1p5Config(text_config=text, vision_config=vision, audio_config=audio, image_token_id=VOCAB - 1,
                              audio_token_id=VOCAB - 2, image_token_offset=VOCAB - 96, audio_token_offset=VOCAB - 32)
    return save(Apertus1p5ForConditionalGeneration(config), folder, tokenizer)


def dots3_note(folder, tokenizer):
    """dots3 Note's layout: a DeepSeek-V3.2-style decoder (indexed and sliding layers, dense then routed
    experts) beside a vision encoder with an MoE block and an audio encoder; the decoder at model.,
    the encoders at vision_encoder. and audio_encoder."""
    from transformers.models.dots3_note import Dots3NoteConfig, Dots3NoteForConditionalGeneration

    from surgery.tiny import tiny_config

    vision = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=14, spatial_merge_size=2, mlp_layer_types=["dense", "sparse"], adapter_in_dim=32, adapter_out_dim=64,
                  adapter_merge_size=2, num_local_experts=4, num_experts_per_tok=2,
                  per_layer_config={1: {"num_local_experts": 4, "num_experts_per_tok": 2}})
    audio = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, downsample_hidden_size=8,
                 adapter_input_size=32, adapter_out_dim=64)
    config = Dots3NoteConfig(text_config=tiny_config("dots3_note_text", 4).to_dict(), vision_config=vision, audio_config=audio,
                             image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, audio_token_id=VOCAB - 3)
    return save(Dots3NoteForConditionalGeneration(config), folder, tokenizer)


def qwen2_vl(folder, tokenizer):
    """Qwen2-VL's layout: Qwen2.5-VL's before it, with another vision tower."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                           vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4, tie_word_embeddings=True)
    return save(Qwen2VLForConditionalGeneration(config), folder, tokenizer)


def qwen3_vl(folder, tokenizer, moe=False):
    """Qwen3-VL's layout: a Qwen3 decoder with interleaved M-RoPE, whose first blocks also take the
    vision tower's DeepStack features of image tokens; the tower at model.visual., tied output layer.
    With `moe`, Qwen3-VL-MoE's (30B-A3B, 235B-A22B): Qwen3-MoE's experts after a dense first block,
    which its checkpoints store fused a layer at a time, [experts, hidden, 2 x intermediate] (gate,
    then up) and [experts, intermediate, hidden], where Qwen3-MoE's store one tensor per expert and
    projection; an untied output layer."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 5e5})
    if moe:  # (2 x 24 is not the width 64: transformers could not tell a released layout from its own were it square)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[0])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    config_class, model_class = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (Qwen3VLConfig,
                                                                                                  Qwen3VLForConditionalGeneration)
    config = config_class(text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                          vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4, tie_word_embeddings=not moe)
    return save(model_class(config), folder, tokenizer)


def qwen3_vl_moe(folder, tokenizer):
    return qwen3_vl(folder, tokenizer, moe=True)


def renamed_to_qwen_vl_class_names(folder):
    """The names transformers' Qwen2.5-VL classes give the parts (model.language_model., model.visual.),
    which some uploads store instead of the released model. and visual. (transformers saves these)."""
    weights = load_file(folder / "model.safetensors")
    moved = {("model." + name if name.startswith("visual.") else name.replace("model.", "model.language_model.", 1)
              if name.startswith("model.") else name): t for name, t in weights.items()}
    save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})


def flattened_as_released(folder):
    """config.json as Qwen2-VL and Qwen2.5-VL are released: the text decoder's settings at the top,
    no text_config, M-RoPE under rope_scaling (transformers builds the text_config from them)."""
    text_settings_at_the_top(folder)
    data = json.loads((folder / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    (folder / "config.json").write_text(json.dumps(data, indent=2))


def text_settings_at_the_top(folder):
    """config.json as dots3 Note is released: the text decoder's settings at the top, no text_config."""
    data = json.loads((folder / "config.json").read_text())
    text = data.pop("text_config")
    data.update({key: value for key, value in text.items() if key not in ("model_type", "architectures", "dtype")})
    (folder / "config.json").write_text(json.dumps(data, indent=2))


def with_mtp_block(folder):
    """A DeepSeek-style MTP module after the last block (model.layers.{n}: a block, eh_proj and its norms),
    counted by num_nextn_predict_layers, as DeepSeek-V3's releases store theirs."""
    weights = load_file(folder / "model.safetensors")
    data = json.loads((folder / "config.json").read_text())
    text = data.get("text_config", data)
    n = text["num_hidden_layers"]
    generator = torch.Generator().manual_seed(5)
    for name in [k for k in weights if k.startswith(f"model.layers.{n - 1}.")]:
        weights[name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = weights[name].clone() + 1
    width = text["hidden_size"]
    for name, shape in (("eh_proj", (width, 2 * width)), ("enorm", (width,)), ("hnorm", (width,)), ("shared_head.norm", (width,))):
        weights[f"model.layers.{n}.{name}.weight"] = torch.randn(shape, generator=generator)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    text["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(data, indent=2))


def experts_as_released(folder):
    """Qwen3-VL-MoE's fused experts as its releases store them, [experts, in, out]: transposed from
    the [experts, out, in] transformers holds and saves (it loads either, by their shapes)."""
    weights = load_file(folder / "model.safetensors")
    moved = {name: t.transpose(1, 2).contiguous() if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else t
             for name, t in weights.items()}
    save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})


def with_shared_layers_keys(folder):
    """Gemma 4 E2B's files as Google released them: key and value projections (and their norms) for
    the layers that reuse another's too, which transformers drops when loading."""
    weights = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())["text_config"]
    first = config["num_hidden_layers"] - config["num_kv_shared_layers"]
    source = f"model.language_model.layers.{first - 1}.self_attn."
    for name in [n for n in weights if n.startswith(source) and n.rsplit(".", 2)[-2] in ("k_proj", "v_proj", "k_norm")]:
        for layer in range(first, config["num_hidden_layers"]):
            weights[name.replace(f".layers.{first - 1}.", f".layers.{layer}.")] = weights[name].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


LAYOUTS = {"newer": lambda folder: renamed_to_the_newer_layout(folder), "class names": lambda folder: renamed_to_qwen_vl_class_names(folder),
           "flat config": lambda folder: flattened_as_released(folder), "released experts": experts_as_released,
           "released shared layers": with_shared_layers_keys, "text at the top": text_settings_at_the_top,
           "released with mtp": lambda folder: (with_mtp_block(folder), text_settings_at_the_top(folder))}  # (legacy, released: as transformers saves them)


def multimodal_source(make, folder, tokenizer, layout=None):
    """The multimodal model `make` builds, saved to `folder` in the name and config `layout`."""
    model = make(folder, tokenizer)
    if layout in LAYOUTS:
        LAYOUTS[layout](folder)
    return model


def save(model, folder, tokenizer):
    torch.manual_seed(0)
    for parameter in model.parameters():  # not the initialiser's zeros and ones: every tensor counts in the comparison
        parameter.data.normal_(0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def renamed_to_the_newer_layout(folder):
    """The names transformers' own classes give the parts (model.language_model., model.vision_tower.,
    lm_head.), which some uploads store instead of the legacy ones."""
    weights = load_file(folder / "model.safetensors")
    moved = {}
    for name, tensor in weights.items():
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        moved[name] = tensor
    save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("make, family, layout", [(gemma3, "gemma3_text", "legacy"), (gemma3, "gemma3_text", "newer"),
                                                  (gemma4, "gemma4_text", "newer"), (gemma4_e, "gemma4_text", "newer"),
                                                  (gemma4_e, "gemma4_text", "released shared layers"),
                                                  (mistral3, "mistral", "legacy"), (mistral3, "mistral", "newer"),
                                                  (llama4, "llama4_text", "legacy"), (qwen2_5_vl, "qwen2", "released"),
                                                  (qwen2_5_vl, "qwen2", "class names"), (qwen2_vl, "qwen2", "released"),
                                                  (qwen2_5_vl, "qwen2", "flat config"), (qwen3_vl, "qwen3", "released"),
                                                  (cohere2_vision, "cohere2", "newer"), (aya_vision, "cohere2", "newer"),
                                                  (cohere_compass, "cohere_compass_text", None), (fuyu, "persimmon", None),
                                                  (glm4v, "glm4", "newer"), (glm4v_moe, "glm4_moe", "newer"),
                                                  (hunyuan_vl, "hunyuan_v1_dense", None), (apertus1p5, "apertus1p5_text", None),
                                                  (aria, "aria_text", "legacy"), (aria, "aria_text", "newer"),
                                                  (qwen3_vl_moe, "qwen3_moe", "released experts"), (qwen3_vl_moe, "qwen3_moe", "saved"),
                                                  (dots3_note, "dots3_note_text", "saved"),
                                                  (dots3_note, "dots3_note_text", "text at the top")])
@torch.no_grad()
def test_the_text_decoder_computes_what_the_multimodal_model_computes_on_text(make, family, layout, tmp_path, tokenizer):
    """Each family's decoder, in each name layout, written as its text-only family (Qwen2.5-VL's as
    Qwen2, its M-RoPE sections dropped) computes on text what the multimodal model does."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "multimodal"
    model = multimodal_source(make, source, tokenizer, layout)
    assert ("text_config" in json.loads((source / "config.json").read_text())) == (layout not in ("flat config", "text at the top"))
    result = run("extract-text", source, "--out", tmp_path / "text", "--max-shard-size", "100KB", "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "text")
    assert manifest["verified"]["method"] == "copied, compared with the multimodal model"
    assert {prefix.removeprefix("model.") for prefix in manifest["left_behind"]} == \
        ({"visual"} if family in ("qwen2", "qwen3", "qwen3_moe", "glm4", "glm4_moe", "cohere_compass_text") else
         {"vision_embed_tokens"} if family == "persimmon" else {"vit"} if family == "hunyuan_v1_dense" else
         {"vision_tokenizer", "audio_tokenizer"} if family == "apertus1p5_text" else
         {"vision_tower", "embed_vision", "audio_tower", "embed_audio"} if make is gemma4_e else
         {"vision_tower", "embed_vision"} if family == "gemma4_text" else
         {"vision_encoder", "audio_encoder"} if family == "dots3_note_text" else
         {"vision_model" if family == "llama4_text" else "vision_tower", "multi_modal_projector"})

    config = json.loads((tmp_path / "text" / "config.json").read_text())
    assert config["model_type"] == family and config["tie_word_embeddings"] == (make in (gemma3, gemma4, gemma4_e, qwen2_vl, qwen3_vl,
                                                                                          cohere2_vision, aya_vision, hunyuan_vl))
    if make is gemma4:  # the released words, beside the ones transformers saves
        assert (config["global_head_dim"], config["num_global_key_value_heads"]) == (32, 1) and "per_layer_config" in config
    assert "mrope_section" not in json.dumps(config)
    if family == "cohere2":  # (Command A Vision applies no logit scale; Aya Vision applies its decoder's)
        assert config["logit_scale"] == (1.0 if make is cohere2_vision else 0.5)
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text").eval()  # as users load it: the family's own class
    assert type(text).__name__ == {"gemma3_text": "Gemma3ForCausalLM", "gemma4_text": "Gemma4ForCausalLM", "mistral": "MistralForCausalLM",
                                   "llama4_text": "Llama4ForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                   "cohere2": "Cohere2ForCausalLM", "glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                                   "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM",
                                   "aria_text": "AriaTextForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                   "cohere_compass_text": "CohereCompassForCausalLM", "persimmon": "PersimmonForCausalLM",
                                   "apertus1p5_text": "Apertus1p5TextForCausalLM", "dots3_note_text": "Dots3NoteForCausalLM"}[family]
    ids = torch.randint(3, VOCAB - 5, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(text(ids).logits, model(input_ids=ids).logits, atol=1e-5)
    stored = load_file(source / "model.safetensors")
    sources = {name for name in stored if not any(part in name for part in ("vision", "projector", "visual", "audio"))
               and not name.startswith("vit.")}
    # Qwen3-VL-MoE's fused experts are written one tensor per expert and projection (gate and up, and down),
    # as Qwen3-MoE stores them (Gemma 4's stay fused, as its text family stores them)
    split = sum(stored[name].shape[0] * (2 if name.endswith("gate_up_proj") else 1) - 1 for name in sources
                if name.endswith(("experts.gate_up_proj", "experts.down_proj"))) if make is qwen3_vl_moe else 0
    # (E2B's shared layers' key and value projections, as released: dropped, as transformers drops them)
    split -= 9 if layout == "released shared layers" else 0
    written = {name for file in (tmp_path / "text").glob("model-*.safetensors") for name in load_file(file)}
    assert len(written) == len(sources) + split and len(list((tmp_path / "text").glob("model-*.safetensors"))) > 1

    remove = "L0" if make is gemma4_e else "L1"  # (E2B's L1 is a source of keys and values)
    cut = run("cut", tmp_path / "text", "--remove", remove, "--out", tmp_path / "cut", "--device", "cpu")  # the pipeline goes on
    assert cut.exit_code == 0, cut.output


@pytest.mark.parametrize("command", [["cut", "--remove", "L1", "--out", "cut"], ["analyze", "--out", "analysis"],
                                     ["eval", "--ppl", "wikitext2"]])
def test_a_multimodal_checkpoint_given_to_another_command_names_the_way_out(command, tmp_path, tokenizer):
    source = tmp_path / "multimodal"
    gemma3(source, tokenizer)
    args = [command[0], source, *[tmp_path / a if a in ("cut", "analysis") else a for a in command[1:]]]
    line = one_line(run(*args))
    assert "'gemma3' is a multimodal checkpoint" in line and "surgery extract-text MODEL --out FOLDER" in line
    assert not (tmp_path / "cut").exists() and not (tmp_path / "analysis").exists()


def test_where_the_multimodal_model_does_not_fit_every_tensor_is_still_checked(tmp_path, tokenizer, monkeypatch):
    import surgery.memory

    source = tmp_path / "multimodal"
    mistral3(source, tokenizer)
    monkeypatch.setattr(surgery.memory, "fits_in_memory", lambda *args, **kwargs: False)
    result = run("extract-text", source, "--out", tmp_path / "text", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "does not fit in memory: its logits were not compared" in " ".join(result.output.split())
    verified = read_manifest(tmp_path / "text")["verified"]
    assert verified["method"] == "copied, names and shapes checked" and verified["max_abs_logit_diff"] is None


def test_bad_input_for_extract_text_is_one_line_and_writes_nothing(tmp_path, tokenizer, tiny_folder):
    text_only, _ = tiny_folder("llama")
    assert "is not a multimodal checkpoint" in one_line(run("extract-text", text_only, "--out", tmp_path / "out"))

    source = tmp_path / "multimodal"
    gemma3(source, tokenizer)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert "a source model is never written to" in one_line(run("extract-text", source, "--out", source, "--force"))
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"], "model_type": "rwkv"}}))
    assert "its text decoder is 'rwkv', which surgery does not support" in one_line(
        run("extract-text", source, "--out", tmp_path / "out"))
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    assert "is stored fp8-quantised" in one_line(run("extract-text", source, "--out", tmp_path / "out"))
    (source / "config.json").write_text(json.dumps(config))
    weights = load_file(source / "model.safetensors")
    del weights["language_model.model.layers.2.mlp.up_proj.weight"]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert "has no tensor for the text decoder's model.layers.2.mlp.up_proj.weight" in one_line(
        run("extract-text", source, "--out", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_model_no_auto_class_runs_on_text_is_still_checked_tensor_by_tensor(tmp_path, tokenizer):
    """Qwen2-Audio: transformers runs it as audio-text-to-text only; its decoder is written, every
    tensor checked as copied, and the logit comparison is said not to have run."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from surgery.tiny import tiny_config

    audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
                 max_source_positions=16)
    config = Qwen2AudioConfig(text_config=tiny_config("qwen2", 2).to_dict(), audio_config=audio, audio_token_index=VOCAB - 1)
    save(Qwen2AudioForConditionalGeneration(config), tmp_path / "audio", tokenizer)
    result = run("extract-text", tmp_path / "audio", "--out", tmp_path / "text", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "no class that runs the multimodal model on text" in " ".join(result.output.split())
    manifest = read_manifest(tmp_path / "text")
    assert manifest["verified"]["method"] == "copied, names and shapes checked" and "audio_tower" in manifest["left_behind"]
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "qwen2"


def test_the_special_tokens_of_the_multimodal_config_are_the_decoders(tmp_path, tokenizer):
    """Gemma 3 ends a turn with token 106 as well as 1: its config says so for the whole model."""
    source = tmp_path / "multimodal"
    gemma3(source, tokenizer)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "eos_token_id": [1, 106]}))
    assert run("extract-text", source, "--out", tmp_path / "text", "--device", "cpu").exit_code == 0
    assert json.loads((tmp_path / "text" / "config.json").read_text())["eos_token_id"] == [1, 106]


def test_a_failed_check_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    import surgery.shards as shards
    from tests.faults import flipping_last_byte

    source = tmp_path / "multimodal"
    mistral3(source, tokenizer)
    monkeypatch.setattr(shards, "write_shard", flipping_last_byte(shards.write_shard))
    line = one_line(run("extract-text", source, "--out", tmp_path / "text", "--device", "cpu"))
    assert "export check failed" in line and "differs from its source tensor" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multimodal"]


def test_config_and_files_that_disagree_about_the_decoder_are_one_line(tmp_path, tokenizer):
    source = tmp_path / "multimodal"
    mistral3(source, tokenizer)
    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    head = weights.pop("language_model.lm_head.weight")
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert "says the output layer is its own, but the files hold none" in one_line(
        run("extract-text", source, "--out", tmp_path / "out"))

    weights["language_model.lm_head.weight"] = head
    weights["language_model.model.layers.3.input_layernorm.weight"] = torch.ones(64)  # a block the config does not count
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert "holds language_model.model.layers.3.input_layernorm.weight in its text decoder, which its text_config has no place" \
        in one_line(run("extract-text", source, "--out", tmp_path / "out"))

    (source / "config.json").write_text(json.dumps({**config, "model_type": "foo_vlm"}))
    line = one_line(run("extract-text", source, "--out", tmp_path / "out"))
    assert "transformers cannot read its config.json" in line and "--trust-remote-code" in line
    assert not (tmp_path / "out").exists()


def test_a_config_field_of_the_wrong_type_is_one_line(tmp_path, tokenizer):
    """Copies of Llama 4 Scout's config give attn_temperature_tuning as 4, which transformers 5's
    strict configs refuse: one line naming the file, not a traceback."""
    source = tmp_path / "multimodal"
    llama4(source, tokenizer)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["attn_temperature_tuning"] = 4
    (source / "config.json").write_text(json.dumps(config))
    line = one_line(run("extract-text", source, "--out", tmp_path / "out"))
    assert "config.json is not a valid configuration" in line and "attn_temperature_tuning" in line
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_qwen3_5s_decoder_is_extracted_with_its_mtp_modules(tmp_path, tokenizer):
    """Qwen3.5 (and 3.6) ship only as multimodal checkpoints: the hybrid decoder computes on text
    what the multimodal model computes (its M-RoPE, given text alone, is RoPE), and the drafting
    modules vLLM and llama.cpp read at mtp.* come along, counted; the cut that follows carries them."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "multimodal"
    model = qwen3_5(source, tokenizer)
    result = run("extract-text", source, "--out", tmp_path / "text", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "text")["verified"]["method"] == "copied, compared with the multimodal model"
    assert set(read_manifest(tmp_path / "text")["left_behind"]) == {"model.visual"}
    config = json.loads((tmp_path / "text" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text" and config["mtp_num_hidden_layers"] == 1
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text").eval()
    assert type(text).__name__ == "Qwen3_5ForCausalLM"
    ids = torch.randint(3, VOCAB - 5, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(text(ids).logits, model(input_ids=ids).logits, atol=1e-5)
    sources = load_file(source / "model.safetensors")
    written = {name: t for file in (tmp_path / "text").glob("*.safetensors") for name, t in load_file(file).items()}
    mtp = {name for name in sources if name.startswith("mtp.")}
    assert len(mtp) > 4 and all(torch.equal(written[name], sources[name]) for name in mtp)

    cut = run("cut", tmp_path / "text", "--remove", "L0", "--out", tmp_path / "cut", "--device", "cpu")
    assert cut.exit_code == 0, cut.output
    assert mtp <= {name for file in (tmp_path / "cut").glob("*.safetensors") for name in load_file(file)}
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["mtp_num_hidden_layers"] == 1


@pytest.mark.parametrize("make, family, left", [(gemma3, "gemma3_text", {"vision_tower", "multi_modal_projector"}),
                                                (qwen3_5, "qwen3_5_text", {"model.visual"}), (qwen2_5_vl, "qwen2", {"visual"})])
def test_info_describes_the_text_decoder_a_multimodal_checkpoint_holds(make, family, left, tmp_path, tokenizer):
    """From the headers, as extract-text would map them: the decoder's blocks and parameters (those
    the extracted checkpoint then has), what stays behind, and the next command."""
    from surgery.loading import load_model

    source = tmp_path / "multimodal"
    make(source, tokenizer)
    result = run("info", source, "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"text decoder {family}" in text and "decoder blocks │ 4 (L0-L3)" in text
    assert all(f"{prefix} (" in text for prefix in left)
    assert ("multi-token prediction │ 1 of 1 module(s) in the files" in text) == (family == "qwen3_5_text")
    assert "next │ surgery extract-text" in text and "--out FOLDER copies the decoder" in text
    assert run("extract-text", source, "--out", tmp_path / "text", "--device", "cpu").exit_code == 0
    parameters = sum(p.numel() for p in load_model(str(tmp_path / "text"), device="cpu").model.parameters())
    assert f"decoder parameters │ {parameters:,}" in text
