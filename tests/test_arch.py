import pytest

from surgery.arch import ARCHITECTURES, NOT_REMOVABLE, architecture_of, decoder_layers, get_module
from surgery.errors import SurgeryError
from surgery.hf_modeling import has_module
from surgery.sublayers import Sublayer
from surgery.tiny import TINY_OVERRIDES, tiny_config, tiny_model

FAMILIES = sorted(ARCHITECTURES)


def test_every_family_has_a_tiny_model():
    assert set(TINY_OVERRIDES) == set(ARCHITECTURES)


@pytest.mark.parametrize("family", FAMILIES)
def test_table_names_every_weighted_module_of_a_block(family):
    """Every block, as a hybrid family's differ: its linear-attention blocks name that instead; the
    parameters its two sublayers free add up to the block's, less the norms only the whole block frees."""
    from surgery.cut import sublayer_parameters

    model = tiny_model(family)
    arch = architecture_of(model.config)
    size = sublayer_parameters(model)
    for index, layer in enumerate(decoder_layers(model)):
        shared = sum(p.numel() for name in arch.shared_norms for p in get_module(layer, name).parameters())
        assert size([Sublayer(index, "attn"), Sublayer(index, "mlp")]) == sum(p.numel() for p in layer.parameters()) - shared
        named = set(arch.sublayer_modules("attn", layer)) | set(arch.sublayer_modules("mlp", layer))
        for name in named | set(arch.shared_norms):
            assert has_module(layer, name), f"{family}: block {index} has no '{name}'"
        owned = named | set(arch.shared_norms)  # (dotted where a block nests them: DBRX's norm_attn_norm.attn)
        unnamed = {name for name, _ in layer.named_parameters() if not any(name.startswith(f"{module}.") for module in owned)}
        assert not unnamed, f"{family}: weights in no module the table names: {unnamed}"
        assert not set(arch.sublayer_modules("attn", layer)) & set(arch.sublayer_modules("mlp", layer))
    get_module(model, arch.final_norm)
    get_module(model, arch.lm_head)


def test_a_hybrid_family_names_each_blocks_own_attention():
    model = tiny_model("qwen3_next", num_layers=4)
    arch = architecture_of(model.config)
    assert model.config.layer_types == ["linear_attention", "full_attention"] * 2
    assert [arch.sublayer_modules("attn", layer)[0] for layer in decoder_layers(model)] == ["linear_attn", "self_attn"] * 2
    assert arch.sublayer_modules("attn")[0] == "self_attn"  # without a block: the family's usual name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_per_layer_config_list_is_known(family):
    """A config list as long as the layer list must be sliced when blocks go: the table must name it.
    (7 layers: Falcon-H1's ssm_multipliers has 5 entries whatever the depth.)"""
    config = tiny_config(family, num_layers=7)
    arch = ARCHITECTURES[family]
    per_layer = {k for k, v in config.to_dict().items() if isinstance(v, list) and len(v) == 7}
    assert per_layer <= {*arch.per_layer_config, *arch.tiled_config}, f"{family}: unlisted per-layer config keys {per_layer}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if getattr(tiny_config(f), "first_k_dense_replace", None)])
