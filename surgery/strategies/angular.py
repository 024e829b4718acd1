"""Gromov et al. (2024): remove the contiguous run of n blocks whose input and output streams are
the most similar (smallest angular distance, from the analysis)."""

from __future__ import annotations

from surgery.errors import SurgeryError
from surgery.strategies.plan import Problem, Strategy, Unit, closest_prefix, register


@register
class AngularRun(Strategy):
    name = "angular"
    needs = ("angular",)
    granularities = ("block",)

    def choose(self, problem: Problem) -> tuple[list[Unit], list[Unit]]:
        distances = problem.analysis.section("angular").distances
        units = problem.all_units
        size = problem.goal_count if problem.goal_count is not None else \
            closest_prefix([problem.unit_parameters(u) for u in units], problem.goal_parameters)
        allowed = {u[0].layer for u in problem.removable}
        runs = [(distances[size - 1][start], start) for start in range(len(units) - size + 1)
                if all(layer in allowed for layer in range(start, start + size))]
        if not runs:
            raise SurgeryError(f"no run of {size} consecutive blocks avoids the protected ones: lower the target or protect less")
        _, start = min(runs)
        chosen = units[start:start + size]
        return chosen, chosen
