"""Removal plans: every strategy at both granularities, budgets, protection, errors."""

import pytest

from surgery.errors import SurgeryError
from surgery.strategies import STRATEGIES, Target, make_plan, units_of
from surgery.sublayers import Sublayer, full_blocks, parse_sublayers

LAYERS = 8


def parameters(unit):
    """Attention 100, FFN 300 per block, like a real 1:3 split."""
    return sum(100 if s.kind == "attn" else 300 for s in unit)


def fake_analysis():
    from surgery.analysis import Analysis
    from surgery.scoring.ablation import AblationScores
    from surgery.scoring.angular import AngularDistances
    from surgery.scoring.block_influence import BlockInfluenceScores
    from surgery.scoring.shapley import ShapleyValues

    ids = [f"L{l}.{k}" for l in range(LAYERS) for k in ("attn", "mlp")]
    # importance rises towards both ends, L0.mlp far above the rest
    value = {name: 1.0 + abs(3.5 - int(name[1:].split(".")[0])) + (0.5 if name.endswith("mlp") else 0) for name in ids}
    value["L0.mlp"] = 50.0
    distances = [[0.5 - 0.01 * n + 0.02 * abs(4 - start) for start in range(LAYERS - n + 1)] for n in range(1, LAYERS + 1)]
    sections = {
        "shapley": ShapleyValues(estimator="exact", max_removed=LAYERS, formula="", values=value),
        "ablation": AblationScores(sublayers={name: {"drop": v / 2} for name, v in value.items()},
                                   blocks={f"L{l}": {"drop": value[f"L{l}.attn"] + value[f"L{l}.mlp"]} for l in range(LAYERS)}),
        "bi": BlockInfluenceScores(blocks={f"L{l}": value[f"L{l}.attn"] for l in range(LAYERS)}, sublayers=value),
        "angular": AngularDistances(distances=distances),
    }
    return Analysis(key="test", model={}, settings={"metric": "loss"}, players=ids, baseline={}, sections=sections,
                    cornerstones=[], complete=True, coalitions={})


PERIOD = 2  # --granularity period: the blocks of one period of a pattern a runtime fixes (Gemma 2's in llama.cpp)


def within_one_unit(result, granularity, target=0.25):
    """The closest-prefix rule: removed parameters are within half the largest unit of the target."""
    largest = max(parameters(u) for u in units_of(LAYERS, granularity, period=PERIOD))
    return abs(result.parameters_removed - target * result.decoder_parameters) <= largest / 2


def plan(strategy, granularity="block", remove="25%", **kwargs):
    value_after = kwargs.pop("value_after", lambda removed: -sum(parameters((s,)) for s in removed) / 1000)
    return make_plan(strategy, granularity, Target.parse(remove), LAYERS, parameters, analysis=fake_analysis(),
                     value_after=value_after, period=kwargs.pop("period", PERIOD), **kwargs)


@pytest.mark.parametrize("strategy, granularity", [(name, g) for name, s in STRATEGIES.items() for g in s.granularities])
def test_every_strategy_meets_the_budget_at_both_granularities(strategy, granularity):
    result = plan(strategy, granularity)
    assert within_one_unit(result, granularity), result.parameters_removed
    assert len(set(result.units)) == len(result.units)
    if granularity == "block":
        layers = {u.layer for u in result.units}
        assert len(result.units) == 2 * len(layers)


def test_score_strategies_remove_the_least_valuable_first():
    assert plan("shapley", remove="2").units == parse_sublayers("L3,L4")
    assert plan("shapley", "sublayer", remove="2").units == parse_sublayers("L3.attn,L4.attn")
    assert plan("ablation", remove="1").units == parse_sublayers("L3")
    assert plan("bi", "sublayer", remove="1").units == parse_sublayers("L3.attn")


def test_last_never_takes_the_final_block():
    assert plan("last", remove="2").units == parse_sublayers("L5,L6")
    assert plan("last", "sublayer", remove="3").units == parse_sublayers("L5.mlp,L6")
    with pytest.raises(SurgeryError, match=r"95% cannot be met: the last strategy can take at most 87.5%.*final block"):
        plan("last", remove="95%")  # it used to remove 87.5% without a word


def test_angular_takes_the_most_similar_contiguous_run():
    result = plan("angular", remove="3")
    assert result.units == parse_sublayers("L4-L6")  # the fake distances are lowest for runs starting at L4
    with pytest.raises(SurgeryError, match="--granularity block"):
        plan("angular", "sublayer")