def test_a_dense_prefix_count_is_recounted_when_blocks_go(family):
    """DeepSeek's `first_k_dense_replace` (the first k layers are dense) is read by other loaders
    even where transformers reads a per-layer list instead: it must describe the kept blocks."""
    from surgery.cut import cut
    from surgery.sublayers import parse_sublayers

    model = tiny_model(family, num_layers=4)
    count = model.config.first_k_dense_replace
    assert "first_k_dense_replace" in ARCHITECTURES[family].prefix_count_config
    cut(model, parse_sublayers("L0"))
    assert model.config.first_k_dense_replace == max(0, min(count, 4) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_exist(family):
    """Each target names a module of the family (latent attention: of one of its two query layouts)."""
    models = [tiny_model(family)]
    if hasattr(models[0].config, "q_lora_rank") and any({"q_proj", "q_a_proj"} & set(group)
                                                         for group in ARCHITECTURES[family].lora_may_lack):
        # the query factored through q_lora_rank, or one q_proj, as a model of the family may have either
        models.append(tiny_model(family, q_lora_rank=None if models[0].config.q_lora_rank else 32))
    names = {name.rsplit(".", 1)[-1] for model in models for name, _ in model.named_modules()}
    assert set(ARCHITECTURES[family].lora_targets) <= names


def test_a_variant_of_a_family_is_its_entry_with_the_fields_the_config_changes():
    """StableLM 2 12B's blocks are parallel (use_parallel_residual), its one norm read by both
    sublayers; the 1.6B and 3B are Llama's block, the table entry itself."""
    parallel = architecture_of(tiny_config("stablelm", use_parallel_residual=True))
    assert parallel.parallel and parallel.shared_norms == ("input_layernorm",) and parallel.sublayer_modules("mlp") == ("mlp",)
    assert architecture_of(tiny_config("stablelm")) is ARCHITECTURES["stablelm"]


@pytest.mark.parametrize("family, variant, why", [
    ("opt", dict(do_layer_norm_before=False), "with do_layer_norm_before=False is not supported: its norms follow each "
                                              "sublayer's addition"),  # OPT-350M
    ("opt", dict(word_embed_proj_dim=32), "with this config is not supported: its embeddings are narrower than its blocks"),
    ("bloom", dict(apply_residual_connection_post_layernorm=True), "with apply_residual_connection_post_layernorm=True is "
                                                                   "not supported: its blocks add the normed stream back"),
    ("bloom", dict(slow_but_exact=True, pretraining_tp=2), "with this config is not supported: slow_but_exact reads")])
def test_a_variant_the_entry_does_not_describe_is_refused_from_its_config_object_or_file(family, variant, why):
    config = tiny_config(family)
    saved = {"model_type": family, "hidden_size": 64, "num_hidden_layers": 4, **variant}
    for given in (tiny_config(family, **variant), saved):
        with pytest.raises(SurgeryError, match=f"{family} " + why):
            architecture_of(given)
    assert architecture_of(config) is ARCHITECTURES[family]


def test_unsupported_family_names_the_supported_ones_and_where_to_add():
    with pytest.raises(SurgeryError) as error:
        architecture_of({"model_type": "rwkv"})
    text = str(error.value)
    assert "rwkv" in text and "llama" in text and "qwen2_moe" in text and "surgery/arch.py" in text


@pytest.mark.parametrize("kept, after", [(list(range(8)), (4, 2)),  # uncut: the source's rule
                                         ([0, 1, 2, 3, 6, 7], None),  # L2, L4: no offset below a period of 2
                                         ([1, 2, 4, 5, 6, 7], (3, 1)),  # L1, L4: a period of 3
                                         ([0, 1, 2], (4, 2)),  # L2 alone: the source's rule still places it
                                         ([0, 1, 2, 4, 5, 7, 8, 9], (6, 2)),  # L2 alone of 8: the source's would add L6
                                         ([0, 1, 3, 4, 5], (6, 5))])  # none left: an offset past the last block
def test_a_period_rule_after_a_cut_places_exactly_the_kept_blocks_of_its_kind(kept, after):
    """PeriodRule.after: the (period, offset) that place block i when i % period == offset exactly
    where the kept blocks of the kind fall (the source's period first), or None where none does."""
    from surgery.arch import PeriodRule

    rule = PeriodRule("period", "offset", count="experts")
    assert rule.after({"period": 4, "offset": 2, "experts": 8}, kept) == after
    if after is not None:
        period, offset = after
        assert [i for i in range(len(kept)) if i % period == offset] == [new for new, old in enumerate(kept) if old % 4 == 2]
    assert rule.after({"period": 4, "offset": 2, "experts": 1}, kept) == (4, 2)  # a count of 1 places nothing apart


def test_jamba_reasonings_attention_stays_placed_when_mamba_blocks_between_go():
    """docs/pruning.md's example: attention at L7 and L21 of 28 blocks (period 14), four Mamba
    blocks between them removed: L7 and L17 of 24, a period of 10."""
    from surgery.arch import PeriodRule

    kept = [i for i in range(28) if i not in (10, 11, 12, 13)]
    assert PeriodRule("period", "offset").after({"period": 14, "offset": 7}, kept) == (10, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_says_what_the_config_object_says(family, tmp_path):
    """The checks made before any weight loads read config.json as a dict: the block count, the
    attention blocks, the sublayers blocks lack, the period a cut keeps and the trained length must
    be what the config object transformers builds from the same file says."""
    from transformers import AutoConfig

    from surgery.arch import config_layers, config_value, text_config

    tiny_config(family, 6).save_pretrained(tmp_path)
    stored, config = text_config(tmp_path), AutoConfig.from_pretrained(tmp_path)
    arch = architecture_of(config)
    assert config_layers(tmp_path) == config.num_hidden_layers == 6
    assert arch.attention_blocks(stored) == arch.attention_blocks(config)
    assert arch.absent_sublayers(stored) == arch.absent_sublayers(config)
    assert arch.runtime_period(stored) == arch.runtime_period(config)
    assert config_value(stored, "max_position_embeddings") == config.max_position_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_the_table_says_how_many_values_an_attention_returns(family):
    """Architecture.carried: the values a (softmax) attention returns after its output and weights
    (GLM-5's: the keys its indexer selected, which its block unpacks), so that its stand-in returns
    as many. Linear attention and single-mixer blocks return their output alone."""
    import torch

    from surgery.hf_modeling import get_module as module_or_none
    from surgery.hf_modeling import is_linear_block

    model = tiny_model(family, 3)
    arch = architecture_of(model.config)
    spec, seen = arch.stand_in_spec(), []
    hooks = []
    for layer in decoder_layers(model):
        if is_linear_block(layer, spec) or "single_mixer" in spec:
            continue
        attention = module_or_none(layer, arch.attention, None)
        if attention is not None:
            hooks.append(attention.register_forward_hook(lambda module, args, output: seen.append(output)))
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]), use_cache=False)
    for hook in hooks:
        hook.remove()
    assert seen or not hooks, family
    assert [len(output) - 2 if isinstance(output, tuple) else -1 for output in seen] == [len(arch.carried)] * len(seen), family


