"""The out-of-core cut (surgery cut --stream) and the block-by-block executor it checks with.

Expectations come from elsewhere: transformers' own forward (with surgery's cuts replayed by hooks,
tests/hooks.py), today's in-memory cut and export (save_pretrained's shards and index), and
safetensors' own writer."""

import json

import pytest
import torch
from safetensors import safe_open

from surgery.arch import ARCHITECTURES
from surgery.export.checkpoint import load_exported, read_manifest
from surgery.sublayers import parse_sublayers
from surgery.tiny import tiny_model
from tests.cli import one_line, run
from tests.faults import flipping_last_byte
from tests.hooks import skipped

DENSE = ["llama", "qwen2", "gemma2"]
MOE = ["qwen2_moe", "mixtral"]
SLIDING = {"qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)}  # layer_types that differ
OVERRIDES = {**SLIDING, "llama": dict(tie_word_embeddings=True)}  # the output layer is the embedding, as in SmolLM2


def tensors(folder):
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 (no __iter__)
    return found


def tokens(batch=2, length=12, seed=0):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the block-by-block executor


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
@torch.no_grad()
def test_block_by_block_logits_are_the_models(family, tmp_path):
    """From the files, one block at a time, equal to transformers' forward of the whole model,
    and with sublayers skipped equal to the model with them skipped by hooks."""
    from surgery.layerwise import LayerwiseModel

    model = tiny_model(family, num_layers=4)
    model.save_pretrained(tmp_path)
    # (Nemotron-H's blocks hold one mixer each, Mamba-2, MLP, attention, MoE: L0's and L3's are skipped alone)
    units = parse_sublayers("L0.attn,L1,L3.mlp" if ARCHITECTURES[family].single_mixer else "L0.mlp,L1,L2.attn")
    ids = tokens()
    expected = model(ids, use_cache=False).logits
    with skipped(model, units):
        expected_skipped = model(ids, use_cache=False).logits
    layerwise = LayerwiseModel(tmp_path)
    assert torch.allclose(layerwise.forward(ids), expected, atol=1e-5)
    assert torch.allclose(layerwise.forward(ids, skip=units), expected_skipped, atol=1e-5)


@torch.no_grad()
def test_layer_major_batches_with_padding_and_weights_released(tmp_path):
    """The loop the analysis uses: several batches (one left-padded) through each block before the
    next loads; no block keeps its weights after its turn."""
    from surgery.layerwise import LayerwiseModel

    model = tiny_model("qwen2", num_layers=3, **SLIDING["qwen2"])
    model.save_pretrained(tmp_path)
    batches = [(tokens(2, 9, seed=1), torch.ones(2, 9, dtype=torch.long)),
               (tokens(2, 9, seed=2), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]))]
    layerwise = LayerwiseModel(tmp_path)
    streams = [layerwise.embed(ids, mask) for ids, mask in batches]
    for index, block in layerwise.blocks():
        for stream in streams:
            stream.hidden = layerwise.run(block, index, stream)
    assert all(p.is_meta for p in layerwise.model.parameters())
    for (ids, mask), stream in zip(batches, streams):
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        got = layerwise.logits(layerwise.final_norm(stream.hidden))
        assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_shards_are_written_as_safetensors_writes_them(tmp_path):
    from safetensors.torch import save_file

    from surgery.shards import TensorInfo, check_shard, write_shard

    data = {"b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.weight": torch.randn(7), "c": torch.arange(3),
            "z.bias": torch.ones(2, 2, dtype=torch.float16), "é": torch.ones(1)}
    save_file(data, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}
    infos = {k: TensorInfo(k, codes[v.dtype], tuple(v.shape), v.numel() * v.element_size()) for k, v in data.items()}
    written = write_shard(tmp_path / "ours.safetensors", list(infos.values()),
                          lambda info: [data[info.name].view(torch.uint8).numpy().tobytes()])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    check_shard(tmp_path / "theirs.safetensors", infos, written.checksums)  # the checksums are of the bytes given


# ------------------------------------------------------------------ the streamed cut against today's cut


def cut_both_ways(tiny_folder, tmp_path, family, remove, num_layers=5):
    source, model = tiny_folder(family, num_layers=num_layers, **OVERRIDES.get(family, {}))
    for mode in ("no-stream", "stream"):
        result = run("cut", source, "--remove", remove, "--out", tmp_path / mode, f"--{mode}", "--max-shard-size", "20KB",
                     "--device", "cpu")
        assert result.exit_code == 0, result.output
    return model, tmp_path / "no-stream", tmp_path / "stream"


