"""Linear bridges on real tiny models: the fold is exact, the fit is the least-squares solution, and
the stream after a bridged cut is measurably closer to the dense stream than after a plain cut."""

from __future__ import annotations

import pytest
import torch

from surgery.arch import ARCHITECTURES, decoder_layers
from surgery.bridge import RIDGE, _fold, fit_and_fold, output_weights, plan_bridges
from surgery.cut import cut
from surgery.forward import capture_stream
from surgery.sublayers import Sublayer, parse_sublayers
from surgery.tiny import tiny_model


def batches(count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(3, 300, (count * 4, 32), generator=generator).split(4))


@torch.no_grad()
def stream_error(model, dense_states: list[dict], new_position: int, old_position: int, data) -> float:
    """Squared distance between the model's stream at new_position and the dense stream at old_position."""
    total = 0.0
    for ids, dense in zip(data, dense_states):
        states, _ = capture_stream(model, ids, [new_position])
        total += float(((states[new_position] - dense[old_position]) ** 2).sum())
    return total


def test_fold_makes_the_output_y_times_one_plus_delta():
    linear = torch.nn.Linear(6, 5, bias=True).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    delta = torch.randn(5, 5, dtype=torch.float64) * 0.1
    expected = linear(x) @ (torch.eye(5, dtype=torch.float64) + delta)
    with torch.no_grad():
        _fold(linear, delta)
    torch.testing.assert_close(linear(x), expected)


FOLDABLE = sorted(f for f, arch in ARCHITECTURES.items() if arch.output_projections("mlp"))
# (their default norms each output: nothing folds, tests/test_hybrid.py; without, the projections write the stream)
FOLDING_CONFIG = {"lfm3": {"use_sandwich_norm": False}, "hyperclovax": {"use_post_norm": False}}


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
@torch.no_grad()
def test_a_fold_scales_every_sublayer_output_exactly(family):
    """For each sublayer a bridge can fold into, in every family (MoE experts, shared experts, biases,
    gpt-oss's transposed experts): its contribution to the stream c becomes c (I + D) exactly."""
    torch.manual_seed(0)
    ids = batches(1)[0]
    model = tiny_model(family, num_layers=4, **FOLDING_CONFIG.get(family, {}))
    arch = ARCHITECTURES[family]
    layers = decoder_layers(model)
    foldable = []
    for position in range(2, 8):  # L1 and later (DeepSeek and GLM-MoE start with dense blocks)
        unit = Sublayer.at(position)
        targets, reason = output_weights(layers[unit.layer], arch, unit.kind)
        if reason:
            continue
        foldable.append(str(unit))
        before, _ = capture_stream(model, ids, [position, position + 1])
        delta = torch.randn(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64) * 0.05
        for target in targets:
            _fold(target, delta)
        after, _ = capture_stream(model, ids, [position, position + 1])
        expected = ((before[position + 1] - before[position]).double() @ (torch.eye(delta.shape[0], dtype=torch.float64) + delta))
        torch.testing.assert_close((after[position + 1] - after[position]).double(), expected, rtol=1e-4, atol=1e-4)
    assert bool(foldable) == (family in FOLDABLE or bool(arch.output_projections("attn")))
    if arch.moe_outputs:
        assert any(name.endswith(".mlp") for name in foldable), family  # the MoE blocks are bridged now


@pytest.mark.parametrize("model_type, fit", [(family, "lstsq") for family in
                                              ("llama", "granite", "phi3", "starcoder2", "mixtral", "qwen2_moe", "gpt_oss",
                                               "cohere")]
                         + [("llama", "cosine")])
def test_bridged_cut_is_closer_to_the_dense_stream_than_a_plain_cut(model_type, fit):
    """Blocks L2-L3 of six go; the stream entering the new L2 should match the dense stream entering
    old L4. Granite scales each sublayer's output (residual_multiplier), which the fit must absorb;
    StarCoder2's output projection has a bias, which the fold must carry."""
    torch.manual_seed(0)
    data = batches()
    units = parse_sublayers("L2-L3")
    dense = tiny_model(model_type, num_layers=6)
    dense_states = [capture_stream(dense, ids, [8])[0] for ids in data]

    plain = tiny_model(model_type, num_layers=6)
    cut(plain, units)
    bridged = tiny_model(model_type, num_layers=6)
    result = fit_and_fold(bridged, units, data, fit=fit)
    cut(bridged, units)

    assert [(b.run, b.into) for b in result.bridges] == [("L2-L3", "L1.mlp")]
    plain_error = stream_error(plain, dense_states, 4, 8, data)
    bridged_error = stream_error(bridged, dense_states, 4, 8, data)
    assert bridged_error < plain_error
    # the fit reports the share of the gap the bridge folded in closes on these tokens; measured after the cut, it agrees
    assert bridged_error / plain_error == pytest.approx(1 - result.bridges[0].explained, rel=1e-3, abs=1e-4)


