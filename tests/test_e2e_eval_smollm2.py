"""End to end on the real SmolLM2-135M against the shared data (CPU, small limits).

Expected ranges, and why: SmolLM2-135M-Instruct scores about 0.49 on ARC-Easy (chance 0.25) and
0.65 on PIQA (chance 0.50) zero-shot on the first 100 items; with 100 items the standard error is
about 0.05, so "well above chance" is asserted as more than two standard errors above it. Its
WikiText-2 perplexity under our protocol is about 30; a broken model (random weights, wrong
tokenizer, off-by-one labels) lands in the thousands, so 15-60 separates working from broken.
"""

import pytest

from surgery.evaluate import evaluate_model
from surgery.loading import load_model
from surgery.settings import EvalSettings, PerplexityProtocol

pytestmark = pytest.mark.slow


def test_smollm2_scores_above_chance_and_has_sane_perplexity(smollm2_folder, data_dir):
    loaded = load_model("smollm2-135m", device="cpu")
    settings = EvalSettings(tasks=("arc_easy", "piqa"), limit=100, perplexity=("wikitext2",), speed=False, data_dir=data_dir,
                            perplexity_protocol=PerplexityProtocol(context=512, windows=16))
    results = evaluate_model(loaded.model, loaded.tokenizer, settings)
    for task in ("arc_easy", "piqa"):
        entry = results["tasks"][task]
        assert entry["n"] == 100
        assert entry["acc"] > entry["chance"] + 2 * entry["acc_stderr"], (task, entry)
    assert 15 < results["perplexity"]["wikitext2"]["perplexity"] < 60
