"""Pre-quantised checkpoints as sources (bitsandbytes 4- and 8-bit uploads, FP8 weights): they are
turned back into full precision when they load, and what is exported is a full-precision
checkpoint; the block-by-block paths, which read full-precision tensors, refuse them in one line."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.cli import one_line, run

FP8_BLOCK = 32


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory):
    from surgery.tiny import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("quantized") / "fp"
    tiny_model("llama", 4, hidden_size=128, intermediate_size=256).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def bitsandbytes_checkpoint(source, folder, bits):
    """What a '-bnb-4bit' upload is: the model loaded through bitsandbytes and saved so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu").save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def fp8_blocks(weight):
    """A weight in float8 and its grid of FP8_BLOCK x FP8_BLOCK scales, the last blocks overhanging a
    weight they do not divide (DeepSeek-V3's 576-row kv_a_proj_with_mqa under 128 x 128 blocks)."""
    rows, columns = weight.shape
    grid = (-(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK))
    padded = torch.zeros(grid[0] * FP8_BLOCK, grid[1] * FP8_BLOCK)
    padded[:rows, :columns] = weight
    blocks = padded.reshape(grid[0], FP8_BLOCK, grid[1], FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    quantized = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :columns].to(torch.float8_e4m3fn)
    return quantized, scale.float()


def padded_back(quantized, scale):
    """fp8_blocks undone by padding the weight out to whole blocks (not as surgery.fp8 does it)."""
    rows, columns = quantized.shape
    padded = torch.zeros(scale.shape[0] * FP8_BLOCK, scale.shape[1] * FP8_BLOCK)
    padded[:rows, :columns] = quantized.float()
    blocks = padded.reshape(scale.shape[0], FP8_BLOCK, scale.shape[1], FP8_BLOCK) * scale[:, None, :, None]
    return blocks.reshape(padded.shape)[:rows, :columns]


