"""Multi-token-prediction (MTP) modules: the drafting heads DeepSeek-V3, GLM-4.5, GLM-4.7-Flash, GLM-5, Ling 2.5, dots3 Note,
K-EXAONE, Mellum 2, Qwen3-Next and Qwen3.5 keep beside their blocks, which transformers skips on load and
serving engines read for speculative decoding. Every way of writing a cut or healed checkpoint
carries them, numbered on after the last block kept (or under their own `mtp.` names), and its
config counts exactly what it carries."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.arch import architecture_of, mtp_count_key
from tests.cli import run

BLOCK_FAMILIES = ["deepseek_v3", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "bailing_hybrid", "dots3_note_text"]  # extra blocks: model.layers.{num_hidden_layers + k}
# K-EXAONE, Mellum 2, Qwen3-Next, Qwen3.5: mtp.layers.{k}, mtp.fc, ... (the Qwens count them in mtp_num_hidden_layers)
FAMILIES = [*BLOCK_FAMILIES, "exaone_moe", "mellum", "qwen3_next", "qwen3_5_text"]
DEEPSEEK_KEY = "num_nextn_predict_layers"
HEAL = ["--heal-steps", "2", "--heal-seq-len", "32", "--heal-batch-size", "2", "--no-quantize", "--lora-dropout", "0",
        "--eval-ppl", "wikitext2", "--eval-ppl-windows", "2", "--eval-tasks", "arc_easy", "--eval-limit", "4",
        "--no-eval-speed", "--device", "cpu"]


def all_tensors(folder):
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def with_mtp_modules(folder, count=1, stored=None):
    """Give a saved tiny model the MTP modules a released checkpoint of its family holds: the last
    block's tensors again, plus the projection and norms of the drafting head (random values), and
    the config's count. `stored`: how many of the `count` modules the files hold (default: all)."""
    config = json.loads((folder / "config.json").read_text())
    layers, last = config["num_hidden_layers"], f"model.layers.{config['num_hidden_layers'] - 1}."
    weights = load_file(folder / "model.safetensors")
    hidden = config["hidden_size"]
    generator = torch.Generator().manual_seed(7)
    prefix = architecture_of(config).mtp_prefix
    head = {"fc" if prefix else "eh_proj": (hidden, 2 * hidden), "pre_fc_norm_embedding" if prefix else "enorm": (hidden,),
            "pre_fc_norm_hidden" if prefix else "hnorm": (hidden,), "norm" if prefix else "shared_head.norm": (hidden,)}
    block = {name[len(last):]: tensor for name, tensor in weights.items() if name.startswith(last)}
    for k in range(count if stored is None else stored):
        at = f"{prefix}layers.{k}." if prefix else f"model.layers.{layers + k}."
        for name, tensor in block.items():
            weights[at + name] = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        for name, shape in head.items():
            weights[f"{prefix}{name}.weight" if prefix else f"{at}{name}.weight"] = torch.randn(shape, generator=generator)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, mtp_count_key(config): count}, indent=2))
    return {name: tensor for name, tensor in weights.items()
            if name.startswith(prefix or "@") or any(name.startswith(f"model.layers.{layers + k}.") for k in range(count))}


