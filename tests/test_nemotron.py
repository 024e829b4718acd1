"""The Nemotron-NAS (DeciLM) export: NVIDIA's layout as vLLM reads it, loaded by its own code under
transformers 5, computing what today's sublayer export of the same cut computes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from surgery.cli import main
from surgery.cut import cut, removed_sublayers
from surgery.errors import SurgeryError
from surgery.export.checkpoint import export_checkpoint, load_exported, read_manifest
from surgery.export.nemotron import ffn_mult
from surgery.sublayers import parse_sublayers
from surgery.tiny import tiny_model
from tests.cli import error_line
from tests.test_ablation import assert_cache_consistent, ids
from tests.test_cut_export import weight_names


def vllm_width(ffn_mult_value, hidden_size):
    """vllm/model_executor/models/nemotron_nas.py: _ffn_mult_to_intermediate_size, as written there."""
    intermediate_size = int(2 * ffn_mult_value * hidden_size / 3)
    return intermediate_size if intermediate_size % 256 == 0 else intermediate_size + 256 - intermediate_size % 256


def both_exports(tmp_path, tokenizer, family, remove, num_layers=5):
    """The same cut written in both layouts; returns (cut model, hf folder, nemotron folder)."""
    model = tiny_model(family, num_layers=num_layers)
    cut(model, parse_sublayers(remove))
    hf = export_checkpoint(model, tokenizer, tmp_path / f"{family}-hf", record={}).path
    nas = export_checkpoint(model, tokenizer, tmp_path / f"{family}-nas", record={}, layout="nemotron-nas")
    assert nas.loader == "trust_remote_code" and nas.max_logit_diff <= 1e-5
    return model, hf, nas.path


def greedy(model, prompt, cache):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, pad_token_id=0, use_cache=cache)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@torch.no_grad()
def test_the_nemotron_export_computes_what_the_sublayer_export_computes(family, tmp_path, tokenizer):
    # 5 blocks, L3 goes whole: kept blocks are old 0, 1, 2, 4; block 1 lacks attention, block 2 its FFN.
    model, hf, nas = both_exports(tmp_path, tokenizer, family, "L1.attn,L2.mlp,L3")
    config = json.loads((nas / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"]["AutoConfig"] == "modeling_decilm.DeciLMConfig"
    assert config["num_hidden_layers"] == 4 and "rope_theta" in config and "rope_parameters" not in config
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, None, 2, 2]  # 4 heads over 2 KV heads
    # The tiny FFN (96) is no multiple of 256: zero-padded to 256, which ffn_mult 6.0 gives back in vLLM.
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [6.0, 6.0, None, 6.0]
    assert vllm_width(6.0, 64) == 256
    assert all(b["attention"]["replace_with_linear"] is False and b["ffn"]["replace_with_linear"] is False for b in blocks)

    names = weight_names(nas)  # vLLM raises KeyError on any weight its layers do not have
    assert not any(n.startswith(("model.layers.1.self_attn.", "model.layers.1.input_layernorm")) for n in names)
    assert not any(n.startswith(("model.layers.2.mlp.", "model.layers.2.post_attention_layernorm")) for n in names)
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.layers.2.self_attn.o_proj.weight" in names
    manifest = read_manifest(nas)
    assert manifest["layout"] == "nemotron-nas" and manifest["nemotron"]["ffn_zero_padded_from"] == 96

    reloaded = load_exported(nas)  # trust_remote_code: the shipped modeling_decilm.py
    gate = reloaded.model.layers[0].mlp.gate_proj.weight
    assert gate.shape == (256, 64) and not gate[96:].any()
    prompt = ids(1, 10)
    expected = load_exported(hf)(prompt).logits
    assert torch.allclose(reloaded(prompt).logits, expected, atol=1e-5)
    assert torch.allclose(expected, model(prompt).logits, atol=1e-5)
    assert torch.equal(greedy(reloaded, prompt, cache=True), greedy(reloaded, prompt, cache=False))
    assert torch.equal(greedy(reloaded, prompt, cache=True), greedy(model, prompt, cache=True))
    assert_cache_consistent(reloaded)
    stand_ins = [(type(layer.self_attn).__name__, type(layer.mlp).__name__) for layer in reloaded.model.layers]
    assert stand_ins[1][0] == "RemovedAttention" and stand_ins[2][1] == "RemovedMLP"
    assert [str(u) for u in removed_sublayers(load_exported(nas, via="package"))] == ["L1.attn", "L2.mlp"]


@torch.no_grad()
def test_a_first_block_without_attention_keeps_a_null_attention(tmp_path, tokenizer):
    """vLLM's first layer and llama.cpp's head size both need attention in block 0: it is kept with
    every projection zero, which adds exactly nothing."""
    model, hf, nas = both_exports(tmp_path, tokenizer, "llama", "L0.attn,L2.mlp", num_layers=4)
    blocks = json.loads((nas / "config.json").read_text())["block_configs"]
    assert blocks[0]["attention"] == blocks[1]["attention"]  # an ordinary attention entry, as block 1 (kept whole) has
    assert read_manifest(nas)["nemotron"]["null_attention_blocks"] == [0]
    reloaded = load_exported(nas)
    assert not reloaded.model.layers[0].self_attn.o_proj.weight.any()
    prompt = ids(2, 12)
    assert torch.allclose(reloaded(prompt).logits, load_exported(hf)(prompt).logits, atol=1e-5)
    assert_cache_consistent(reloaded)


def test_saved_again_by_its_users_it_still_loads(tmp_path, tokenizer):
    """In fresh processes, as users (and vLLM's workers, which pickle the config) meet it: loaded with
    its own code, its config pickled, saved again with save_pretrained, loaded again."""
    model, _, nas = both_exports(tmp_path, tokenizer, "llama", "L1.attn,L2.mlp", num_layers=4)
    prompt = ids(1, 8)
    with torch.no_grad():
        expected = model(prompt).logits
    again, logits = tmp_path / "again", tmp_path / "logits.pt"
    head = "import pickle, torch\nfrom transformers import AutoConfig, AutoModelForCausalLM as Auto\n"
    resave = head + (f"config = pickle.loads(pickle.dumps(AutoConfig.from_pretrained({str(nas)!r}, trust_remote_code=True)))\n"
                     "assert config.block_configs[1].attention.no_op and config.block_configs[2].ffn.no_op\n"
                     f"Auto.from_pretrained({str(nas)!r}, trust_remote_code=True).save_pretrained({str(again)!r})\n")
    reload = head + (f"model = Auto.from_pretrained({str(again)!r}, trust_remote_code=True)\n"
                     f"torch.save(model(torch.tensor({prompt.tolist()})).logits.detach(), {str(logits)!r})\n")
    for script in (resave, reload):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
    assert torch.allclose(torch.load(logits), expected, atol=1e-5)


@pytest.mark.parametrize("hidden, width, mult", [(4096, 14336, 5.25), (8192, 14336, 2.625), (4096, 11008, 4.03125),
                                                 (576, 1536, 4.0), (2048, 5632, 4.125)])
def test_ffn_mult_gives_back_the_width_in_vllm(hidden, width, mult):
    """Llama-3-8B and Nemotron-Super-49B's own blocks (5.25, 2.625 in NVIDIA's config), Llama-2, SmolLM2, TinyLlama."""
    assert ffn_mult(width, hidden) == mult
    assert vllm_width(mult, hidden) == width


def test_the_cli_writes_it_and_refuses_what_it_cannot_write(tiny_folder, tmp_path):
    source, _ = tiny_folder("llama", num_layers=4)
    out = tmp_path / "nas"
    result = CliRunner().invoke(main, ["cut", str(source), "--remove", "L1.attn,L2.mlp", "--format", "nemotron-nas",
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas"
    info = CliRunner().invoke(main, ["info", str(out), "--device", "cpu"])
    assert info.exit_code == 0 and "L1.attn,L2.mlp" in info.output.replace(" ", ""), info.output

    again = CliRunner().invoke(main, ["cut", str(out), "--remove", "L0.mlp", "--out", str(tmp_path / "again")])
    assert again.exit_code == 2 and "cut the original checkpoint" in error_line(again)
    gemma, _ = tiny_folder("gemma")
    refused = CliRunner().invoke(main, ["cut", str(gemma), "--remove", "L1.attn", "--format", "nemotron-nas",
                                        "--out", str(tmp_path / "gemma")])
    assert refused.exit_code == 2 and "gemma" in error_line(refused) and "--format hf" in error_line(refused)
    windowed = tmp_path / "sliding-src"
    tiny_model("mistral", sliding_window=8).save_pretrained(windowed)
    refused = CliRunner().invoke(main, ["cut", str(windowed), "--remove", "L1.attn", "--format", "nemotron-nas",
                                        "--out", str(tmp_path / "sliding-out")])
    assert refused.exit_code == 2 and "sliding-window" in error_line(refused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-src", "llama-src", "nas", "sliding-src"]


def test_a_recipe_chooses_the_format_and_prune_refuses_before_loading(tiny_folder, tmp_path):
    source, _ = tiny_folder("qwen2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {source}\nremove: L1.attn\nformat: nemotron-nas\nbridge: false\n")
    result = CliRunner().invoke(main, ["prune", "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "qwen2" in error_line(result) and "--format hf" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_does_not_compute_the_cut_model_is_never_written(tmp_path, tokenizer, monkeypatch):
    """The export is reloaded and compared before it lands: block configs that drop every FFN on
    reload (the weights are there, the config says no_op) fail the check and leave nothing."""
    import surgery.export.nemotron as nemotron

    original = nemotron.block_config

    def without_ffns(block, config, width):
        entry = original(block, config, width)
        entry["ffn"]["no_op"] = True
        return entry

    monkeypatch.setattr(nemotron, "block_config", without_ffns)
    model = tiny_model("llama")
    cut(model, parse_sublayers("L1.attn"))
    with pytest.raises(SurgeryError, match="export check failed"):
        export_checkpoint(model, tokenizer, tmp_path / "out", record={}, layout="nemotron-nas")
    assert list(tmp_path.iterdir()) == []


def test_prune_exports_the_layout_its_recipe_names(tiny_folder, tmp_path, monkeypatch):
    """The prune stages end in the same verified export, report and model card sealed into it."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    source, _ = tiny_folder("llama", num_layers=6)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {source}\nremove: L0.attn,L3.mlp\nformat: nemotron-nas\nbridge: false\n"
                      "eval_tasks: none\neval_ppl: none\neval_speed: false\neval_generation: false\ndevice: cpu\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["prune", "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["layout"] == "nemotron-nas" and manifest["nemotron"]["null_attention_blocks"] == [0]
    assert {"README.md", "report.json", "modeling_decilm.py"} <= set(manifest["files"])
    card = (out / "README.md").read_text()  # names the file the folder ships, and no evaluation it did not run
    assert "modeling_decilm.py" in card and "modeling_surgery.py" not in card and "trust_remote_code=True" in card
    assert "## Evaluation" not in card
    assert json.loads((out / "report.json").read_text())["settings"]["export"] == {"format": "nemotron-nas"}
    blocks = json.loads((out / "config.json").read_text())["block_configs"]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, True, False, False]