def fp8_checkpoint(source, folder, excluded=()):
    """DeepSeek-V3's layout, written by hand (transformers quantises to FP8 on a GPU only): each
    decoder projection in float8_e4m3fn with a float32 `weight_scale_inv` per 32x32 block, but for
    the modules `excluded` names (Qwen3's FP8 releases list theirs in modules_to_not_convert)."""
    from transformers import AutoTokenizer

    folder.mkdir()
    tensors = {}
    for name, weight in load_file(source / "model.safetensors").items():
        if "layers" in name and name.endswith("proj.weight") and name.removesuffix(".weight") not in excluded:
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(weight)
        else:
            tensors[name] = weight
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    if excluded:
        config["quantization_config"]["modules_to_not_convert"] = list(excluded)
    (folder / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_checkpoint(source, folder):
    """gpt-oss's layout, written by hand: each expert tensor ([experts, in, out]) as FP4 (E2M1)
    values two to a byte (`_blocks`, groups of 32 along `in`) and one power-of-two scale per group
    (`_scales`, biased by 127); the rest as it was."""
    from transformers import AutoTokenizer

    values = torch.tensor(FP4_VALUES)
    folder.mkdir()
    tensors = {}
    for name, weight in load_file(source / "model.safetensors").items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = weight
            continue
        groups = weight.transpose(1, 2).reshape(weight.shape[0], weight.shape[2], weight.shape[1] // 32, 32)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-12) / 6.0))
        index = ((groups / torch.exp2(exponent)[..., None])[..., None] - values).abs().argmin(-1).to(torch.uint8)
        tensors[name + "_blocks"] = index[..., 0::2] | (index[..., 1::2] << 4)
        tensors[name + "_scales"] = (exponent + 127).to(torch.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def quantized_folder(full_precision, kind):
    folder = full_precision.parent / kind
    if not folder.exists():
        if kind == "fp8":
            fp8_checkpoint(full_precision, folder)
        else:
            bitsandbytes_checkpoint(full_precision, folder, 4 if kind == "bnb-4bit" else 8)
    return folder


@pytest.fixture(scope="module", params=["bnb-4bit", "bnb-8bit", "fp8"])
def quantized(request, full_precision):
    return quantized_folder(full_precision, request.param)


@pytest.fixture(scope="module", params=["bnb-4bit", "bnb-8bit"])
def packed(request, full_precision):
    """The quantisations whose weights the block-by-block paths cannot read (FP8 they read turned back)."""
    return quantized_folder(full_precision, request.param)


def full_precision_weights(folder):
    """The weights transformers gives for a quantised folder, turned back into full precision."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_a_quantised_source_is_cut_into_a_full_precision_checkpoint(quantized, tmp_path):
    out = tmp_path / "cut"
    result = run("cut", quantized, "--remove", "L1", "--out", out)
    assert result.exit_code == 0, result.output
    assert "quantised weights were turned back into" in " ".join(result.output.split())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as written:
        names = set(written.keys())
        assert all(written.get_slice(name).get_dtype() in ("F32", "BF16", "F16") for name in names)
        stored = {name: written.get_tensor(name) for name in names}
    source = full_precision_weights(quantized)
    original = load_file(quantized.parent / "fp" / "model.safetensors")
    for name, tensor in source.items():  # what was quantised, back near the original weights
        assert (tensor - original[name]).abs().max() <= 0.2 * original[name].abs().max(), name
    renumbered = {name.replace("model.layers.2.", "model.layers.1.").replace("model.layers.3.", "model.layers.2."): tensor
                  for name, tensor in source.items() if not name.startswith("model.layers.1.")}
    assert set(renumbered) == names
    for name, tensor in renumbered.items():
        assert torch.equal(stored[name], tensor), name


@pytest.mark.parametrize("command, flag", [("cut", "--stream"), ("eval", "--layerwise"), ("analyze", "--layerwise")])
def test_the_block_by_block_paths_refuse_a_quantised_source_in_one_line(packed, tmp_path, command, flag):
    out = tmp_path / "out"
    extra = ["--remove", "L1"] if command == "cut" else ["--tasks", "none", "--ppl", "wikitext2", "--ppl-windows", "1", "--no-speed"] if command == "eval" else []
    result = run(command, packed, *extra, "--out", out, flag)
    assert result.exit_code == 2
    assert f"{flag} reads full-precision weights a block at a time" in one_line(result)
    assert not out.exists()


def test_the_memory_plan_weighs_a_quantised_source_in_full_precision(tmp_path, full_precision):
    from surgery.memory import footprint, in_memory_bytes, loaded_bytes, plan, safetensors_bytes

    folder = tmp_path / "bnb-4bit"
    bitsandbytes_checkpoint(full_precision, folder, 4)
    expected = sum(t.numel() * t.element_size() for t in full_precision_weights(folder).values())
    assert loaded_bytes(folder) == footprint(folder).weights == expected > safetensors_bytes(folder)
    assert loaded_bytes(folder, keep_quantized=True) == safetensors_bytes(folder)
    steps = {step.command: step.holds for step in plan(folder, device="cpu")[2]}
    assert steps["analyze, eval"] == in_memory_bytes(safetensors_bytes(folder))  # run as stored
    assert steps["cut"] == steps["prune"] == in_memory_bytes(expected, copies=2)
    assert [step.how for step in plan(folder, device="cpu")[2] if step.command == "heal"] == ["refused"]
    result = run("info", folder)
    assert result.exit_code == 0 and "bitsandbytes-quantised" in result.output


def test_evaluation_runs_a_quantised_model_as_stored(tmp_path, full_precision):
    from surgery.loading import load_model

    folder = tmp_path / "bnb-4bit"
    bitsandbytes_checkpoint(full_precision, folder, 4)
    assert type(load_model(str(folder), keep_quantized=True).model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    result = run("eval", folder, "--tasks", "none", "--ppl", "wikitext2", "--ppl-windows", "1", "--no-speed", "--out",
                 tmp_path / "results.json")
    assert result.exit_code == 0, result.output
    assert "turned back" not in result.output and (tmp_path / "results.json").is_file()


def test_a_quantisation_transformers_cannot_load_here_is_one_line(tmp_path, full_precision):
    import shutil

    folder = tmp_path / "gptq"
    shutil.copytree(full_precision, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    result = run("cut", folder, "--remove", "L1", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "holds gptq-quantised weights, which transformers cannot load here" in one_line(result)
    assert not (tmp_path / "out").exists()


def test_a_quantised_source_too_large_once_turned_back_is_refused_before_it_loads(packed, tmp_path, monkeypatch):
    import surgery.memory

    monkeypatch.setattr(surgery.memory, "available_memory", lambda device="cpu", alone=False: 1 << 20)
    result = run("cut", packed, "--remove", "L1", "--out", tmp_path / "out")
    assert "once turned back into full precision, more than 0.0 GiB available" in one_line(result)
    assert "turned back into float" not in result.output and not (tmp_path / "out").exists()


def test_evaluating_a_quantised_source_too_large_as_stored_is_refused(packed, tmp_path, monkeypatch):
    import surgery.memory

    monkeypatch.setattr(surgery.memory, "available_memory", lambda device="cpu", alone=False: 1 << 20)
    result = run("eval", packed, "--tasks", "none", "--ppl", "wikitext2", "--ppl-windows", "1", "--no-speed")
    assert "quantised weights" in one_line(result) and "give the full-precision checkpoint" in one_line(result)


def test_healing_a_quantised_source_is_refused_before_it_loads(quantized, tmp_path):
    result = run("heal", quantized, "--out", tmp_path / "healed", "--heal-steps", "1")
    assert "heal trains a 4-bit copy it makes of full-precision ones: cut it in memory (--no-stream) or prune it first" in one_line(result)
    assert not (tmp_path / "healed").exists()


def test_an_fp8_moe_source_is_written_with_its_experts_under_their_stored_names(tmp_path):
    """transformers dequantises FP8 inside the experts' merge; the export splits them back."""
    from surgery.layerwise import LayerwiseModel
    from surgery.tiny import tiny_model, tiny_tokenizer

    source = tmp_path / "fp"
    tiny_model("qwen3_moe", 3, hidden_size=128, intermediate_size=256, moe_intermediate_size=64).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    fp8_checkpoint(source, tmp_path / "fp8")
    for name in ("fp", "fp8"):
        assert run("cut", tmp_path / name, "--remove", "L0", "--out", tmp_path / f"cut-{name}").exit_code == 0
    with safe_open(tmp_path / "cut-fp" / "model.safetensors", "pt") as want, \
            safe_open(tmp_path / "cut-fp8" / "model.safetensors", "pt") as got:
        assert set(got.keys()) == set(want.keys())
    written = LayerwiseModel(tmp_path / "cut-fp8")  # reads the stored names: it failed on the fused ones
    try:
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            from transformers import AutoModelForCausalLM

            in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "cut-fp8")(ids).logits
            assert torch.allclose(written.forward(ids), in_memory, atol=1e-4)
    finally:
        written.close()
    # streamed, the experts stay FP8 one by one beside their scale grids, and load as the in-memory cut
    assert run("cut", tmp_path / "fp8", "--remove", "L0", "--stream", "--out", tmp_path / "streamed").exit_code == 0
    original, streamed = stored_tensors(tmp_path / "fp8"), stored_tensors(tmp_path / "streamed")
    assert set(streamed) == {renumbered(name, 0) for name in original if renumbered(name, 0)}
    assert streamed["model.layers.0.mlp.experts.0.down_proj.weight"].dtype == torch.float8_e4m3fn
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")(ids).logits, in_memory, atol=1e-5)


def stored_tensors(folder):
    """Every tensor of a one-file checkpoint, as stored (float8 included)."""
    with safe_open(folder / "model.safetensors", "pt") as files:
        names = files.keys()  # (a safetensors handle is not iterable)
        return {name: files.get_tensor(name) for name in names}


def renumbered(name, removed_block):
    """A source tensor's name in a cut that removed block `removed_block` (None: gone with it)."""
    if not name.startswith("model.layers."):
        return name
    index, _, rest = name.removeprefix("model.layers.").partition(".")
    if int(index) == removed_block:
        return None
    return f"model.layers.{int(index) - (int(index) > removed_block)}.{rest}"


@pytest.mark.parametrize("remove", ["L1", "L1.attn"])
def test_an_fp8_source_is_cut_file_to_file_as_stored(full_precision, tmp_path, remove):
    """A streamed cut copies an FP8 release's weights and scale grids byte for byte and keeps its
    quantisation config, block exclusions renumbered: a checkpoint its engines serve as they serve the
    release, which transformers loads into the model the in-memory (full-precision) cut writes."""
    from transformers import AutoModelForCausalLM

    excluded = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")
    source = tmp_path / "fp8"
    fp8_checkpoint(full_precision, source, excluded=(*excluded, "lm_head"))
    streamed = run("cut", source, "--remove", remove, "--stream", "--out", tmp_path / "streamed")
    assert streamed.exit_code == 0, streamed.output
    assert "turned back" not in streamed.output
    in_memory = run("cut", source, "--remove", remove, "--no-stream", "--out", tmp_path / "in-memory")
    assert in_memory.exit_code == 0, in_memory.output

    quantization = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    block = remove == "L1"
    assert quantization["modules_to_not_convert"] == (["model.layers.1.mlp.down_proj", "lm_head"] if block else
                                                      [*excluded, "lm_head"])
    assert {k: v for k, v in quantization.items() if k != "modules_to_not_convert"} == \
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    original, written = stored_tensors(source), stored_tensors(tmp_path / "streamed")
    if block:
        expected = {renumbered(name, 1): name for name in original if renumbered(name, 1)}
    else:  # (the attention's projections, their scale grids and its norm go)
        expected = {name: name for name in original if not name.startswith(("model.layers.1.self_attn.",
                                                                           "model.layers.1.input_layernorm."))}
    assert set(written) == set(expected)
    assert any(name.endswith("weight_scale_inv") for name in written)
    for name, tensor in written.items():
        assert tensor.dtype == original[expected[name]].dtype
        assert torch.equal(tensor.view(torch.uint8), original[expected[name]].view(torch.uint8)), name

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=not block)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory", trust_remote_code=not block)(ids).logits
    assert torch.allclose(got.float(), want.float(), atol=1e-5)

    # for llama.cpp, the FP8 weights are written turned back: the file the full-precision cut gives
    import gguf

    for name in ("streamed", "in-memory"):
        written = run("gguf", tmp_path / name, "--type", "f32", "--out", tmp_path / f"{name}.gguf")
        assert written.exit_code == 0, written.output
    files = [{t.name: t.data for t in gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors} for name in ("streamed", "in-memory")]
    assert files[0].keys() == files[1].keys()
    assert all((files[0][name] == files[1][name]).all() for name in files[0])


@pytest.mark.parametrize("remove", ["L1", "L2.mlp"])
def test_an_fp8_source_is_cut_file_to_file_turned_back_with_dtype(full_precision, tmp_path, remove):
    """`--stream --dtype` (the dtype of the release's other tensors) turns each FP8 weight back as it is
    copied, one at a time: the checkpoint the in-memory cut writes, tensor for tensor, for healing."""
    source = quantized_folder(full_precision, "fp8")
    streamed = run("cut", source, "--remove", remove, "--stream", "--dtype", "float32", "--out", tmp_path / "streamed")
    assert streamed.exit_code == 0, streamed.output
    in_memory = run("cut", source, "--remove", remove, "--no-stream", "--out", tmp_path / "in-memory")
    assert in_memory.exit_code == 0, in_memory.output
    assert "quantization_config" not in json.loads((tmp_path / "streamed" / "config.json").read_text())
    got, want = stored_tensors(tmp_path / "streamed"), stored_tensors(tmp_path / "in-memory")
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in got)
    other = run("cut", source, "--remove", remove, "--stream", "--dtype", "bfloat16", "--out", tmp_path / "other")
    assert "(FP8 turned back into float32 with --dtype float32): drop --dtype bfloat16" in one_line(other)
    assert not (tmp_path / "other").exists()