def renumbered(modules, source_layers, cut_layers):
    """The names a checkpoint of `cut_layers` blocks gives modules stored after `source_layers`."""
    out = {}
    for name, tensor in modules.items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{int(index) - source_layers + cut_layers}.{rest}"
        out[name] = tensor
    return out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_cut_carries_the_mtp_modules_after_its_last_block_both_ways(family, tiny_folder, tmp_path):
    """In memory (transformers never loads them: they are copied from the source's files) and
    streamed: the same tensors, byte for byte, at model.layers.{num_hidden_layers} onwards (where
    vLLM and llama.cpp read them); the config counts them; the cut loads without a complaint and can
    be cut again."""
    from surgery.loading import load_model

    source, _ = tiny_folder(family, num_layers=5)
    modules = with_mtp_modules(source)
    for mode, shard in (("no-stream", "50GB"), ("stream", "20KB"), ("no-stream-sharded", "20KB")):
        result = run("cut", source, "--remove", "L1,L3.attn", "--out", tmp_path / mode, f"--{mode.removesuffix('-sharded')}",
                     "--max-shard-size", shard, "--device", "cpu")
        assert result.exit_code == 0, result.output
        config = json.loads((tmp_path / mode / "config.json").read_text())
        assert config["num_hidden_layers"] == 4 and config[mtp_count_key(config)] == 1
        written = all_tensors(tmp_path / mode)
        for name, tensor in renumbered(modules, 5, 4).items():
            assert torch.equal(written[name], tensor), (mode, name)
        index = json.loads((tmp_path / mode / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(written)  # every tensor listed; files named as transformers names shards
        assert all(file.startswith("model-") and file.endswith(f"-of-{len(set(index['weight_map'].values())):05d}.safetensors")
                   for file in index["weight_map"].values())
        assert not (tmp_path / mode / "model.safetensors").exists()
    assert all_tensors(tmp_path / "stream").keys() == all_tensors(tmp_path / "no-stream").keys()
    assert load_model(str(tmp_path / "stream"), device="cpu").model.config.num_hidden_layers == 4

    again = run("cut", tmp_path / "stream", "--remove", "L0", "--out", tmp_path / "again", "--device", "cpu")
    assert again.exit_code == 0, again.output
    written = all_tensors(tmp_path / "again")
    assert all(torch.equal(written[name], tensor) for name, tensor in renumbered(modules, 5, 3).items())


def test_only_the_modules_the_files_hold_are_counted(tiny_folder, tmp_path):
    """A config counting two modules over files holding one (an upload that dropped one): the cut
    carries that one and counts it, and says so; serving engines would look for the other."""
    source, _ = tiny_folder("deepseek_v3", num_layers=4)
    modules = with_mtp_modules(source, count=2, stored=1)
    for mode in ("no-stream", "stream"):
        result = run("cut", source, "--remove", "L2", "--out", tmp_path / mode, f"--{mode}", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert "1 multi-token-prediction module(s) are not in its safetensors files" in " ".join(result.output.split())
        assert json.loads((tmp_path / mode / "config.json").read_text())[DEEPSEEK_KEY] == 1
        assert set(renumbered(modules, 4, 3)) <= set(all_tensors(tmp_path / mode))


@pytest.mark.parametrize("mode", ["--no-stream", "--stream"])
def test_healing_keeps_the_mtp_modules_of_the_cut(mode, tiny_folder, tmp_path, data_dir):
    """LoRA never touches them; the healed checkpoint holds them as the cut had them, merged in
    memory or file to file."""
    source, _ = tiny_folder("deepseek_v3", num_layers=4)
    with_mtp_modules(source)
    cut = tmp_path / "cut"
    assert run("cut", source, "--remove", "L1", "--out", cut, "--device", "cpu").exit_code == 0
    healed = run("heal", cut, "--out", tmp_path / "healed", mode, "--data-dir", data_dir, *HEAL, catch=False)
    assert healed.exit_code == 0, healed.output
    before, after = all_tensors(cut), all_tensors(tmp_path / "healed")
    carried = [name for name in before if name.startswith("model.layers.3.")]
    assert carried and all(torch.equal(after[name], before[name]) for name in carried)
    assert json.loads((tmp_path / "healed" / "config.json").read_text())[DEEPSEEK_KEY] == 1


def test_the_mtp_modules_are_written_in_the_dtypes_the_model_is_exported_in(tiny_folder, tmp_path):
    """--dtype bfloat16 over float32 files: each carried tensor as the model writes the same tensor
    of its last block (GLM keeps its routers' score-correction bias in float32; transformers 5.25 its
    router's weight too), else bfloat16."""
    source, _ = tiny_folder("glm4_moe", num_layers=4)
    modules = with_mtp_modules(source)
    result = run("cut", source, "--remove", "L0", "--out", tmp_path / "bf16", "--no-stream", "--dtype", "bfloat16",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = all_tensors(tmp_path / "bf16")
    kept_as_stored = {name.split(".", 3)[3] for name, t in written.items() if name.startswith("model.layers.2.")
                      and t.dtype == torch.float32}
    assert "mlp.gate.e_score_correction_bias" in kept_as_stored and "self_attn.q_proj.weight" not in kept_as_stored
    for name, tensor in renumbered(modules, 4, 3).items():
        dtype = torch.float32 if name.split(".", 3)[3] in kept_as_stored else torch.bfloat16
        assert written[name].dtype == dtype and torch.equal(written[name], tensor.to(dtype)), name


def fp8_source_with_mtp(tmp_path, excluded=()):
    """A GLM-4.5-style FP8 release of 3 blocks and one MTP module (model.layers.3), its projections FP8 too
    but for those `excluded` (listed in modules_to_not_convert)."""
    from surgery.tiny import tiny_model, tiny_tokenizer
    from tests.test_quantized_sources import fp8_checkpoint

    source = tmp_path / "fp"
    tiny_model("glm4_moe", 3, hidden_size=128, intermediate_size=256, moe_intermediate_size=64).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    with_mtp_modules(source)
    fp8_checkpoint(source, tmp_path / "fp8", excluded=excluded)
    assert any(t.dtype == torch.float8_e4m3fn for name, t in all_tensors(tmp_path / "fp8").items() if ".layers.3." in name)
    return tmp_path / "fp8"


def test_the_mtp_modules_of_a_quantised_source_are_not_carried_and_not_counted(tmp_path):
    """An FP8 source cut in memory is written in full precision; its MTP modules would stay FP8 under a
    config that says nothing of it, so the cut carries none, counts none and says why."""
    fp8_source_with_mtp(tmp_path)
    result = run("cut", tmp_path / "fp8", "--remove", "L0", "--out", tmp_path / "cut", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "are stored fp8-quantised and the model was dequantised" in " ".join(result.output.split())
    assert json.loads((tmp_path / "cut" / "config.json").read_text())[DEEPSEEK_KEY] == 0
    assert not [name for name in all_tensors(tmp_path / "cut") if name.startswith("model.layers.2.")]


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_a_streamed_cut_of_an_fp8_source_carries_its_mtp_modules(dtype, tmp_path):
    """Streamed, an FP8 cut stays FP8 under its quantisation config: the MTP module goes with it, its
    weights and scale grids as stored, numbered on after the last block kept, and counted. Turned back
    (--dtype), the module's weights are turned back with the model's."""
    from surgery.fp8 import dequantized

    excluded = ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "model.layers.3.eh_proj")
    source = fp8_source_with_mtp(tmp_path, excluded)
    result = run("cut", source, "--remove", "L0", "--stream", "--dtype", dtype, "--out", tmp_path / "cut", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config[DEEPSEEK_KEY] == 1 and ("quantization_config" in config) == (dtype == "auto")
    if dtype == "auto":  # (the exclusions follow their blocks: the removed one's goes, the MTP module's moves down)
        assert config["quantization_config"]["modules_to_not_convert"] == ["model.layers.0.self_attn.o_proj",
                                                                           "model.layers.2.eh_proj"]
    stored = all_tensors(source)
    module = {name: tensor for name, tensor in stored.items() if name.startswith("model.layers.3.")}
    written = all_tensors(tmp_path / "cut")
    carried = renumbered(module, 3, 2)
    assert any(name.endswith("weight_scale_inv") for name in carried)
    for name, tensor in carried.items():
        if dtype == "auto":
            assert written[name].dtype == tensor.dtype and torch.equal(written[name].view(torch.uint8), tensor.view(torch.uint8)), name
        elif name.endswith("weight_scale_inv"):
            assert name not in written
        elif tensor.dtype == torch.float8_e4m3fn:
            scale = carried[name.removesuffix("weight") + "weight_scale_inv"]
            assert written[name].dtype == torch.float32 and torch.equal(written[name], dequantized(tensor, scale)), name
        else:
            assert torch.equal(written[name], tensor), name


def test_info_says_what_the_files_hold_and_what_an_export_carries(tiny_folder):
    source, _ = tiny_folder("deepseek_v3", num_layers=4)
    with_mtp_modules(source, count=2, stored=1)
    result = run("info", source, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "1 of 2 module(s) in the files: every export carries those" in " ".join(result.output.replace("│", " ").split())


def test_tensors_the_source_keeps_in_another_dtype_stay_as_stored_both_ways(tiny_folder, tmp_path):
    """A bfloat16 checkpoint whose drafting projection is stored in float32: neither cut rounds it. Its
    router weights, which transformers 5.25 holds in float32, both cuts write in float32, the carried
    MTP module's as its last block's."""
    source, _ = tiny_folder("glm4_moe", num_layers=4)
    with_mtp_modules(source)
    kept = ("correction_bias", "model.layers.4.eh_proj.")  # (transformers keeps the routers' bias in float32)
    weights = {n: t if any(k in n for k in kept) else t.to(torch.bfloat16)
               for n, t in load_file(source / "model.safetensors").items()}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    for mode in ("no-stream", "stream"):
        assert run("cut", source, "--remove", "L0", "--out", tmp_path / mode, f"--{mode}", "--device", "cpu").exit_code == 0
    ours, theirs = all_tensors(tmp_path / "stream"), all_tensors(tmp_path / "no-stream")
    assert ours["model.layers.3.eh_proj.weight"].dtype == torch.float32
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


def test_a_config_that_counts_no_modules_is_not_told_it_lost_one(tiny_folder, tmp_path):
    """DeepSeek-V3's config class counts one module where config.json is silent: the cut says
    nothing of modules it never had, and its config counts none."""
    source, _ = tiny_folder("deepseek_v3", num_layers=3)
    config = json.loads((source / "config.json").read_text())
    config.pop(DEEPSEEK_KEY, None)
    (source / "config.json").write_text(json.dumps(config))
    for mode in ("no-stream", "stream"):
        result = run("cut", source, "--remove", "L1", "--out", tmp_path / mode, f"--{mode}", "--device", "cpu")
        assert result.exit_code == 0 and "multi-token-prediction" not in result.output, result.output
        assert json.loads((tmp_path / mode / "config.json").read_text())[DEEPSEEK_KEY] == 0
    info = run("info", source, "--device", "cpu")
    assert info.exit_code == 0 and "multi-token prediction" not in info.output, info.output


def test_a_prefixed_family_counts_the_modules_its_files_hold(tiny_folder, tmp_path):
    source, _ = tiny_folder("exaone_moe", num_layers=3)
    modules = with_mtp_modules(source, count=2, stored=1)
    result = run("cut", source, "--remove", "L1", "--out", tmp_path / "cut", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cut" / "config.json").read_text())[DEEPSEEK_KEY] == 1
    written = all_tensors(tmp_path / "cut")
    assert {"mtp.fc.weight", "mtp.norm.weight"} <= set(modules) and all(torch.equal(written[n], modules[n]) for n in modules)


def test_the_free_space_check_counts_the_modules_carried(tiny_folder, tmp_path, monkeypatch):
    import surgery.files

    source, _ = tiny_folder("deepseek_v3", num_layers=3)
    modules = with_mtp_modules(source)
    asked = []
    real = surgery.files.check_free_space
    monkeypatch.setattr(surgery.files, "check_free_space", lambda out, size, what: asked.append(size) or real(out, size, what))
    assert run("cut", source, "--remove", "L1", "--out", tmp_path / "cut", "--no-stream", "--device", "cpu").exit_code == 0
    from surgery.export.checkpoint import load_exported, weights_bytes

    model_bytes = weights_bytes(load_exported(tmp_path / "cut"))  # what the check counted before
    assert asked == [model_bytes + sum(t.numel() * t.element_size() for t in modules.values())]


@pytest.mark.parametrize("family, key", [("qwen3_next", "num_nextn_predict_layers"), ("qwen3_5_text", "mtp_num_hidden_layers")])
@pytest.mark.parametrize("mode", ["no-stream", "stream"])
def test_a_prefixed_familys_modules_count_where_the_config_names_no_count(family, key, mode, tiny_folder, tmp_path):
    """A Qwen3-Next config may name no count (vLLM then assumes one module, under the key it reads
    for that family): the files' mtp.layers.{k} say how many there are; the cut carries them and
    writes the count where vLLM reads it; surgery info counts them too."""
    source, _ = tiny_folder(family, num_layers=4)
    modules = with_mtp_modules(source)
    config = json.loads((source / "config.json").read_text())
    config.pop(mtp_count_key(config))
    (source / "config.json").write_text(json.dumps(config))
    result = run("cut", source, "--remove", "L0", "--out", tmp_path / "cut", f"--{mode}", "--device", "cpu")
    assert result.exit_code == 0 and "multi-token-prediction" not in result.output, result.output
    assert json.loads((tmp_path / "cut" / "config.json").read_text())[key] == 1
    written = all_tensors(tmp_path / "cut")
    assert all(torch.equal(written[name], tensor) for name, tensor in modules.items())
    info = run("info", source, "--device", "cpu")
    assert info.exit_code == 0 and "1 of 1 module(s) in the files" in " ".join(info.output.split()), info.output


@pytest.mark.parametrize("mode", ["no-stream", "stream"])
def test_every_count_key_the_config_holds_says_what_the_cut_carries(mode, tiny_folder, tmp_path):
    """A Qwen3-Next config naming its count under both keys, over files holding one of two modules:
    the key vLLM reads for the family and the other one both count the one carried."""
    source, _ = tiny_folder("qwen3_next", num_layers=4)
    with_mtp_modules(source, count=2, stored=1)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 2, "mtp_num_hidden_layers": 2}))
    result = run("cut", source, "--remove", "L0", "--out", tmp_path / "cut", f"--{mode}", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "(num_nextn_predict_layers = 1)" in " ".join(result.output.split())
    written = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == 1 and written["mtp_num_hidden_layers"] == 1
