"""Mamba, Mamba-2 (Codestral Mamba) and Falcon Mamba: every block is one norm and one Mamba mixer, with
no attention and no FFN. The mixer is the block's one sublayer (its attention kind, a linear one), so
removing it deletes the block, a cut is a plain checkpoint of the family, and no cut is refused for
keeping no attention block (there is none to keep)."""

import json

import pytest
import torch

from surgery.arch import ARCHITECTURES, decoder_layers
from surgery.sublayers import Sublayer, parse_sublayers
from surgery.tiny import tiny_model
from tests.cli import one_line, run
from tests.test_ablation import ids

FAMILIES = ["mamba", "mamba2", "falcon_mamba"]
HEAL = ["--heal", "--heal-steps", "6", "--heal-lr", "3e-3", "--heal-seq-len", "32", "--heal-batch-size", "2", "--no-quantize"]
FAST = ["--samples", "2", "--seq-len", "32", "--eval-tasks", "piqa", "--eval-limit", "4", "--eval-ppl", "wikitext2",
        "--eval-ppl-windows", "2", "--no-eval-speed", "--device", "cpu"]


def assert_recurrent_cache_consistent(model):
    """Greedy decoding through the recurrent cache is full recomputation's, and a left-padded batch
    decodes as each prompt alone. (transformers' Mamba and Falcon Mamba continue a cached prefix one
    token at a time, as generate does; a chunk of several differs in their own code, cut or not.)"""
    prompt = ids(1, 9, seed=3)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **settings), model.generate(prompt, use_cache=False, **settings))
    short, long = ids(1, 5, seed=4), ids(1, 11, seed=5)
    batch = torch.full((2, 11), 0)
    batch[0, 6:], batch[1] = short[0], long[0]
    mask = (torch.arange(11) >= torch.tensor([[6], [0]])).long()
    together = model.generate(batch, attention_mask=mask, **settings)[:, 11:]
    alone = [model.generate(x, attention_mask=torch.ones_like(x), **settings)[:, x.shape[1]:] for x in (short, long)]
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_block_is_one_mixer_and_no_attention_block_must_stay(family):
    from surgery.cut import sublayer_parameters

    model = tiny_model(family, num_layers=4)
    arch = ARCHITECTURES[family]
    assert arch.absent_sublayers(model.config) == parse_sublayers("L0.mlp,L1.mlp,L2.mlp,L3.mlp")
    assert arch.absent_sublayers({"model_type": family, "num_hidden_layers": 4}) == parse_sublayers("L0.mlp,L1.mlp,L2.mlp,L3.mlp")
    assert arch.attention_blocks(model.config) is None
    size = sublayer_parameters(model)
    for index, layer in enumerate(decoder_layers(model)):
        own = sum(p.numel() for p in layer.parameters())
        assert size([Sublayer(index, "attn")]) == size(parse_sublayers(f"L{index}")) == own


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_cut_is_a_plain_checkpoint_that_computes_the_skipped_model(family, stream, tiny_folder, tmp_path):
    """Removing two blocks, one of them named by its mixer: a plain checkpoint of the family that
    computes what the uncut model computes with those blocks skipped, and whose recurrent cache
    gives chunked prefill and padded batches the uncached results."""
    from transformers import AutoModelForCausalLM

    from tests.hooks import skipped

    source, model = tiny_folder(family, num_layers=5)
    result = run("cut", source, "--remove", "L0,L3.attn", "--out", tmp_path / "cut", stream, "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["model_type"] == family and "surgery" not in config and config["num_hidden_layers"] == 3
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    prompt = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with skipped(model.eval(), parse_sublayers("L0,L3")):
        expected = model(prompt, use_cache=False).logits
    assert torch.allclose(cut(prompt, use_cache=False).logits, expected, atol=1e-5)
    assert_recurrent_cache_consistent(cut)


def test_named_ids_name_the_mixer_and_nothing_else(tiny_folder, tmp_path):
    source, _ = tiny_folder("mamba2", num_layers=4)
    line = one_line(run("cut", source, "--remove", "L1.mlp", "--out", tmp_path / "a"))
    assert "L1.mlp does not exist: block L1 holds one mixer, its attn sublayer" in line and "name L1" in line
    assert not (tmp_path / "a").exists()
    info = " ".join(run("info", source, "--device", "cpu").output.split())
    assert "4 (L0-L3)" in info and "attention blocks" not in info


def test_prune_heals_and_exports_a_mamba_2_model(tiny_folder, tmp_path, data_dir, monkeypatch):
    """Scoring, planning, a bridge folded into the mixer before each removed run, LoRA on its input
    projection, export and the evaluations before and after."""
    from surgery.export.checkpoint import load_exported

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    source, _ = tiny_folder("mamba2", num_layers=6)
    out = tmp_path / "pruned"
    result = run("prune", source, "--out", out, "--strategy", "bi", "--remove", "2", *HEAL, "--data-dir", data_dir, *FAST,
                 catch=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["evaluations"]) == {"source", "pruned", "healed"}
    assert report["healing"]["loss_after"] < report["healing"]["loss_before"]
    assert report["bridge"]["bridges"] and not report["bridge"]["skipped"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert load_exported(out, via="package").config.num_hidden_layers == 4