def test_the_block_by_block_paths_read_an_fp8_source_turned_back(tmp_path, full_precision):
    """eval --layerwise and analyze --layerwise read each block's FP8 weights turned back: the perplexity
    and the ablation losses of the model transformers loads whole."""
    source = quantized_folder(full_precision, "fp8")
    scores = {}
    for flag in ("--layerwise", "--no-layerwise"):
        out = tmp_path / f"eval{flag}.json"
        result = run("eval", source, "--tasks", "none", "--ppl", "wikitext2", "--ppl-windows", "2", "--no-speed",
                     "--no-generation", "--out", out, flag)
        assert result.exit_code == 0, result.output
        scores[flag] = json.loads(out.read_text())["perplexity"]["wikitext2"]["perplexity"]
    assert scores["--layerwise"] == pytest.approx(scores["--no-layerwise"], rel=1e-4)
    analyses = {}
    for flag in ("--layerwise", "--no-layerwise"):  # (analyze's block-by-block scorers read it the same way)
        result = run("analyze", source, "--method", "ablation", "--samples", "2", "--seq-len", "32",
                     "--out", tmp_path / f"analysis{flag}", flag)
        assert result.exit_code == 0, result.output
        analyses[flag] = json.loads((tmp_path / f"analysis{flag}" / "analysis.json").read_text())
    layerwise, whole = (analyses[flag]["sections"]["ablation"]["sublayers"] for flag in ("--layerwise", "--no-layerwise"))
    assert layerwise.keys() == whole.keys() and len(layerwise) == 8
    assert all(layerwise[unit]["loss"] == pytest.approx(whole[unit]["loss"], rel=1e-5) for unit in layerwise)


