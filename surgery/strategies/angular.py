"""Gromov et al. (2024): remove the contiguous run of n blocks whose input and output streams are
the most similar (smallest angular distance, from the analysis)."""

from __future__ import annotations

from itertools import accumulate

from surgery.errors import SurgeryError
from surgery.strategies.plan import Problem, Strategy, Unit, register


def runs_near_target(sizes: list[int], count: int | None, goal: float | None) -> list[tuple[int, int]]:
    """The runs (start, length) the paper's choice is made among: every run of `count` blocks, or,
    for a share `goal` of parameters, every run whose own parameters come within half of the largest
    block of it (each run's size from its own blocks: a model's blocks differ in size when some are
    dense and some MoE, or some lost a sublayer before). Where none does, the closest runs, ties to
    the longer; none when removing nothing is closer still (a share below half a block)."""
    every = [(start, length) for start in range(len(sizes)) for length in range(1, len(sizes) - start + 1)]
    if count is not None:
        return [run for run in every if run[1] == count]
    prefix = [0, *accumulate(sizes)]
    gap = {(start, length): abs(prefix[start + length] - prefix[start] - goal) for start, length in every}
    closest = min(gap.values())
    if closest > goal:
        return []
    near = [run for run in every if gap[run] < max(sizes) / 2]
    if near:
        return near
    longest = max(length for start, length in every if gap[(start, length)] == closest)
    return [run for run in every if gap[run] == closest and run[1] == longest]


@register
class AngularRun(Strategy):
    name = "angular"
    needs = ("angular",)
    granularities = ("block",)

    def choose(self, problem: Problem) -> tuple[list[Unit], list[Unit]]:
        distances = problem.analysis.section("angular").distances
        units = problem.all_units
        runs = runs_near_target([problem.unit_parameters(u) for u in units], problem.goal_count, problem.goal_parameters)
        if not runs:
            return [], []  # less than one block: prune says so
        allowed = {u[0].layer for u in problem.removable}
        free = [(distances[length - 1][start], -length, start) for start, length in runs
                if all(layer in allowed for layer in range(start, start + length))]
        if not free:
            lengths = sorted({length for _, length in runs})
            raise SurgeryError(f"no run of {' or '.join(map(str, lengths))} consecutive blocks avoids the protected ones: "
                               "lower the target or protect less")
        _, negative_length, start = min(free)  # the most similar run; at equal distance the longer
        chosen = units[start:start - negative_length]
        return chosen, chosen
