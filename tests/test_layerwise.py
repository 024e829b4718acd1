"""The layer-by-layer analysis (surgery analyze --layerwise): the model is read one decoder block
at a time from its files and every coalition is valued as in memory.

Expectations come from the in-memory value function (ResidualLoss), itself checked against full
forwards with hooks in tests/test_analysis.py. The tolerance, 1e-5 on a mean token loss of about
6, is float32 rounding: the layer-by-layer path sums the log-softmax over vocabulary slices with
a running log-sum-exp where the in-memory one calls cross_entropy on the whole row."""

import json
import os

import pytest
import torch

from surgery.layerwise import LayerwiseModel
from surgery.scoring.layerwise import LayerwiseResidualLoss
from surgery.scoring.residual import ResidualLoss
from surgery.tiny import tiny_model
from tests.cli import one_line, run

TOLERANCE = 1e-5
FAMILIES = {  # the output layer tied (SmolLM2), per-layer masks, a soft-cap, experts, a logit divisor, hybrid attention
    "llama": dict(tie_word_embeddings=True),
    "qwen3_next": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "gemma2": {},
    "qwen2_moe": {},
    "granite": {},
    "gemma4_text": {},  # per-layer head sizes (per_layer_config), experts beside every FFN, a scalar on each block's output
    "cohere2": {},  # parallel blocks (attention and FFN read one norm), a logit scale, sliding layers
    "gpt_neox": {},  # parallel as its config says (use_parallel_residual), an output layer stored as embed_out
    "gpt_neox sequential": dict(use_parallel_residual=False),  # the same family with sequential blocks
    "stablelm parallel": dict(use_parallel_residual=True),  # StableLM 2 12B: a variant of its table entry
    "falcon": {},  # Falcon 7B: one norm for both sublayers, blocks returning a tuple
    "falcon two-norm": dict(new_decoder_architecture=True),  # Falcon 40B and 180B
}
COALITIONS = [frozenset(c) for c in [(), (0,), (1,), (2,), (5,), (7,), (0, 1), (1, 2), (3, 5), (2, 3, 4), (6, 7),
                                     (5, 6, 7), (0, 7), (0, 1, 2, 3, 4, 5, 6, 7)]]


def batches(count=2, rows=2, length=12):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (rows, length), generator=generator) for _ in range(count)]


def saved(family, folder, dtype=torch.float32, **overrides):
    model = tiny_model(family, 4, **overrides).to(dtype).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", sorted(FAMILIES))
@torch.no_grad()
def test_layer_by_layer_values_and_stream_are_the_in_memory_ones(case, tmp_path):
    model = saved(case.split()[0], tmp_path, **FAMILIES[case])
    data = batches()
    expected = ResidualLoss(model, data)
    layerwise = LayerwiseModel(tmp_path)
    layerwise.head_rows = 37  # several vocabulary slices, the last one short
    found = LayerwiseResidualLoss(layerwise, data)
    want, got = expected.values(COALITIONS), found.values(COALITIONS, batch=5)
    assert max(abs(a - b) for a, b in zip(want, got)) < TOLERANCE, (want, got)
    assert len(set(got)) > len(got) // 2  # the coalitions really differ: the check is not of a constant
    for position in range(2 * 4 + 1):
        for a, b in zip(expected.states_at(position), found.states_at(position)):
            assert torch.allclose(a, b, atol=1e-5), position
    assert all(p.is_meta for p in layerwise.model.parameters())  # no block kept its weights


