"""GGUF export: block-pruned checkpoints written for llama.cpp, read back with transformers' GGUF reader."""

import gguf
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from surgery.arch import ARCHITECTURES
from surgery.cli import main
from surgery.cut import cut
from surgery.errors import SurgeryError
from surgery.export.checkpoint import export_checkpoint
from surgery.export.gguf import export_gguf, gguf_tokenizer
from surgery.sublayers import parse_sublayers
from surgery.tiny import tiny_model, tiny_tokenizer
from tests.test_ablation import ids

GGUF_FAMILIES = sorted(family for family, arch in ARCHITECTURES.items() if arch.gguf_arch)


def pruned_folder(tmp_path, tokenizer, family="llama", remove="L1,L3", **overrides):
    model = tiny_model(family, num_layers=5, **overrides)
    cut(model, parse_sublayers(remove))
    folder = tmp_path / f"{family}-{len(list(tmp_path.iterdir()))}"
    export_checkpoint(model, tokenizer, folder, record={"removed": remove.split(",")})
    return folder, model


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}


@pytest.mark.parametrize("family", GGUF_FAMILIES)
@torch.no_grad()
def test_block_pruned_model_reads_back_with_the_same_logits(family, tmp_path, tokenizer):
    # A model vocabulary larger than the tokenizer's, as in real Llama 3 and Qwen checkpoints.
    window = {"sliding_window": None} if family == "mistral" else {}  # Mistral v0.2 on: full attention
    folder, model = pruned_folder(tmp_path, tokenizer, family, vocab_size=400, **window)
    if family == "mistral":  # a file named exactly "mistral" is one transformers' GGUF reader would misread
        (tmp_path / "named").mkdir()
        folder = folder.rename(tmp_path / "named" / "mistral")
    result = export_gguf(folder, tmp_path / "model.gguf", dtype="f32")
    assert result.architecture == ARCHITECTURES[family].gguf_arch and result.max_kl <= 1e-6

    reader, values = fields(result.path)
    arch = values["general.architecture"]
    assert values[f"{arch}.block_count"] == 3
    assert values[f"{arch}.attention.head_count_kv"] == model.config.num_key_value_heads
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == 400 and tokens[399] == "[PAD399]"
    names = {tensor.name for tensor in reader.tensors}
    assert "output.weight" in names and "blk.2.ffn_down.weight" in names and "blk.3.ffn_down.weight" not in names

    # An independent reader (transformers' GGUF loader undoes llama.cpp's rotary permutation itself).
    # Read as the file's own family (llama.cpp runs Mistral as Llama), with the model's hyperparameters.
    as_file = AutoConfig.for_model(arch, **{k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")})
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", config=as_file).eval()
    prompt = ids(1, 12)
    assert torch.allclose(loaded(prompt).logits, model(prompt).logits, atol=1e-5)
    read_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    text = "Paris is the capital of France. 1234 apples!"
    assert read_tokenizer(text).input_ids == tokenizer(text).input_ids


NUMBERS = " In 2024, 1,234 people paid $56.78 for 12 seats in 1999 and 2020." * 8


def test_digit_splitting_tokenizer_is_named_for_llama_cpp_and_a_wrong_name_is_caught(tmp_path):
    """Digits first, then GPT-2's split (StarCoder, SmolLM) is llama.cpp's "starcoder" group; a
    --tokenizer-pre that splits text differently from tokenizer.json is refused before anything lands."""
    digits = tiny_tokenizer(split_digits=True, extra_text=NUMBERS)
    folder, _ = pruned_folder(tmp_path, digits)
    result = export_gguf(folder, tmp_path / "digits.gguf", dtype="f32")
    assert gguf.GGUFReader(str(result.path)).get_field("tokenizer.ggml.pre").contents() == "starcoder"
    text = "In 2024,  1,234 people paid $56.78."
    assert gguf_tokenizer(result.path)(text).input_ids == digits(text).input_ids

    merged = tiny_tokenizer(extra_text=NUMBERS)  # GPT-2's split: "2024" is one token here
    assert len(merged(" 2024").input_ids) < len(digits(" 2024").input_ids)
    folder, _ = pruned_folder(tmp_path, merged)
    with pytest.raises(SurgeryError, match="--tokenizer-pre"):
        export_gguf(folder, tmp_path / "wrong.gguf", dtype="f32", tokenizer_pre="smollm")
    assert not [p.name for p in tmp_path.iterdir() if "wrong" in p.name]


@torch.no_grad()
def test_rotary_rows_are_permuted_for_llama(tmp_path, tokenizer):
    """Written without llama.cpp's permutation the file would still load; the logits would not match."""
    folder, model = pruned_folder(tmp_path, tokenizer)
    path = export_gguf(folder, tmp_path / "model.gguf", dtype="f32").path
    reader = gguf.GGUFReader(str(path))
    written = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    original = model.model.layers[0].self_attn.q_proj.weight.numpy()
    assert written.shape == original.shape and not (written == original).all()
    assert sorted(written.ravel().tolist()) == sorted(original.ravel().tolist())  # the same values, reordered


@torch.no_grad()
def test_types_sizes_and_tied_embeddings(tmp_path, tokenizer):
    folder, model = pruned_folder(tmp_path, tokenizer, tie_word_embeddings=True)
    sizes = {}
    for dtype in ("f32", "f16", "q8_0"):
        result = export_gguf(folder, tmp_path / f"{dtype}.gguf", dtype=dtype)
        sizes[dtype] = result.bytes
        reader = gguf.GGUFReader(str(result.path))
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert "output.weight" not in kinds  # tied: llama.cpp reuses token_embd
        assert kinds["blk.0.attn_norm.weight"] == "F32"
        assert kinds["blk.0.ffn_up.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_refusals_name_the_fix_and_leave_nothing(tmp_path, tokenizer):
    folder, _ = pruned_folder(tmp_path, tokenizer, remove="L1.attn,L3")
    with pytest.raises(SurgeryError, match="--granularity block"):
        export_gguf(folder, tmp_path / "sub.gguf")
    gemma, _ = pruned_folder(tmp_path, tokenizer, family="gemma")
    with pytest.raises(SurgeryError, match="convert_hf_to_gguf"):
        export_gguf(gemma, tmp_path / "gemma.gguf")

    for family, window in (("mistral", {"sliding_window": 8}), ("qwen2", {"use_sliding_window": True, "sliding_window": 8})):
        windowed, _ = pruned_folder(tmp_path, tokenizer, family=family, max_window_layers=0, **window)
        with pytest.raises(SurgeryError, match="sliding-window layers"):
            export_gguf(windowed, tmp_path / "windowed.gguf")

    scaled, _ = pruned_folder(tmp_path, tokenizer, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(SurgeryError, match="rope scaling 'linear'"):
        export_gguf(scaled, tmp_path / "scaled.gguf")

    plain, _ = pruned_folder(tmp_path, tokenizer)
    with pytest.raises(SurgeryError, match=r"\.gguf"):
        export_gguf(plain, tmp_path / "model.bin")
    with pytest.raises(SurgeryError, match="inside the model folder"):
        export_gguf(plain, plain / "model.gguf")
    existing = tmp_path / "existing.gguf"
    existing.write_text("keep me")
    with pytest.raises(SurgeryError, match="--force"):
        export_gguf(plain, existing)
    assert existing.read_text() == "keep me"

    short, _ = pruned_folder(tmp_path, tokenizer, family="qwen2", vocab_size=300)
    with pytest.raises(SurgeryError, match="beyond the model's vocab_size"):
        export_gguf(short, tmp_path / "short.gguf")

    (plain / "tokenizer.json").unlink()  # fails while writing: no partial file may remain
    with pytest.raises(SurgeryError, match="tokenizer.json"):
        export_gguf(plain, tmp_path / "broken.gguf")
    assert not any(p.name.startswith(".broken") or p.name == "broken.gguf" for p in tmp_path.iterdir())


def test_cli_writes_and_reports(tmp_path, tokenizer):
    folder, _ = pruned_folder(tmp_path, tokenizer)
    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(main, ["gguf", str(folder), "--out", str(out), "--type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "llama" in result.output and "KL" in result.output
    again = CliRunner().invoke(main, ["gguf", str(folder), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


def test_llama3_rope_factors_match_transformers(tmp_path, tokenizer):
    """Llama 3.1 scaling goes into llama.cpp's rope_freqs tensor: default frequencies over scaled ones."""
    scaling = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    folder, model = pruned_folder(tmp_path, tokenizer, rope_parameters=scaling)
    plain = tiny_model("llama", num_layers=2)
    expected = (plain.model.rotary_emb.inv_freq / model.model.rotary_emb.inv_freq).numpy()
    assert expected.min() == pytest.approx(1.0) and expected.max() == pytest.approx(8.0)  # both regimes and the ramp
    assert ((expected > 1.01) & (expected < 7.99)).any()

    path = export_gguf(folder, tmp_path / "llama3.gguf", dtype="f32").path
    written = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight").data
    assert written == pytest.approx(expected, rel=1e-5)
