"""The model resolver: aliases, GGUF files, folders, Hub ids (offline), fingerprints."""

import os
import shutil
import time

import pytest

from surgery.errors import SurgeryError
from surgery.loading import load_model
from surgery.source import builtin_gguf_path, cache_dir, fingerprint, resolve


def test_gguf_file_and_alias_share_one_cached_conversion(smollm2_folder):
    gguf = builtin_gguf_path("smollm2-135m")
    source = resolve(str(gguf))
    assert source.kind == "gguf" and source.path == smollm2_folder
    assert resolve("smollm2-135m").kind == "alias"
    assert smollm2_folder.parent == cache_dir() / "models"
    assert (smollm2_folder / "model.safetensors").is_file() and (smollm2_folder / "tokenizer.json").is_file()


def test_a_gguf_file_is_read_once_for_its_digest_until_it_changes(tmp_path):
    """Finding a cached conversion hashed the whole .gguf on every command (minutes for 40 GB)."""
    from surgery.provenance import file_sha256

    gguf, cache = tmp_path / "model.gguf", tmp_path / "cache"
    gguf.write_bytes(b"a" * 1000)
    stamp = gguf.stat().st_mtime_ns
    first = file_sha256(gguf, cache=cache)
    assert first == file_sha256(gguf)
    gguf.write_bytes(b"b" * 1000)
    os.utime(gguf, ns=(stamp, stamp))  # same size and time: the recorded digest, the file not read again
    assert file_sha256(gguf, cache=cache) == first
    os.utime(gguf, ns=(stamp + 10**9, stamp + 10**9))  # touched: read again
    assert file_sha256(gguf, cache=cache) == file_sha256(gguf) != first


def test_builtin_tokenizer_splits_text_as_llama_cpp_does(smollm2_folder):
    """SmolLM2's GGUF names the `smollm` pre-tokenizer: every \\p{N} on its own, then GPT-2's regex
    (llama.cpp's llama-vocab.cpp, both patterns verbatim). transformers' own GGUF reading drops the
    first step; the cached conversion has it, as the original tokenizer.json does."""
    import regex
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = "She died 4 ½ months later, in 1999;  42 days  after 3rd place."
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
    pieces = [piece for part in regex.split(r"(\p{N})", text) for piece in gpt2.findall(part)]
    assert "".join(pieces) == text
    spell = bytes_to_unicode()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder))
    split = [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert split == ["".join(spell[byte] for byte in piece.encode()) for piece in pieces]

    gguf = builtin_gguf_path("smollm2-135m")
    plain = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert plain(text).input_ids != tokenizer(text).input_ids  # " ½" and the double spaces are where they part
    plain_text = "The capital of France is Paris, 2,024 km away."
    assert plain(plain_text).input_ids == tokenizer(plain_text).input_ids  # SmolLM2 has no multi-digit tokens


def test_fingerprint_is_cached_and_notices_changes(tiny_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder, _ = tiny_folder("llama")
    first = fingerprint(folder)
    assert fingerprint(folder) == first and (tmp_path / "cache" / "fingerprints.json").is_file()
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = fingerprint(folder)
    assert second != first
    tokenizer = folder / "tokenizer.json"  # the tokenizer decides what the model sees: part of its identity
    tokenizer.write_text(tokenizer.read_text().replace('"use_regex": true', '"use_regex": false', 1))
    third = fingerprint(folder)
    assert third != second
    (folder / "added_tokens.json").write_text('{"<extra>": 384}')  # changes what text becomes too
    fourth = fingerprint(folder)
    assert fourth != third
    (folder / "optimizer.pt").write_bytes(b"a trainer's state")  # beside safetensors: no loader reads it
    (folder / "rng_state.pth").write_bytes(b"more of it")
    assert fingerprint(folder) == fourth


def test_hub_id_resolves_from_the_cache_offline(tiny_folder, tmp_path, monkeypatch):
    """Offline, a Hub id that is in the HF cache still loads (the layout snapshot_download writes)."""
    from huggingface_hub import constants

    folder, _ = tiny_folder("qwen3")
    hub_cache = tmp_path / "hub"
    repo = hub_cache / "models--someone--tiny-qwen3"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    source = resolve("someone/tiny-qwen3")
    assert source.kind == "hub" and source.path == snapshot and source.origin == f"someone/tiny-qwen3@{'a' * 40}"
    assert load_model(source, device="cpu").model.config.model_type == "qwen3"


def test_offline_hub_id_fails_fast_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(SurgeryError, match="not reachable.*not in the Hub cache"):
        resolve("someone/not-downloaded")
    assert time.monotonic() - start < 10  # no retries against an unreachable Hub


def test_missing_tokenizer_is_not_fatal_for_loading(tiny_folder):
    folder, _ = tiny_folder("llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    loaded = load_model(str(folder), device="cpu")
    assert loaded.tokenizer is None and loaded.model.config.num_hidden_layers == 4


def test_dtype_option_is_applied(tiny_folder):
    import torch

    folder, _ = tiny_folder("llama")
    assert load_model(str(folder), dtype="bfloat16", device="cpu").model.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(SurgeryError, match="no CUDA GPU"):
            load_model(str(folder), device="cuda")