@torch.no_grad()
def test_a_bf16_checkpoint_with_float32_norms_reads_as_from_pretrained_loads_it(tmp_path):
    """Checkpoints keep some tensors in F32 (DeepSeek-V3's router biases, some exporters' norms):
    read block by block they take the model's dtype as from_pretrained gives them, and the streamed
    cut that checks itself with this reader goes through."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from surgery.tiny import tiny_tokenizer

    source = tmp_path / "mixed"
    tiny_model("llama", num_layers=4).to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.float() if "norm" in k else v for k, v in weights.items()}, source / "model.safetensors",
              metadata={"format": "pt"})
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
    assert expected.dtype == torch.bfloat16
    assert torch.equal(LayerwiseModel(source).forward(ids), expected)
    result = run("cut", source, "--remove", "L1", "--out", tmp_path / "cut", "--stream", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_a_stream_too_large_for_memory_spills_to_a_file_bit_for_bit(tmp_path, monkeypatch):
    """bfloat16 states, which numpy cannot hold, come back from the file exactly; the file has no
    name in the folder (it vanishes with the process, however it ends)."""
    import surgery.memory

    model_folder, spill = tmp_path / "model", tmp_path / "analysis"
    spill.mkdir()
    saved("llama", model_folder, torch.bfloat16, tie_word_embeddings=True)
    data = batches(count=3)
    in_memory = LayerwiseResidualLoss(LayerwiseModel(model_folder), data, spill_dir=spill)
    assert in_memory._states.file is None
    monkeypatch.setattr(surgery.memory, "available_memory", lambda device="cpu", alone=False: 1 << 10)  # a machine with 1 KiB free
    spilled = LayerwiseResidualLoss(LayerwiseModel(model_folder), data, spill_dir=spill)
    assert spilled._states.file is not None and spilled.default_batch == 1
    for position in range(9):
        for a, b in zip(in_memory.states_at(position), spilled.states_at(position)):
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    assert spilled.values(COALITIONS) == in_memory.values(COALITIONS)
    assert list(spill.iterdir()) == []
    opened = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if fd.isdigit()
              and os.path.exists(f"/proc/self/fd/{fd}")]
    assert any(link.startswith(str(spill)) for link in opened)  # the file lives on the analysis folder's disk


def test_analyze_layerwise_writes_the_in_memory_analysis(tiny_folder, tmp_path, data_dir):
    folder, _ = tiny_folder("qwen2", num_layers=3)
    common = ["--data-dir", data_dir, "--samples", "3", "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
              "--method", "ablation,shapley,angular,bi", "--max-removed", "2"]
    whole = run("analyze", folder, "--out", tmp_path / "whole", "--no-layerwise", *common)
    parts = run("analyze", folder, "--out", tmp_path / "parts", "--layerwise", *common)
    assert whole.exit_code == 0 and parts.exit_code == 0, parts.output
    a, b = (json.loads((tmp_path / name / "analysis.json").read_text()) for name in ("whole", "parts"))
    assert a["settings"]["layerwise"] is False and b["settings"]["layerwise"] is True
    assert a["key"] == b["key"] and a["coalitions"] == b["coalitions"] and a["complete"] and b["complete"]
    for method in ("ablation", "shapley", "angular", "bi"):
        assert numbers(a["sections"][method]) == pytest.approx(numbers(b["sections"][method]), abs=1e-4), method
    assert [c["id"] for c in a["cornerstones"]] == [c["id"] for c in b["cornerstones"]]


def numbers(value):
    """Every number in a nested section, in order."""
    if isinstance(value, dict):
        return [n for key in sorted(value) for n in numbers(value[key])]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_a_model_that_does_not_fit_is_analyzed_layer_by_layer(tiny_folder, tmp_path, data_dir, monkeypatch):
    import surgery.memory

    folder, _ = tiny_folder("llama", num_layers=2)
    monkeypatch.setattr(surgery.memory, "available_memory", lambda device="cpu", alone=False: 1 << 20)
    result = run("analyze", folder, "--out", tmp_path / "an", "--data-dir", data_dir, "--samples", "2", "--seq-len", "16",
                 "--device", "cpu", "--method", "ablation")
    assert result.exit_code == 0, result.output
    assert "analyzing layer by layer" in result.output and "--no-layerwise" in result.output
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["settings"]["layerwise"] is True


def test_what_the_layer_by_layer_analysis_cannot_do_is_one_line(tiny_folder, tmp_path, data_dir):
    folder, model = tiny_folder("llama", num_layers=2)
    out = tmp_path / "an"
    base = ["analyze", folder, "--out", out, "--data-dir", data_dir, "--layerwise", "--device", "cpu"]
    assert "--metric loss" in one_line(run(*base, "--metric", "acc", "--task", "arc_easy"))
    assert "--no-prefix-cache" in one_line(run(*base, "--no-prefix-cache"))
    assert "stored dtype (float32)" in one_line(run(*base, "--dtype", "bfloat16"))
    assert "--device-map" in one_line(run(*base, "--device-map", "auto"))
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((folder / name).read_bytes())
    assert "safetensors" in one_line(run("analyze", pickled, "--out", out, "--data-dir", data_dir, "--layerwise",
                                         "--allow-pickle", "--device", "cpu"))
    assert not out.exists()


def test_a_budget_smaller_than_a_group_is_spent_not_skipped(tiny_folder, tmp_path, data_dir):
    """Layer by layer, coalitions go in groups of up to 64: --budget 5 still values 5 of them (the
    single ablations first), marks the analysis partial, and a rerun finishes it."""
    folder, _ = tiny_folder("llama", num_layers=3)
    args = ["analyze", folder, "--out", tmp_path / "an", "--layerwise", "--data-dir", data_dir, "--samples", "2",
            "--seq-len", "16", "--device", "cpu", "--method", "ablation"]
    assert run(*args, "--budget", "5").exit_code == 0
    partial = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert not partial["complete"] and partial["coalitions"]["evaluated"] == 5 < partial["coalitions"]["wanted"]
    assert run(*args).exit_code == 0
    finished = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert finished["complete"] and finished["coalitions"]["evaluated"] == finished["coalitions"]["wanted"]