def test_angular_meets_a_share_when_blocks_differ_in_size():
    """Dense blocks first, MoE blocks after (DeepSeek-V3's layout): the run's own blocks size it, so
    the plan lands within half a block of the share wherever the most similar run lies."""
    from surgery.strategies.angular import runs_near_target

    def sizes(unit):
        return sum((30 if s.kind == "attn" else 270) if s.layer < 2 else (30 if s.kind == "attn" else 400) for s in unit)

    total = sum(sizes(u) for u in units_of(LAYERS, "block"))
    for share, protect in ((0.25, []), (0.4, [Sublayer(0, "attn")]), (0.4, [])):
        result = make_plan("angular", "block", Target.parse(f"{share:.0%}"), LAYERS, sizes, analysis=fake_analysis(),
                           protected=protect)
        assert abs(result.parameters_removed - share * total) <= 430 / 2, (share, result.units)
    assert runs_near_target([300, 300, 430], None, 100) == []  # removing nothing is closer
    assert runs_near_target([300] * 4, None, 450) == [(0, 2), (1, 2), (2, 2)]  # a tie between 1 and 2 blocks: the longer


def test_angular_below_half_a_block_chooses_nothing():
    assert plan("angular", remove="5%").units == []  # prune then says the target is less than one block


def test_random_is_seeded():
    assert plan("random", seed=1).units == plan("random", seed=1).units
    assert plan("random", "sublayer", seed=1).units != plan("random", "sublayer", seed=2).units


def test_iterative_rescoring_changes_with_what_was_removed():
    """A value function with an interaction: once L2 goes, L5 becomes expensive. Greedy re-scoring
    sees it; a one-shot ranking would not."""

    def value_after(removed):
        layers = {s.layer for s in removed}
        penalty = {2: 1.0, 5: 1.5, 6: 2.0, 3: 2.5}
        cost = sum(penalty.get(l, 5.0) for l in layers)
        if 2 in layers and 5 in layers:
            cost += 10
        return -cost

    result = plan("iterative", remove="2", value_after=value_after)
    assert result.units == parse_sublayers("L2,L6")


def test_sleb_rescores_every_block_at_every_step():
    """SLEB's greedy search written out here: at each step the block whose removal (with the earlier
    ones) keeps the value highest; iterative with one candidate keeps re-scoring only its first pick."""
    def value_after(removed):
        layers = {s.layer for s in removed}
        cost = sum({2: 1.0, 5: 1.5, 6: 2.0, 3: 2.5}.get(l, 5.0) for l in layers)
        return -(cost + (10 if {2, 5} <= layers else 0) + (4 if {2, 6} <= layers else 0))

    chosen = []
    for _ in range(2):
        options = [l for l in range(LAYERS) if l not in chosen]
        chosen.append(max(options, key=lambda l: value_after([Sublayer(x, k) for x in [*chosen, l] for k in ("attn", "mlp")])))
    result = plan("sleb", remove="2", value_after=value_after)
    assert result.units == sorted(Sublayer(l, k) for l in chosen for k in ("attn", "mlp"))
    assert result.units == parse_sublayers("L2-L3")  # not L6, which a one-candidate rescoring keeps
    assert plan("iterative", remove="2", value_after=value_after, candidates=1).units != result.units
    with pytest.raises(SurgeryError, match="--granularity block"):
        plan("sleb", "sublayer")


@pytest.mark.parametrize("strategy, granularity", [(name, g) for name, s in STRATEGIES.items() for g in s.granularities])
def test_a_hybrid_model_keeps_one_of_its_attention_blocks(strategy, granularity):
    """Where a strategy would take every attention block of a hybrid model (whose cache transformers
    measures in them), the plan keeps the one it ranks most valuable and still meets the budget."""
    free = plan(strategy, granularity, remove="50%")
    taken = sorted(full_blocks(free.units))
    assert taken  # the premise: these blocks go whole when nothing constrains the choice
    kept = plan(strategy, granularity, remove="50%", attention_blocks=taken)
    assert not set(taken) <= set(full_blocks(kept.units))
    assert within_one_unit(kept, granularity, 0.5), kept.parameters_removed
    assert any("had chosen every attention block" in note for note in kept.notes)
    untouched = plan(strategy, granularity, remove="50%", attention_blocks=[*taken, *(b for b in range(LAYERS) if b not in taken)][-1:])
    assert untouched.units == free.units and untouched.notes == free.notes


def test_the_attention_block_kept_is_the_one_ranked_most_valuable():
    result = plan("shapley", remove="2", attention_blocks=[3, 4])  # unconstrained: L3, L4 (ties in stream order)
    assert result.units == parse_sublayers("L2,L3")
    assert result.notes[0].startswith("kept L4.attn: the shapley strategy had chosen every attention block")