@pytest.mark.parametrize("family", DENSE + MOE)
@pytest.mark.parametrize("remove", ["L1,L3", "L0.attn,L2.mlp,L3"])
@torch.no_grad()
def test_a_streamed_cut_writes_what_the_in_memory_cut_writes(family, remove, tiny_folder, tmp_path):
    model, in_memory, streamed = cut_both_ways(tiny_folder, tmp_path, family, remove)
    assert read_manifest(streamed)["verified"]["method"] == "streamed"
    assert read_manifest(in_memory)["verified"]["method"] == "reload"
    shards = sorted(p.name for p in streamed.glob("model-*.safetensors"))
    assert len(shards) > 2 and (streamed / "model.safetensors.index.json").is_file()
    assert {p.name for p in streamed.iterdir() if p.name not in shards} == {p.name for p in in_memory.iterdir()
                                                                              if not p.name.startswith("model-")}
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((in_memory / name).read_text()), name
    ours, theirs = tensors(streamed), tensors(in_memory)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    index, saved = (json.loads((folder / "model.safetensors.index.json").read_text()) for folder in (streamed, in_memory))
    assert index["metadata"] == saved["metadata"] and index["weight_map"].keys() == saved["weight_map"].keys()
    if family in DENSE:  # save_pretrained's split and safetensors' layout, byte for byte (MoE: see docs/scale.md)
        assert all((streamed / s).read_bytes() == (in_memory / s).read_bytes() for s in [*shards, "model.safetensors.index.json"])

    ids = tokens()
    with skipped(model, parse_sublayers(remove)):
        expected = model(ids, use_cache=False).logits
    reloaded = load_exported(streamed, via="remote-code")  # as users load it: from_pretrained, with its code if it ships one
    assert torch.allclose(reloaded(ids, use_cache=False).logits, expected, atol=1e-5)


@torch.no_grad()
def test_cutting_a_cut_checkpoint_streamed_and_in_memory(tiny_folder, tmp_path):
    """A sublayer-pruned source: its stand-ins are renumbered; once a cut takes the last of them
    with their blocks, the checkpoint is the family's own again (both ways)."""
    source, model = tiny_folder("llama", num_layers=4)
    assert run("cut", source, "--remove", "L1.attn,L2.mlp", "--out", tmp_path / "first").exit_code == 0
    for remove, model_type, gone in (("L1.mlp", "surgery_llama", "L1,L2.mlp"), ("L1.mlp,L2.attn", "llama", "L1-L2")):
        for mode in ("no-stream", "stream"):
            out = tmp_path / f"{remove}-{mode}"
            result = run("cut", tmp_path / "first", "--remove", remove, "--out", out, f"--{mode}", "--device", "cpu")
            assert result.exit_code == 0, result.output
        configs = [json.loads((tmp_path / f"{remove}-{mode}" / "config.json").read_text()) for mode in ("no-stream", "stream")]
        assert configs[0] == configs[1] and configs[0]["model_type"] == model_type
        ids = tokens()
        with skipped(model, parse_sublayers(gone)):  # the first cut deleted no block: its numbering is the source's
            expected = model(ids, use_cache=False).logits
        reloaded = load_exported(tmp_path / f"{remove}-stream")
        assert torch.allclose(reloaded(ids, use_cache=False).logits, expected, atol=1e-5)


def test_streaming_is_chosen_when_the_model_does_not_fit(tiny_folder, tmp_path):
    from surgery.memory import fits_in_memory

    gib = 1 << 30
    assert fits_in_memory(4 * gib, 16 * gib, copies=2) and not fits_in_memory(8 * gib, 16 * gib, copies=2)
    source, _ = tiny_folder("llama", num_layers=3)
    assert run("cut", source, "--remove", "L1", "--out", tmp_path / "out").exit_code == 0  # a tiny model fits
    assert read_manifest(tmp_path / "out")["verified"]["method"] == "reload"


# ------------------------------------------------------------------ bad input and failed checks