def test_an_fp8_release_whose_blocks_overhang_its_weights_is_read_and_cut_block_by_block(tmp_path):
    """transformers 5.25 turns a weight back only where the scale grid divides it, so on a CPU it cannot
    load such a release (DeepSeek-V3's); the block-by-block paths and the streamed cut read it with the
    config's block size."""
    from transformers import AutoModelForCausalLM

    from surgery.layerwise import LayerwiseModel
    from surgery.tiny import tiny_model, tiny_tokenizer

    source = tmp_path / "fp"
    tiny_model("llama", 3, hidden_size=128, intermediate_size=200).save_pretrained(source)  # (200 = 6 blocks of 32 + 8)
    tiny_tokenizer().save_pretrained(source)
    fp8_checkpoint(source, tmp_path / "fp8")
    stored = stored_tensors(tmp_path / "fp8")
    assert stored["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (7, 4)
    in_memory = run("cut", tmp_path / "fp8", "--remove", "L1", "--no-stream", "--out", tmp_path / "in-memory")
    assert "read it a block at a time instead: --stream" in one_line(in_memory)

    back = {name: padded_back(tensor, stored[name + "_scale_inv"]) if name + "_scale_inv" in stored else tensor
            for name, tensor in stored.items() if not name.endswith("_scale_inv")}
    model = AutoModelForCausalLM.from_pretrained(source)
    model.load_state_dict(back)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    read = LayerwiseModel(tmp_path / "fp8")
    try:
        with torch.no_grad():
            assert torch.allclose(read.forward(ids), model(ids).logits, atol=1e-5)
    finally:
        read.close()

    assert run("cut", tmp_path / "fp8", "--remove", "L1", "--stream", "--dtype", "float32", "--out", tmp_path / "back").exit_code == 0
    written = stored_tensors(tmp_path / "back")
    assert written.keys() == {renumbered(name, 1) for name in back if renumbered(name, 1)}
    assert all(torch.equal(written[renumbered(name, 1)], tensor) for name, tensor in back.items() if renumbered(name, 1))


def test_info_says_how_an_fp8_release_is_cut(full_precision):
    from surgery.memory import plan

    source = quantized_folder(full_precision, "fp8")
    result = run("info", source, "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "cut --stream copies it as stored" in text
    steps = {step.command: step for step in plan(source, device="cpu")[2]}
    assert "streamed (--stream) it stays FP8 as stored" in steps["cut"].note and steps["heal"].how == "refused"
    assert steps["analyze, eval"].how == "in memory" and "--layerwise reads one block at a time" in steps["analyze, eval"].note


def test_an_fp8_source_too_large_for_memory_is_cut_as_stored(tmp_path, full_precision, monkeypatch):
    import surgery.memory

    source = quantized_folder(full_precision, "fp8")
    monkeypatch.setattr(surgery.memory, "available_memory", lambda device="cpu", alone=False: 1 << 20)
    result = run("cut", source, "--remove", "L2", "--out", tmp_path / "cut")
    assert result.exit_code == 0, result.output
    assert "streaming the cut file to file" in " ".join(result.output.split())
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_fp8_is_turned_back_where_its_kernels_would_keep_it_packed(full_precision, tmp_path, monkeypatch):
    """On a GPU of compute capability 8.9 or more transformers keeps FP8 layers, which have no
    dequantisation: the load asks for full precision instead. The GPU is simulated here."""
    from surgery.loading import load_model

    fp8_checkpoint(full_precision, tmp_path / "fp8")
    quantized = tmp_path / "fp8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (9, 0))
    model = load_model(str(quantized), device="cpu", with_tokenizer=False).model
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_an_mxfp4_gpt_oss_source_is_cut_into_full_precision_under_its_stored_names(tmp_path):
    """gpt-oss ships MXFP4 experts; transformers turns them back without its kernels (here) and, with
    surgery asking for it, where its kernels would keep them packed."""
    from surgery.tiny import tiny_model, tiny_tokenizer

    source = tmp_path / "fp"
    tiny_model("gpt_oss", 3).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    mxfp4_checkpoint(source, tmp_path / "mxfp4")
    for name in ("fp", "mxfp4"):
        result = run("cut", tmp_path / name, "--remove", "L1", "--out", tmp_path / f"cut-{name}")
        assert result.exit_code == 0, result.output
    original = load_file(source / "model.safetensors")
    with safe_open(tmp_path / "cut-fp" / "model.safetensors", "pt") as want, \
            safe_open(tmp_path / "cut-mxfp4" / "model.safetensors", "pt") as got:
        names = got.keys()
        assert set(names) == set(want.keys())
        assert {got.get_slice(name).get_dtype() for name in names} == {"F32"}
        experts = got.get_tensor("model.layers.1.mlp.experts.down_proj")  # was L2
        reference = original["model.layers.2.mlp.experts.down_proj"]
        assert not torch.equal(experts, reference)  # FP4, not the original
        assert (experts - reference).abs().max() <= 0.25 * reference.abs().max()
