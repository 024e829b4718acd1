"""End to end on the real SmolLM2-135M with small budgets: prune 25% keeping the cornerstones,
heal with QLoRA on C4, export, reload with plain transformers, check the report."""

import json

import pytest
import torch
from click.testing import CliRunner

from surgery.cli import main

pytestmark = pytest.mark.slow


def test_prune_smollm2_quarter_with_cornerstones_and_healing(smollm2_folder, data_dir, tmp_path):
    out = tmp_path / "smollm2-pruned"
    args = ["prune", "smollm2-135m", "--out", str(out), "--remove", "25%", "--keep-cornerstones", "--heal",
            "--samples", "2", "--seq-len", "128", "--analysis", str(tmp_path / "analysis"),
            "--heal-steps", "8", "--heal-seq-len", "128", "--heal-batch-size", "2", "--heal-lr", "5e-4",
            "--eval-tasks", "arc_easy", "--eval-limit", "20", "--eval-ppl", "wikitext2", "--eval-ppl-windows", "4",
            "--no-eval-speed", "--data-dir", str(data_dir), "--device", "cpu"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text())
    plan = report["plan"]
    assert (plan["strategy"], plan["granularity"]) == ("sleb", "block")  # the defaults, as the README's demo runs them
    cornerstones = {c["id"] for c in report["analysis"]["cornerstones"]}
    assert "L0.mlp" in cornerstones  # removing it alone takes the loss past a uniform guess
    assert not cornerstones & set(plan["removed"])
    assert plan["fraction_of_decoder_parameters"] == pytest.approx(0.25, abs=0.02)
    assert report["healing"]["loss_after"] < report["healing"]["loss_before"]
    peak = report["healing"]["training_peak"]  # the 135M model's float32 base alone is 0.5 GiB
    assert peak["kind"] == "process peak RSS" and peak["bytes"] > 2**29
    assert f"training held at most {peak['bytes'] / 2**30:.2f} GiB" in (out / "report.md").read_text()
    assert set(report["evaluations"]) == {"source", "pruned", "healed"}
    ppl = {stage: report["evaluations"][stage]["perplexity"]["wikitext2"]["perplexity"] for stage in report["evaluations"]}
    assert ppl["source"] < ppl["pruned"] and ppl["healed"] < ppl["pruned"]
    generation = {stage: report["evaluations"][stage]["generation"] for stage in ("pruned", "healed")}
    assert report["evaluations"]["source"]["generation"] is None  # the source is the reference
    for measures in generation.values():  # a quarter of the blocks gone: continuations drift from the source's
        assert 0 < measures["token_agreement"] < 1 and measures["kl_mean"] > 0 and measures["prompts"] == 16
        assert measures["agreement_by_position"][0] >= measures["token_agreement"]  # first tokens agree most
    for section in ("## Plan", "## Healing", "## Before and after", "## Plots"):
        assert section in (out / "report.md").read_text()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()  # whole blocks: a standard checkpoint
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 - len(plan["removed"]) // 2
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt.input_ids.shape[1]
    from surgery.export.checkpoint import read_manifest

    assert read_manifest(out)["verified"]["loader"] == "transformers"