def test_bad_input_for_the_streamed_cut_is_one_line(tiny_folder, tmp_path):
    source, model = tiny_folder("llama", num_layers=3)
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    out = tmp_path / "out"
    cases = [((pickled, "--stream", "--allow-pickle"), "reads safetensors weights only"),
             ((pickled, "--stream"), "holds only pickle weights"),
             ((source, "--stream", "--dtype", "bfloat16"), "copies the weights as stored (float32)"),
             ((source, "--stream", "--device-map", "auto"), "drop --device-map"),
             ((source, "--max-shard-size", "10XB"), "--max-shard-size '10XB' is not a size")]
    for (folder, *args), message in cases:
        line = one_line(run("cut", folder, "--remove", "L1", "--out", out, *args))
        assert message in line, line
        assert not out.exists()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    (source / "model.safetensors").rename(source / "model-00001-of-00002.safetensors")
    for args in (("cut", source, "--remove", "L1", "--out", out, "--stream"), ("cut", source, "--remove", "L1", "--out", out,
                 "--no-stream"), ("info", source)):  # in memory too: a traceback from transformers used to end it
        assert "model-00002-of-00002.safetensors, which is missing" in one_line(run(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-src", "pickled"]  # no staging folder, no lock


@pytest.mark.parametrize("fault, message", [("bytes", "differs from its source tensor"),
                                            ("layer_types", "run block by block, differ from the source's")])
def test_a_streamed_cut_that_fails_its_checks_leaves_nothing(fault, message, tiny_folder, tmp_path, monkeypatch):
    """A flipped byte in a shard (check a) and a config that swaps two blocks' attention patterns
    (check c: gemma2's sliding and global layers mask differently) are caught before --out exists."""
    import surgery.export.streamed as streamed
    import surgery.shards as shards

    source, _ = tiny_folder("gemma2", num_layers=4)
    real_write = streamed.write_copied_folder

    def swap_layer_types(folder, *args, **kwargs):
        digests = real_write(folder, *args, **kwargs)
        config = json.loads((folder / "config.json").read_text())
        config["layer_types"] = config["layer_types"][::-1]
        (folder / "config.json").write_text(json.dumps(config))
        return digests

    if fault == "bytes":
        monkeypatch.setattr(shards, "write_shard", flipping_last_byte(shards.write_shard))
    else:
        monkeypatch.setattr(streamed, "write_copied_folder", swap_layer_types)
    # (two blocks, a period of gemma2's pattern in llama.cpp: the cut itself has nothing to say)
    line = one_line(run("cut", source, "--remove", "L1-L2", "--out", tmp_path / "out", "--stream", "--device", "cpu"))
    assert "export check failed" in line and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma2-src"]


def test_a_full_disk_during_the_streamed_copy_is_one_line_and_leaves_nothing(tiny_folder, tmp_path, monkeypatch):
    import errno
    import os

    import surgery.shards as shards

    source, _ = tiny_folder("llama", num_layers=3)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.os, "copy_file_range", full)  # the kernel copy of the tensors' bytes
    line = one_line(run("cut", source, "--remove", "L1", "--out", tmp_path / "out", "--stream", "--device", "cpu"))
    assert "no space left on the device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-src"]


def test_the_memory_plan_sizes_the_copies_in_the_dtype_asked_for(tiny_folder, monkeypatch):
    """--dtype bfloat16 halves a float32 checkpoint in memory and float32 doubles a bf16 one: the
    choice between the in-memory and the streamed path counts the copies as they will be."""
    from functools import partial

    import surgery.memory as memory

    source, _ = tiny_folder("llama")  # float32
    size = memory.safetensors_bytes(source)
    monkeypatch.setattr(memory, "LIBRARY_BYTES", 0)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu", alone=False: int(1.5 * size))
    streams = partial(memory.out_of_core, source, None, device="cpu", device_map=None, copies=2, doing="cutting", instead="-")
    assert streams() and streams(dtype="float32")  # two float32 copies do not fit
    assert not streams(dtype="bfloat16")  # two bf16 copies do
    assert memory.loaded_bytes(source, "bfloat16") == size // 2


def test_a_tied_config_over_a_different_stored_head_is_refused_in_one_line(tiny_folder, tmp_path):
    """transformers unties an output layer the files store apart from the embeddings; a streamed copy
    that follows config.json would drop it, so it is refused before anything is written."""
    from safetensors.torch import load_file, save_file

    source, _ = tiny_folder("llama", tie_word_embeddings=True)
    weights = load_file(source / "model.safetensors")
    same = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}  # some exporters store both
    save_file(same, source / "model.safetensors", metadata={"format": "pt"})
    assert run("cut", source, "--remove", "L1", "--out", tmp_path / "same", "--stream").exit_code == 0
    other = {**weights, "lm_head.weight": torch.randn_like(weights["model.embed_tokens.weight"])}
    save_file(other, source / "model.safetensors", metadata={"format": "pt"})
    line = one_line(run("cut", source, "--remove", "L1", "--out", tmp_path / "other", "--stream"))
    assert "ties the output layer to the embeddings, but the files store a different lm_head.weight" in line
    assert not (tmp_path / "other").exists()

