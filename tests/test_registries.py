"""One place per method: a scorer and a strategy defined here, and registered, work from
`surgery analyze` and `surgery prune` (CLI choices, analysis.json, tables, plots, plan) with no
other edit."""

import json
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

from surgery.cli import main


@pytest.fixture
def registered():
    """A scorer of adjacent pairs and a strategy that reads it, removed again after the test."""
    from surgery.scoring import SCORERS, Scorer, Section, register
    from surgery.strategies import STRATEGIES, RankingStrategy
    from surgery.strategies import register as register_strategy
    from surgery.strategies.plan import score_order

    @dataclass
    class Pairs(Section):
        drops: dict = field(default_factory=dict)  # "L1.mlp" -> loss increase when it goes with the next sublayer

    @register
    class PairScorer(Scorer):
        name = "pairs"
        title = "adjacent pairs"
        section = Pairs
        plot_files = ("pairs.png",)

        def coalitions(self, settings, players):
            return (frozenset({p, p + 1}) for p in range(players - 1))

        def assemble(self, context):
            full = context.baseline["value"]
            return Pairs({name: full - context.value(frozenset({p, p + 1})) for p, name in enumerate(context.players[:-1])})

        def columns(self, section, metric):
            return {"pair drop": section.drops}

        def plot(self, section, analysis, folder):
            from surgery.plots import figure, save, sublayer_bars

            fig, ax = figure()
            sublayer_bars(ax, list(section.drops), list(section.drops.values()), set())
            return {"Adjacent pairs": save(fig, folder / "pairs.png").name}

    @register_strategy
    class Seams(RankingStrategy):
        """Blocks whose seam with the next block (its FFN and the next attention) matters least."""

        name = "seams"
        needs = ("pairs",)
        granularities = ("block",)

        def rank(self, problem):
            drops = problem.analysis.section("pairs").drops
            last = max(u[0].layer for u in problem.all_units)
            return score_order([u for u in problem.removable if u[0].layer != last], lambda u: drops[f"L{u[0].layer}.mlp"])

    yield
    SCORERS.pop("pairs")
    STRATEGIES.pop("seams")


def test_a_scorer_and_a_strategy_registered_anywhere_work_from_the_cli(registered, tiny_folder, tmp_path, data_dir):
    source, _ = tiny_folder("llama", num_layers=4)
    common = ["--samples", "2", "--seq-len", "32", "--data-dir", str(data_dir), "--device", "cpu"]
    out = tmp_path / "analysis"
    result = CliRunner().invoke(main, ["analyze", str(source), "--out", str(out), "--method", "pairs", *common],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "analysis.json").read_text())
    assert set(saved["sections"]) == {"pairs"} and len(saved["sections"]["pairs"]["drops"]) == 7
    assert "pair drop" in result.output  # its column in the terminal table
    assert (out / "pairs.png").stat().st_size > 1000 and "![Adjacent pairs](pairs.png)" in (out / "analysis.md").read_text()

    assert "seams" in CliRunner().invoke(main, ["prune", "--help"]).output  # a choice of --strategy
    pruned = tmp_path / "pruned"
    result = CliRunner().invoke(main, ["prune", str(source), "--out", str(pruned), "--strategy", "seams", "--remove", "1",
                                       "--analysis", str(tmp_path / "for-prune"), "--no-bridge", "--eval-tasks", "none",
                                       "--eval-ppl", "none", "--no-eval-speed", *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    drops = json.loads((tmp_path / "for-prune" / "analysis.json").read_text())["sections"]["pairs"]["drops"]
    weakest_seam = min(range(3), key=lambda layer: drops[f"L{layer}.mlp"])  # never the last block, which has no seam
    report = json.loads((pruned / "report.json").read_text())
    assert report["plan"]["strategy"] == "seams" and report["plan"]["removed_compact"] == f"L{weakest_seam}"
    assert json.loads((pruned / "local.json").read_text())["analysis"]["folder"] == str(tmp_path / "for-prune")
