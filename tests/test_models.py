"""The model resolver: aliases, GGUF files, folders, Hub ids (offline), fingerprints."""

import os
import shutil
import time

import pytest

from surgery.errors import SurgeryError
from surgery.models import builtin_gguf_path, cache_dir, fingerprint, load_model, resolve


def test_gguf_file_and_alias_share_one_cached_conversion(smollm2_folder):
    gguf = builtin_gguf_path("smollm2-135m")
    source = resolve(str(gguf))
    assert source.kind == "gguf" and source.path == smollm2_folder
    assert resolve("smollm2-135m").kind == "alias"
    assert smollm2_folder.parent == cache_dir() / "models"
    assert (smollm2_folder / "model.safetensors").is_file() and (smollm2_folder / "tokenizer.json").is_file()


def test_fingerprint_is_cached_and_notices_changes(tiny_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    folder, _ = tiny_folder("llama")
    first = fingerprint(folder)
    assert fingerprint(folder) == first and (tmp_path / "cache" / "fingerprints.json").is_file()
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fingerprint(folder) != first


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
