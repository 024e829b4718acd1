"""RecurrentGemma (Griffin): what the family-wide tests do not reach. Its recurrent blocks keep their
state in their own modules (no cache slot to keep a length in) and return (output, None) as its local
attentions do, so one stand-in serves both kinds; its block_types is a pattern transformers repeats to
the layer count, which the 2B's config.json calls _block_types; and a cut must keep an attention block,
from whose cache slot transformers sizes its masks."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from surgery.arch import decoder_layers
from surgery.cut import cut
from surgery.export.checkpoint import export_checkpoint, load_exported
from surgery.hf_modeling import RemovedAttention
from surgery.sublayers import parse_sublayers
from surgery.tiny import tiny_model
from tests.cli import error_line, run
from tests.hooks import skipped
from tests.test_ablation import assert_cache_consistent, ids
from tests.test_hybrid import FAST, cut_beside_hooks, exported_names, reloaded_both_ways

FAMILY = "recurrent_gemma"
R, A = "recurrent", "attention"


def as_the_2b_is_released(folder):
    """recurrentgemma-2b's config.json: no block_types, a 3-entry _block_types (which transformers 5
    ignores, repeating its own default, the same R R A; transformers 4 and mlx-lm read it)."""
    config = json.loads((folder / "config.json").read_text())
    config["_block_types"] = config.pop("block_types")[:3]
    (folder / "config.json").write_text(json.dumps(config))


@torch.no_grad()
def test_transformers_continues_a_prefill_token_by_token_only():
    """Why tests.test_ablation continues this family token by token: transformers' own RecurrentGemma,
    uncut, returns no cache and restarts its convolution in a multi-token call after a prefill."""
    model = tiny_model(FAMILY, 6)
    sequence = ids(batch=1, length=14, seed=3)
    full = model(sequence, use_cache=False).logits
    assert "cache" not in model(sequence[:, :9], use_cache=True)
    cache = DynamicCache(config=model.config)
    model(sequence[:, :9], cache=cache, use_cache=True, position_ids=torch.arange(9)[None])
    chunk = model(sequence[:, 9:], cache=cache, use_cache=True, position_ids=torch.arange(9, 14)[None]).logits
    assert not torch.allclose(chunk, full[:, 9:], atol=1e-3)
    assert_cache_consistent(model)


@torch.no_grad()
def test_each_kind_of_temporal_block_goes_with_the_attention_stand_in(tmp_path, tokenizer):
    """A recurrence (L3) and a local attention (L2) removed from R R A R R A, L1 whole: the checkpoint
    holds neither's weights and reloads both ways with the stand-in in both blocks, decoding from its
    cache as it does without."""
    _, model, prompt, expected = cut_beside_hooks(FAMILY, "L1,L2.attn,L3.attn")
    assert model.config.block_types == [R, A, R, R, A]
    names = exported_names(model, tokenizer, tmp_path / "out")
    assert not any(n.startswith(("model.layers.1.temporal_block.", "model.layers.2.temporal_block.")) for n in names)
    assert any(n.startswith("model.layers.3.temporal_block.linear_x") for n in names)
    for reloaded in reloaded_both_ways(tmp_path / "out", model, prompt, expected, ["L1.attn", "L2.attn"]):
        layers = decoder_layers(reloaded)  # (the shipped file's classes, or this package's)
        assert type(layers[1].temporal_block).__name__ == type(layers[2].temporal_block).__name__ == RemovedAttention.__name__


@pytest.mark.parametrize("layout", ["2b", "9b"])
@torch.no_grad()
def test_a_cut_writes_the_kept_layers_types_whichever_key_the_release_uses(layout, tmp_path, tokenizer):
    settings = {"_block_types": [R, R, A]} if layout == "2b" else {"block_types": [R, R, A]}
    model = tiny_model(FAMILY, num_layers=7, **settings)  # R R A R R A R
    prompt = ids(1, 10)
    with skipped(model, parse_sublayers("L1,L5")):
        expected = model(prompt, use_cache=False).logits
    cut(model, parse_sublayers("L1,L5"))
    kept = [R, A, R, R, R]
    export_checkpoint(model, tokenizer, tmp_path / "out", record={})
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["block_types"] == kept and written.get("_block_types", kept) == kept
    assert ("_block_types" in written) == (layout == "2b")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(reloaded(prompt).logits, expected, atol=1e-5)


@torch.no_grad()
def test_the_2b_layout_is_cut_streamed_as_in_memory(tiny_folder, tmp_path):
    from tests.test_streamed_cut import tensors, tokens

    source, model = tiny_folder(FAMILY, num_layers=7)
    as_the_2b_is_released(source)
    for mode in ("no-stream", "stream"):
        result = run("cut", source, "--remove", "L1,L5,L3.attn", "--out", tmp_path / mode, f"--{mode}", "--device", "cpu")
        assert result.exit_code == 0, result.output
        written = json.loads((tmp_path / mode / "config.json").read_text())
        assert written["block_types"] == written["_block_types"] == [R, A, R, R, R], written
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == \
        json.loads((tmp_path / "no-stream" / "config.json").read_text())
    ours, theirs = tensors(tmp_path / "stream"), tensors(tmp_path / "no-stream")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with skipped(model, parse_sublayers("L1,L5,L3.attn")):
        expected = model(tokens(), use_cache=False).logits
    reloaded = load_exported(tmp_path / "stream", via="remote-code")
    assert torch.allclose(reloaded(tokens(), use_cache=False).logits, expected, atol=1e-5)
    assert_cache_consistent(reloaded)


def test_a_cut_or_prune_that_keeps_no_attention_block_is_refused_before_loading(tiny_folder, tmp_path, data_dir):
    """The attention blocks are read from the 2B's config.json, which lists no layer types (transformers
    derives them from block_types): refused in one line, nothing written; info names them."""
    source, _ = tiny_folder(FAMILY, num_layers=6)  # attention: L2, L5
    as_the_2b_is_released(source)
    for args in (("cut", source, "--remove", "L2,L5", "--out", tmp_path / "cut", "--device", "cpu"),
                 ("prune", source, "--remove", "L2,L5", "--out", tmp_path / "pruned", "--data-dir", data_dir, *FAST)):
        result = run(*args)
        assert result.exit_code == 2 and "removes every attention block (L2,L5) of a hybrid model" in error_line(result)
    assert not (tmp_path / "cut").exists() and not (tmp_path / "pruned").exists()
    info = run("info", source, "--device", "cpu")
    assert "L2, L5 (the other 4 hold linear attention)" in " ".join(info.output.split()), info.output
    assert run("cut", source, "--remove", "L2,L5.attn", "--out", tmp_path / "ok", "--device", "cpu").exit_code == 0
