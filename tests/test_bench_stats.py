"""The statistics behind the published verdicts (bench/stats.py), against values worked out by hand."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from stats import (
    above_chance_tasks,
    join_parts,
    log_ratio_stderr,
    normalised,
    paired_difference,
    shared_items,
)

# Dense model: task a at 0.75 with chance 0.5 (margin 0.25); task b at 0.45 with chance 0.25 (margin 0.2).
DENSE = {"tasks": {"a": {"acc": 0.75, "chance": 0.5}, "b": {"acc": 0.45, "chance": 0.25}}}


def result(a_items, b_items, ppl=10.0):
    return {"tasks": {"a": {"items": a_items, "n": len(a_items), "acc": sum(a_items) / len(a_items)},
                      "b": {"items": b_items, "n": len(b_items), "acc": sum(b_items) / len(b_items)}},
            "perplexity": {"wikitext2": {"perplexity": ppl}}}


def test_normalised_accuracy_and_its_item_standard_error():
    # a: 3 of 4 right -> acc 0.75 -> (0.75 - 0.5) / 0.25 = 1.0; b: 1 of 4 -> 0.25 -> 0.0; mean 0.5 -> 50 points
    model = result([1, 1, 1, 0], [1, 0, 0, 0])
    score, stderr = normalised(model, DENSE, ["a", "b"])
    assert score == pytest.approx(50.0)
    # variances of the accuracies p(1-p)/(n-1): a 0.1875/3 = 0.0625, b 0.1875/3 = 0.0625, divided by
    # the squared margins (0.0625 and 0.04): 1.0 and 1.5625; sqrt(2.5625) / 2 tasks = 0.8004 -> 80.04 points
    assert stderr == pytest.approx(100 * math.sqrt(0.0625 / 0.0625 + 0.0625 / 0.04) / 2)


def test_paired_difference_over_the_same_items():
    x = result([1, 1, 0, 0], [1, 1, 1, 0])
    y = result([1, 0, 0, 1], [1, 0, 1, 0])
    diff, stderr = paired_difference(x, y, DENSE, ["a", "b"])
    # a: item differences [0, 1, 0, -1] / 0.25 = [0, 4, 0, -4], mean 0, sample variance 32/3, se^2 8/3
    # b: [0, 1, 0, 0] / 0.2 = [0, 5, 0, 0], mean 1.25, sample variance (3 * 1.5625 + 14.0625) / 3 = 6.25, se^2 1.5625
    assert diff == pytest.approx(100 * (0 + 1.25) / 2)
    assert stderr == pytest.approx(100 * math.sqrt(8 / 3 + 1.5625) / 2)


def test_log_ratio_standard_error_is_paired_over_windows_when_both_have_them():
    a = {"window_nll": [3.0, 3.5, 4.0], "nll_stderr": 0.3}
    b = {"window_nll": [2.5, 3.5, 3.0], "nll_stderr": 0.2}
    # differences [0.5, 0, 1.0], mean 0.5, sample variance 0.25, se sqrt(0.25 / 3)
    assert log_ratio_stderr(a, b) == pytest.approx(math.sqrt(0.25 / 3))
    assert log_ratio_stderr({"nll_stderr": 0.3}, {"nll_stderr": 0.4}) == pytest.approx(0.5)  # independent: sqrt(0.09 + 0.16)


def test_above_chance_needs_three_standard_errors():
    wide = {"tasks": {"piqa": {"acc": 0.65, "chance": 0.5, "acc_stderr": 0.04},  # 0.15 > 0.12
                      "boolq": {"acc": 0.62, "chance": 0.62, "acc_stderr": 0.01},
                      "arc": {"acc": 0.30, "chance": 0.25, "acc_stderr": 0.02}}}  # 0.05 < 0.06
    assert above_chance_tasks(wide) == ["piqa"]


def test_results_scored_in_parts_join_and_cut_to_shared_items():
    first, later = result([1, 0], [0, 1]), result([1, 1], [0, 0])
    joined = join_parts([first, later])
    assert joined["tasks"]["a"]["items"] == [1, 0, 1, 1] and joined["tasks"]["a"]["acc"] == 0.75
    with pytest.raises(SystemExit, match="different model"):
        join_parts([first, result([1], [1], ppl=11.0)])
    short, long_ = shared_items(first, joined)
    assert long_["tasks"]["a"]["items"] == [1, 0] and long_["tasks"]["a"]["n"] == 2 and short["tasks"]["b"]["acc"] == 0.5


def test_the_protocols_rule_combines_seed_and_item_noise():
    """bench/protocol.compare on three seeds of two methods, worked out by hand."""
    from protocol import compare

    def healed(ppl, window_nll, a_items, b_items):
        return {**result(a_items, b_items), "perplexity": {"wikitext2": {"perplexity": ppl, "window_nll": window_nll, "nll_stderr": 0.1}}}

    default = [healed(40.0, [3.0, 4.0], [1, 1, 1, 0], [1, 1, 0, 0]), healed(42.0, [3.1, 4.1], [1, 1, 1, 0], [1, 1, 0, 0]),
               healed(41.0, [3.0, 4.2], [1, 1, 1, 0], [1, 1, 0, 0])]
    peer = [healed(60.0, [3.5, 4.5], [1, 0, 0, 0], [1, 0, 0, 0]), healed(58.0, [3.4, 4.6], [1, 0, 0, 0], [1, 0, 0, 0]),
            healed(62.0, [3.6, 4.4], [1, 0, 0, 0], [1, 0, 0, 0])]
    verdict = compare(default, peer, DENSE, ["a", "b"])
    diffs = [math.log(40 / 60), math.log(42 / 58), math.log(41 / 62)]
    mean = sum(diffs) / 3
    seed_se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    # window differences [-0.5, -0.5], [-0.3, -0.5], [-0.6, -0.2], averaged over the seeds: [-1.4/3, -1.2/3];
    # their paired standard error, sd / sqrt(2) of two values, is half their gap: 0.2/3 / 2
    item_se = 1 / 30
    ppl = verdict["log_ppl"]
    assert ppl["difference"] == pytest.approx(mean) and ppl["seed_se"] == pytest.approx(seed_se)
    assert ppl["item_se"] == pytest.approx(item_se) and ppl["se"] == pytest.approx(math.hypot(seed_se, item_se))
    assert ppl["default_beats_peer"] == (-mean > 2.50 * math.hypot(seed_se, item_se))
    # accuracy: a: 0.75 vs 0.25 on every seed -> (1.0 - (-1.0)) = 2.0; b: 0.5 vs 0.25 -> (1.25 - 0) = 1.25; mean 1.625 -> 162.5 points
    accuracy = verdict["accuracy_points"]
    assert accuracy["difference"] == pytest.approx(162.5) and accuracy["seed_se"] == pytest.approx(0.0)
    # items: a differences [0, 1, 1, 0] / 0.25 -> [0, 4, 4, 0], var 16/3 / 4; b [0, 1, 0, 0] / 0.2 -> [0, 5, 0, 0], var 6.25 / 4
    assert accuracy["item_se"] == pytest.approx(100 * math.sqrt(16 / 3 / 4 + 6.25 / 4) / 2)


def test_sleb_search_minutes_subtract_the_median_run_that_cut_a_stored_plan():
    """Three plan-reading SLEB runs of 8, 9 and 30 minutes have median 9; two searches of 30 and 40 minutes
    therefore cost 21 + 31 = 52 minutes of search. Other strategies do not count."""
    from protocol import search_minutes

    def run(minutes, strategy="sleb", plan_from=None):
        return {"seconds": 60 * minutes, "method": {"strategy": strategy}, **({"plan_from": plan_from} if plan_from else {})}

    runs = [run(8, plan_from="p"), run(9, plan_from="p"), run(30, plan_from="p"), run(30), run(40), run(100, "bi"), {"seconds": 60}]
    assert search_minutes(runs) == {"searches": 2, "minutes": pytest.approx(52.0)}
    assert search_minutes([run(30), run(40)]) is None  # no run read a plan: nothing to subtract


def test_calibration_summary_reads_the_cut_core_the_domain_shift_and_the_peer_order():
    """make_results' calibration sentences from a small table worked out by hand."""
    from make_results import calibration_summary

    def cal(removed, blocks, wiki, c4, acc):
        return {"removed": removed, "blocks": blocks, "healed_wikitext2_ppl": wiki, "healed_c4_ppl": c4, "healed_accuracy": acc}

    table = {"cal-default-c4-d0 (test-default-s0)": cal("L1-L2", ["L1", "L2"], 90.0, 70.0, 60.0),
             "cal-default-c4-d1": cal("L2-L3", ["L2", "L3"], 88.0, 72.0, 62.0),
             "cal-default-wikitext2-validation-d0": cal("L2,L5", ["L2", "L5"], 70.0, 90.0, 61.0),
             "cal-peer-c4-d1": cal("L7-L8", ["L7", "L8"], 85.0, 80.0, 50.0)}
    rows = {"default": {"healed_wikitext2_ppl": [90.0, 91.0, 92.0], "healed_accuracy": [60.0, 61.0, 62.0]},
            "peer": {"healed_wikitext2_ppl": [95.0, 96.0, 97.0], "healed_accuracy": [55.0, 55.0, 55.0]}}
    text = " ".join(calibration_summary(table, rows))
    assert "the default cut 3 different block sets" in text and "1 block is in every one (L2)" in text
    assert "healed WikiText-2 88.00 to 90.00; the 3 healing seeds of draw 0 span 90.00 to 92.00" in text
    # C4 draws: mean WikiText-2 89, C4 71; WikiText-2 draw: 70 and 90 -> the shift sentence
    assert "from 89.00 to 70.00 and the held-out C4 perplexity from 71.00 to 90.00: the cut and its bridge follow" in text
    # draw 1: peer 85 < default 88; draw 0 (seed 0): default 90 < peer 95
    assert "the order is peer < default at draw 1 and default < peer at draw 0" in text
    rows["peer"]["healed_wikitext2_ppl"] = [80.0, 80.0, 80.0]
    assert "the same as at draw 0" in " ".join(calibration_summary(table, rows))
