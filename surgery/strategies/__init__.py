"""Strategies: what to remove under a budget.

- `plan.py`: the `Strategy` protocol and registry (`STRATEGIES`, `@register`), targets, the plan.
- `ranked.py`: shapley, ablation, bi (ShortGPT), last (Gromov's heuristic), random.
- `angular.py`: Gromov et al.'s most similar contiguous run.
- `iterative.py`: greedy removal re-scored on calibration text as it goes.

A new strategy is a `@register`ed class in a file here, imported below.
"""

from surgery.strategies import angular, iterative, ranked  # noqa: F401 (registers the built-in strategies)
from surgery.strategies.plan import (
    GRANULARITIES,
    STRATEGIES,
    Problem,
    RankingStrategy,
    RemovalPlan,
    Strategy,
    Target,
    Unit,
    check_choice,
    make_plan,
    register,
    strategy,
    units_of,
)

__all__ = ["GRANULARITIES", "STRATEGIES", "Problem", "RankingStrategy", "RemovalPlan", "Strategy", "Target", "Unit",
           "check_choice", "make_plan", "register", "strategy", "units_of"]
