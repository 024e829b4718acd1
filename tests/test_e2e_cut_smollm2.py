"""End to end on the real SmolLM2-135M: cut four blocks and one attention, reload both ways; a block cut as GGUF."""

from pathlib import Path

import pytest
import torch

from surgery.commands import cut_and_export
from surgery.errors import SurgeryError
from surgery.export.checkpoint import load_exported, read_manifest
from surgery.forward import count_parameters
from surgery.loading import load_model
from surgery.settings import LoadSettings, StreamSettings

pytestmark = pytest.mark.slow


def block_parameters(config):
    """Weights of one Llama block, from the config alone (what the cut must remove)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + hidden
    mlp = 3 * hidden * config.intermediate_size + hidden
    return attention, mlp


@torch.no_grad()
def test_cut_smollm2_blocks_and_an_attention(smollm2_folder, tmp_path):
    out = tmp_path / "smollm2-cut"
    result = cut_and_export("smollm2-135m", "L20-L23,L5.attn", out, LoadSettings(device="cpu"))
    manifest = read_manifest(out)

    source = load_model("smollm2-135m", device="cpu")
    attention, mlp = block_parameters(source.model.config)
    before = count_parameters(source.model)
    assert before == 134_515_008  # SmolLM2-135M as published
    assert manifest["parameters"]["before"] == before
    assert before - manifest["parameters"]["after"] == 4 * (attention + mlp) + attention

    # What the cut must compute, without surgery's cut: the uncut model with the same blocks
    # skipped and the attention zeroed by forward hooks.
    from surgery.sublayers import parse_sublayers
    from tests.hooks import skipped

    prompt = source.tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with skipped(source.model, parse_sublayers("L20-L23,L5.attn")):
        expected = source.model(prompt, use_cache=False).logits
        greedy = prompt
        for _ in range(8):  # greedy decoding by full recompute: no cache to get wrong
            greedy = torch.cat([greedy, source.model(greedy, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    for via in ("package", "remote-code"):
        reloaded = load_exported(out, via=via)
        assert reloaded.config.num_hidden_layers == 26
        assert count_parameters(reloaded) == manifest["parameters"]["after"]
        assert torch.allclose(reloaded(prompt).logits, expected, atol=1e-4), via
        settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=source.tokenizer.pad_token_id)
        assert torch.equal(reloaded.generate(prompt, **settings), greedy)  # with its KV cache
    assert result.loader == "trust_remote_code" and result.max_logit_diff <= 1e-3

    # The same cut streamed file to file (docs/scale.md): the same folder, byte for byte, but the manifest.
    streamed = cut_and_export("smollm2-135m", "L20-L23,L5.attn", tmp_path / "streamed", LoadSettings(device="cpu"),
                              StreamSettings(stream=True, max_shard_size="100MB"))
    assert streamed.manifest["verified"]["method"] == "streamed" and streamed.max_logit_diff <= 1e-3
    in_memory = cut_and_export("smollm2-135m", "L20-L23,L5.attn", tmp_path / "in-memory", LoadSettings(device="cpu"),
                               StreamSettings(stream=False, max_shard_size="100MB"))
    names = sorted(p.name for p in in_memory.path.iterdir())
    assert len([n for n in names if n.startswith("model-")]) > 1 and names == sorted(p.name for p in streamed.path.iterdir())
    assert all((in_memory.path / n).read_bytes() == (streamed.path / n).read_bytes() for n in names if n != "surgery.json")


@torch.no_grad()
def test_block_cut_smollm2_as_gguf_keeps_the_source_tokenizer(smollm2_folder, tmp_path):
    """The GGUF a llama.cpp user gets: SmolLM2's own tokenizer (its `smollm` pre-tokenizer, which the
    transformers folder has lost) copied from the GGUF it came from; the same greedy text."""
    import gguf
    from transformers import AutoModelForCausalLM

    from surgery.export.gguf_write import export_gguf

    folder = tmp_path / "smollm2-blocks"
    cut_and_export("smollm2-135m", "L20-L23", folder, LoadSettings(device="cpu"))
    result = export_gguf(folder, tmp_path / "smollm2-blocks.gguf", dtype="f16")
    assert result.tokenizer_from.endswith(".gguf") and result.max_kl < 1e-4
    reader = gguf.GGUFReader(str(result.path))
    assert reader.get_field("tokenizer.ggml.pre").contents() == "smollm"
    assert reader.get_field("llama.block_count").contents() == 26
    source_file = Path(result.tokenizer_from)
    before = source_file.stat().st_mtime_ns, source_file.stat().st_size
    with pytest.raises(SurgeryError, match="never overwritten"):
        export_gguf(folder, source_file, force=True)
    assert (source_file.stat().st_mtime_ns, source_file.stat().st_size) == before

    pruned = load_exported(folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=result.path.name, dtype=torch.float32).eval()
    source = load_model("smollm2-135m", device="cpu")
    prompt = source.tokenizer("The capital of France is", return_tensors="pt").input_ids
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=source.tokenizer.pad_token_id)
    assert torch.equal(loaded.generate(prompt, **settings), pruned.generate(prompt, **settings))


@torch.no_grad()
def test_sublayer_cut_smollm2_as_nemotron_nas_computes_the_sublayer_export(smollm2_folder, tmp_path):
    """The layout vLLM and llama.cpp's `deci` serve (docs/serving.md), on the real model: attention
    gone from two blocks and an FFN from one, the same logits and cached greedy tokens as the
    family-layout export of the same cut."""
    from surgery.settings import ExportSettings

    remove = "L5.attn,L9.attn,L12.mlp"
    hf = cut_and_export("smollm2-135m", remove, tmp_path / "hf", LoadSettings(device="cpu"))
    nas = cut_and_export("smollm2-135m", remove, tmp_path / "nas", LoadSettings(device="cpu"),
                         export=ExportSettings(format="nemotron-nas"))
    assert nas.manifest["layout"] == "nemotron-nas" and nas.max_logit_diff <= 1e-3
    import json

    blocks = json.loads((nas.path / "config.json").read_text())["block_configs"]
    assert [i for i, b in enumerate(blocks) if b["attention"]["no_op"]] == [5, 9]
    assert [i for i, b in enumerate(blocks) if b["ffn"]["no_op"]] == [12]
    a, b = load_exported(hf.path), load_exported(nas.path)
    prompt = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767]])
    assert torch.allclose(a(prompt).logits, b(prompt).logits, atol=1e-4)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(a.generate(prompt, **settings), b.generate(prompt, **settings))