@pytest.mark.parametrize("config", [{"index_topk_freq": 4, "index_skip_topk_offset": 3}, {"index_topk_freq": 2},
                                    {"index_topk_pattern": "FSFSSF"}, {"indexer_types": ["full", "shared", "full"] * 2}, {}],
                         ids=["glm-5.2", "freq", "pattern", "list", "glm-5"])
def test_shared_selection_reads_a_glm5_config_as_transformers_does(config):
    """Which layers reuse an earlier layer's selection, read from config.json's dict as transformers
    derives it for the config object (a list, else an F/S string, else a frequency and an offset),
    and which full layer each reads: the nearest one before it."""
    rule = ARCHITECTURES["glm_moe_dsa"].shared_attention
    unshared = {"index_topk_freq": 1, "index_skip_topk_offset": 2}  # transformers' defaults (the tiny model shares)
    model_config = tiny_config("glm_moe_dsa", 6, **{**unshared, **config})
    saved = {"model_type": "glm_moe_dsa", "num_hidden_layers": 6, **config}
    assert rule.types(saved) == rule.types(model_config) == model_config.indexer_types
    readers = rule.readers(saved)
    for index, kind in enumerate(model_config.indexer_types):
        reading = [source for source, layers in readers.items() if index in layers]
        if kind == "full":
            assert reading == []
        else:
            assert reading == [max(i for i in range(index) if model_config.indexer_types[i] == "full")]
    assert rule.pattern_after(saved, [0, 2, 3]) == "".join("S" if model_config.indexer_types[i] == "shared" else "F"
                                                            for i in (0, 2, 3))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_table_says_how_many_values_a_block_returns(family):
    """Architecture.block_outputs: 0 where a block returns the stream alone, else the length of the
    tuple it returns (GPT-J's: the stream and its attention weights). Whatever stands in for a
    block (block-by-block reading records each block's arguments with a stand-in) answers alike."""
    import torch

    model = tiny_model(family, 3)
    arch = architecture_of(model.config)
    seen = []
    hooks = [layer.register_forward_hook(lambda module, args, output: seen.append(output)) for layer in decoder_layers(model)]
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]), use_cache=False)
    for hook in hooks:
        hook.remove()
    assert [len(output) if isinstance(output, tuple) else 0 for output in seen] == [arch.block_outputs] * 3, family


@pytest.mark.parametrize("model_type", sorted(NOT_REMOVABLE))
def test_a_family_whose_blocks_are_not_removable_is_refused_with_why(model_type, tmp_path):
    """Families whose blocks are not the stream plus what each sublayer adds are refused in one line
    that says why (not as unknown, with a hint to add a table entry), before any weight is read."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from tests.cli import one_line, run

    assert model_type in CONFIG_MAPPING and model_type not in ARCHITECTURES
    with pytest.raises(SurgeryError, match=f"^{model_type} is not supported: "):
        architecture_of({"model_type": model_type})
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 4}))
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, source / "model.safetensors")  # (never read)
    line = one_line(run("cut", source, "--remove", "L1", "--out", tmp_path / "cut"))
    assert NOT_REMOVABLE[model_type] in line and "ARCHITECTURES" not in line
    assert not (tmp_path / "cut").exists()