@torch.no_grad()
def test_the_fit_is_the_least_squares_solution():
    """Refit by torch.linalg.lstsq on the raw token matrices, the ridge as extra rows: the same fold."""
    data = batches()
    units = parse_sublayers("L1.attn")  # a sublayer run: the bridge folds into L0.mlp's down_proj
    dense = tiny_model("llama", num_layers=4)
    rows_c, rows_g = [], []
    for ids in data:
        states, _ = capture_stream(dense, ids, [1, 2, 3])
        rows_c.append((states[2] - states[1]).flatten(0, 1).double())
        rows_g.append((states[3] - states[2]).flatten(0, 1).double())
    c, g = torch.cat(rows_c), torch.cat(rows_g)
    ridge = RIDGE * float((c * c).sum(0).mean())
    size = c.shape[1]
    delta = torch.linalg.lstsq(torch.cat([c, ridge**0.5 * torch.eye(size, dtype=c.dtype)]),
                               torch.cat([g, torch.zeros(size, size, dtype=g.dtype)])).solution
    expected = tiny_model("llama", num_layers=4).model.layers[0].mlp.down_proj
    _fold(expected, delta)

    bridged = tiny_model("llama", num_layers=4)
    fit_and_fold(bridged, units, data)
    torch.testing.assert_close(bridged.model.layers[0].mlp.down_proj.weight, expected.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["cohere", "cohere2", "phi"])
def test_a_parallel_blocks_ffn_bridges_into_its_attention(model_type):
    """In a parallel block both sublayers read the block's input: with L2's FFN gone, the block returns
    its input plus the attention's output, which the fold into that attention's o_proj brings closer
    to the dense block's output, by the share the fit reports."""
    data = batches()
    units = [Sublayer(2, "mlp")]
    dense = tiny_model(model_type, num_layers=4)
    dense_states = [capture_stream(dense, ids, [6])[0] for ids in data]
    plain = tiny_model(model_type, num_layers=4)
    cut(plain, units)
    bridged = tiny_model(model_type, num_layers=4)
    result = fit_and_fold(bridged, units, data)
    cut(bridged, units)

    assert [(b.run, b.into) for b in result.bridges] == [("L2.mlp", "L2.attn")]
    plain_error, bridged_error = (stream_error(model, dense_states, 6, 6, data) for model in (plain, bridged))
    assert bridged_error < plain_error
    assert bridged_error / plain_error == pytest.approx(1 - result.bridges[0].explained, rel=1e-3, abs=1e-4)


def test_attention_runs_fold_into_the_attention_before_them():
    model = tiny_model("llama", num_layers=4)
    before = model.model.layers[2].self_attn.o_proj.weight.clone()
    result = fit_and_fold(model, [Sublayer(2, "mlp")], batches(2))
    assert [(b.run, b.into) for b in result.bridges] == [("L2.mlp", "L2.attn")]
    assert not torch.equal(model.model.layers[2].self_attn.o_proj.weight, before)


@pytest.mark.parametrize(
    ("model_type", "removal", "reason"),
    [
        ("gemma2", "L2", "no plain output projection"),  # post-norms follow the projections
        ("olmo2", "L2", "no plain output projection"),  # a norm follows each sublayer's projection
        ("lfm3", "L2", "normed before the stream"),  # its sandwich norms (use_sandwich_norm, on by default)
        ("llama", "L0", "no kept sublayer before it"),
    ],
)
def test_runs_that_cannot_be_bridged_are_named_and_left_untouched(model_type, removal, reason):
    model = tiny_model(model_type, num_layers=4)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    result = fit_and_fold(model, parse_sublayers(removal), batches(2))
    assert result.bridges == []
    assert len(result.skipped) == 1 and reason in result.skipped[0] and removal in result.skipped[0]
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_runs_removed_by_an_earlier_cut_are_not_bridged_again():
    model = tiny_model("llama", num_layers=6)
    cut(model, [Sublayer(3, "attn")])
    plans, skipped = plan_bridges(model, [Sublayer(1, "mlp")])
    assert [(str(kept), [str(u) for u in run]) for kept, run in plans] == [("L1.attn", ["L1.mlp"])]
    assert skipped == []


def test_the_cosine_fit_lowers_the_cosine_distance_it_starts_from(tokenizer):
    """ReplaceMe's cosine variant: starting from the least-squares bridge, the mean cosine distance
    between the bridged and the dense stream on the calibration tokens goes down, and the fold
    still changes only the kept sublayer's output projection."""
    from surgery.tiny import tiny_model

    model = tiny_model("llama", num_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = fit_and_fold(model, parse_sublayers("L1-L2"), batches, fit="cosine")
    (bridge,) = result.bridges
    assert bridge.cosine_distance[1] < bridge.cosine_distance[0]
    least_squares = fit_and_fold(tiny_model("llama", num_layers=4), parse_sublayers("L1-L2"), batches).bridges[0]
    assert bridge.explained < least_squares.explained  # the squared gap closed by the matrix folded in: less than the optimum's
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == ["model.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("post_norm", [True, False])
def test_hyperclovax_bridges_only_where_no_post_norm_follows_the_projection(post_norm):
    """HyperCLOVA X norms each sublayer's output (use_post_norm, its default) unless told not to, where
    those norms are nn.Identity: L2-L3 of six then fold into L1's down_proj and close the gap by the
    share the fit reports; with the norms, a linear map cannot pass through them, and the run is skipped."""
    data, units = batches(), parse_sublayers("L2-L3")
    model = tiny_model("hyperclovax", num_layers=6, use_post_norm=post_norm)
    result = fit_and_fold(model, units, data)
    if post_norm:
        assert result.bridges == [] and len(result.skipped) == 1
    else:
        assert [(b.run, b.into) for b in result.bridges] == [("L2-L3", "L1.mlp")] and 0 < result.bridges[0].explained < 1