def test_a_written_plan_reads_back_as_the_same_plan():
    """bench/protocol.py chooses SLEB's plan once and cuts it again for every healing seed."""
    from surgery.strategies.plan import RemovalPlan

    for chosen in (plan("sleb", protected=parse_sublayers("L0.mlp")), plan("bi", "sublayer", remove="3")):
        chosen.notes.append("a note")
        assert chosen.units and chosen.order
        assert RemovalPlan.from_record(chosen.describe()) == chosen  # units, protected, order, notes, counts


def test_protected_units_are_never_removed_and_impossible_targets_say_how_much_is_removable():
    protected = parse_sublayers("L3,L4.attn")
    result = plan("shapley", remove="2", protected=protected)
    assert not set(result.units) & set(protected)
    assert result.units == parse_sublayers("L2,L5")
    with pytest.raises(SurgeryError, match="only 75.0% of decoder parameters are removable"):
        plan("shapley", "block", remove="80%", protected=parse_sublayers("L0.attn,L1.attn"))
    with pytest.raises(SurgeryError, match="6 are"):
        plan("shapley", remove="7", protected=parse_sublayers("L0,L1.mlp"))
    with pytest.raises(SurgeryError, match="L0.mlp is protected"):
        plan("shapley", remove="L0-L1", protected=parse_sublayers("L0.mlp"))


def test_explicit_ids_are_taken_as_given():
    result = plan("shapley", remove="L1,L6.attn")
    assert result.strategy == "explicit" and result.units == parse_sublayers("L1,L6.attn")
    # the granularity recorded (and on the card) is the ids', whatever --granularity said
    assert result.granularity == "sublayer" and plan("shapley", "block", remove="L1.attn").granularity == "sublayer"
    assert plan("shapley", "sublayer", remove="L1,L2").granularity == "block"


@pytest.mark.parametrize("text, message", [("0", "removes nothing"), ("0%", "above 0%"), ("100%", "below 100%"),
                                           ("150%", "below 100%"), ("L2-L1", "runs backwards"),
                                           ("1.5", r"'1\.5' is not a count \(8\), a share"),  # it spoke of ids alone
                                           ("25 %", "a share of decoder parameters"), ("L2.foo", "is not a sublayer id")])
def test_bad_targets(text, message):
    with pytest.raises(SurgeryError, match=message):
        Target.parse(text)


def test_unknown_strategy_and_granularity():
    with pytest.raises(SurgeryError, match="unknown strategy 'magic'.*iterative"):
        plan("magic")
    with pytest.raises(SurgeryError, match="unknown granularity"):
        plan("shapley", "layer")


def test_units_of_granularities():
    assert units_of(2, "block") == [(Sublayer(0, "attn"), Sublayer(0, "mlp")), (Sublayer(1, "attn"), Sublayer(1, "mlp"))]
    assert len(units_of(3, "sublayer")) == 6


@pytest.mark.parametrize("strategy", [name for name, s in STRATEGIES.items() if "period" in s.granularities])
def test_a_period_is_removed_whole_so_no_later_layer_moves_in_the_pattern(strategy):
    """Units of PERIOD consecutive blocks from L0 on: whatever a strategy chooses, every removed block's
    period goes whole, so each kept block keeps its place modulo the period (llama.cpp's Gemma pattern)."""
    assert units_of(7, "period", period=3) == [tuple(parse_sublayers("L0-L2")), tuple(parse_sublayers("L3-L5"))]
    result = plan(strategy, "period", remove="2")
    blocks = full_blocks(result.units)
    assert len(result.units) == 2 * len(blocks) == 2 * 2 * PERIOD
    assert all(block - block % PERIOD + k in blocks for block in blocks for k in range(PERIOD))
    kept = [layer for layer in range(LAYERS) if layer not in blocks]
    assert all(old % PERIOD == new % PERIOD for new, old in enumerate(kept))


def test_the_deepest_period_goes_first_but_never_the_final_block():
    """`last` at period granularity: the model's final block stays; a period that holds it is never taken."""
    assert plan("last", "period", remove="1").units == parse_sublayers("L4-L5")  # L6-L7 holds the final block
    assert make_plan("last", "period", Target.parse("1"), 9, parameters, period=PERIOD).units == parse_sublayers("L6-L7")


def test_period_granularity_needs_a_pattern():
    with pytest.raises(SurgeryError, match="--granularity period keeps a layer pattern .* use --granularity block"):
        plan("bi", "period", period=None)
    with pytest.raises(SurgeryError, match="the angular strategy works at block granularity"):
        plan("angular", "period")
