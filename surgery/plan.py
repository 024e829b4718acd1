"""Removal plans: which units to remove, from a strategy, a budget and the protected units.

A strategy turns scores (from an analysis) into an order of units, least valuable first; the
budget decides how far down that order to go. Strategies live in `STRATEGIES`, one function
each: that is the one place to add a method. `iterative` alone re-scores as it goes, with a
value function the caller provides. This module never touches torch modules: parameter counts
come in as numbers, and the cut happens elsewhere.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import SurgeryError
from surgery.sublayers import Sublayer, all_sublayers, format_sublayers, full_blocks, parse_sublayers

GRANULARITIES = ("block", "sublayer")


@dataclass(frozen=True)
class Target:
    """How much to remove: a count of units, a fraction of decoder parameters, or explicit ids."""

    count: int | None = None
    fraction: float | None = None
    ids: tuple[Sublayer, ...] = ()

    @classmethod
    def parse(cls, text: str | int | float) -> Target:
        text = str(text).strip()
        if re.fullmatch(r"\d+", text):
            count = int(text)
            if count == 0:
                raise SurgeryError("--remove 0 removes nothing: give a count, a percentage (25%) or sublayer ids")
            return cls(count=count)
        match = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
        if match:
            fraction = float(match.group(1)) / 100
            if not 0 < fraction < 1:
                raise SurgeryError(f"--remove {text}: the percentage of decoder parameters must be above 0% and below 100%")
            return cls(fraction=fraction)
        return cls(ids=tuple(parse_sublayers(text)))

    def describe(self) -> str:
        if self.count is not None:
            return f"{self.count} units"
        if self.fraction is not None:
            return f"{100 * self.fraction:g}% of decoder parameters"
        return format_sublayers(self.ids)


@dataclass
class RemovalPlan:
    strategy: str
    granularity: str
    target: str
    units: list[Sublayer]
    protected: list[Sublayer]
    parameters_removed: int
    decoder_parameters: int
    order: list[str] = field(default_factory=list)  # the strategy's full ranking, least valuable first
    notes: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.parameters_removed / self.decoder_parameters

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "granularity": self.granularity, "target": self.target,
            "removed": [str(u) for u in self.units], "removed_compact": format_sublayers(self.units),
            "protected": [str(u) for u in self.protected], "parameters_removed": self.parameters_removed,
            "decoder_parameters": self.decoder_parameters, "fraction_of_decoder_parameters": self.fraction,
            "order": self.order, "notes": self.notes,
        }


# A unit is a tuple of sublayers: one for sublayer granularity, a block's two for block granularity.
Unit = tuple[Sublayer, ...]


def units_of(layers: int, granularity: str) -> list[Unit]:
    if granularity == "block":
        return [(Sublayer(l, "attn"), Sublayer(l, "mlp")) for l in range(layers)]
    return [(s,) for s in all_sublayers(layers)]


def unit_name(unit: Unit) -> str:
    return format_sublayers(unit)


# ------------------------------------------------------------------ strategies


def _score_order(units: list[Unit], score: Callable[[Unit], float]) -> list[Unit]:
    return sorted(units, key=lambda u: (score(u), u[0].position))


def _sublayer_scores(analysis: dict[str, Any], section: str, key: str | None) -> dict[str, float]:
    if section not in analysis:
        raise SurgeryError(f"the analysis has no {section} scores: rerun surgery analyze with that method")
    values = analysis[section] if key is None else analysis[section][key]
    return {name: (v["drop"] if isinstance(v, dict) else v) for name, v in values.items()}


def by_shapley(units: list[Unit], analysis: dict[str, Any], **_: Any) -> list[Unit]:
    scores = _sublayer_scores(analysis, "shapley", "values")
    if any(v is None for v in scores.values()):
        raise SurgeryError("the analysis is partial (some Shapley values unknown): finish it with surgery analyze first")
    return _score_order(units, lambda u: sum(scores[str(s)] for s in u))


def by_ablation(units: list[Unit], analysis: dict[str, Any], **_: Any) -> list[Unit]:
    if len(units[0]) == 2:
        blocks = analysis.get("block_ablation")
        if not blocks:
            raise SurgeryError("the analysis has no block ablation scores: rerun surgery analyze with --method ablation")
        return _score_order(units, lambda u: blocks[f"L{u[0].layer}"]["drop"])
    scores = _sublayer_scores(analysis, "ablation", None)
    return _score_order(units, lambda u: scores[str(u[0])])


def by_block_influence(units: list[Unit], analysis: dict[str, Any], **_: Any) -> list[Unit]:
    section = analysis.get("block_influence")
    if not section:
        raise SurgeryError("the analysis has no Block Influence scores: rerun surgery analyze with --method bi")
    if len(units[0]) == 2:
        return _score_order(units, lambda u: section["blocks"][f"L{u[0].layer}"])
    return _score_order(units, lambda u: section["sublayers"][str(u[0])])


def by_depth(units: list[Unit], **_: Any) -> list[Unit]:
    """Gromov's simple heuristic: the deepest units first, never the final block."""
    last_layer = max(u[0].layer for u in units)
    return sorted((u for u in units if u[0].layer != last_layer), key=lambda u: -u[-1].position)


def by_random(units: list[Unit], seed: int = 0, **_: Any) -> list[Unit]:
    order = list(units)
    random.Random(seed).shuffle(order)
    return order


STRATEGIES: dict[str, Callable[..., list[Unit]]] = {
    "shapley": by_shapley,
    "ablation": by_ablation,
    "bi": by_block_influence,
    "last": by_depth,
    "random": by_random,
}
CONTIGUOUS = ("angular",)  # choose one contiguous run instead of an order
ADAPTIVE = ("iterative",)  # re-score after every removal
ALL_STRATEGIES = (*STRATEGIES, *CONTIGUOUS, *ADAPTIVE)
NEEDS_ANALYSIS = {"shapley": ("shapley", "ablation"), "ablation": ("ablation",), "bi": ("bi",), "angular": ("angular",)}


# ------------------------------------------------------------------ budgets


def _closest_prefix(sizes: list[int], goal: float) -> int:
    """How many of the ordered units to take so that their parameters come closest to `goal`
    (ties go to the larger removal)."""
    best, best_gap, total = 0, goal, 0
    for index, size in enumerate(sizes, start=1):
        total += size
        gap = abs(total - goal)
        if gap <= best_gap:
            best, best_gap = index, gap
        if total > goal:
            break
    return best


def make_plan(
    strategy: str,
    granularity: str,
    target: Target,
    layers: int,
    unit_parameters: Callable[[Unit], int],
    *,
    analysis: dict[str, Any] | None = None,
    protected: list[Sublayer] = (),
    seed: int = 0,
    value_after: Callable[[list[Sublayer]], float] | None = None,
    candidates: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> RemovalPlan:
    """Choose what to remove. `value_after(removed sublayers)` is needed by `iterative` only."""
    if strategy not in ALL_STRATEGIES:
        raise SurgeryError(f"unknown strategy '{strategy}': use one of {', '.join(ALL_STRATEGIES)}")
    if granularity not in GRANULARITIES:
        raise SurgeryError(f"unknown granularity '{granularity}': use block or sublayer")
    protected_set = set(protected)
    all_units = units_of(layers, granularity)
    decoder = sum(unit_parameters(u) for u in all_units)
    removable = [u for u in all_units if not protected_set & set(u)]

    if target.ids:
        blocked = sorted(set(target.ids) & protected_set)
        if blocked:
            raise SurgeryError(f"{format_sublayers(blocked)} is protected (a cornerstone or --protect): drop it from --remove")
        units = sorted(target.ids)
        return _plan("explicit", granularity, target, units, protected_set, unit_parameters, decoder, [])

    goal_count = _goal_count(target, removable, unit_parameters, decoder, granularity)
    if strategy == "angular":
        chosen_units = _angular_run(all_units, removable, analysis, target, unit_parameters, decoder, goal_count)
        order = chosen_units
    elif strategy == "iterative":
        if value_after is None:
            raise SurgeryError("the iterative strategy needs a value function")
        chosen_units, order = _iterative(removable, target, unit_parameters, decoder, goal_count, value_after, candidates, progress)
    else:
        order = STRATEGIES[strategy](removable, analysis=analysis or {}, seed=seed)
        if goal_count is not None and goal_count > len(order):
            raise SurgeryError(f"--remove {goal_count} asks for more {granularity}s than are removable: {len(order)} are "
                               f"(the {strategy} strategy never takes protected units{' or the final block' if strategy == 'last' else ''})")
        sizes = [unit_parameters(u) for u in order]
        if goal_count is None and sum(sizes) < target.fraction * decoder * 0.999:
            raise SurgeryError(f"--remove {100 * target.fraction:g}% cannot be met: the {strategy} strategy can take at most "
                               f"{100 * sum(sizes) / decoder:.1f}% of decoder parameters here"
                               f"{' (never the final block)' if strategy == 'last' else ''}; lower the target")
        take = goal_count if goal_count is not None else _closest_prefix(sizes, target.fraction * decoder)
        chosen_units = order[:take]
    units = sorted(s for u in chosen_units for s in u)
    if len(full_blocks(units)) >= layers:
        raise SurgeryError("that removes every block: choose a smaller target")
    return _plan(strategy, granularity, target, units, protected_set, unit_parameters, decoder, [unit_name(u) for u in order])


def _goal_count(target: Target, removable: list[Unit], unit_parameters: Callable[[Unit], int], decoder: int,
                granularity: str) -> int | None:
    """The number of units a count target asks for (None for a fraction), checked against what is removable."""
    if target.count is not None:
        if target.count > len(removable):
            raise SurgeryError(f"--remove {target.count} asks for more {granularity}s than are removable: "
                               f"{len(removable)} are (the rest are protected or would empty the model)")
        return target.count
    reachable = sum(unit_parameters(u) for u in removable)
    if reachable < target.fraction * decoder * 0.999:
        raise SurgeryError(f"--remove {100 * target.fraction:g}% cannot be met: only {100 * reachable / decoder:.1f}% of decoder "
                           f"parameters are removable ({len(removable)} {granularity}s; the rest are protected)")
    return None


def _plan(strategy: str, granularity: str, target: Target, units: list[Sublayer], protected: set[Sublayer],
          unit_parameters: Callable[[Unit], int], decoder: int, order: list[str]) -> RemovalPlan:
    removed = sum(unit_parameters((s,)) for s in units)
    return RemovalPlan(strategy, granularity, target.describe(), units, sorted(protected), removed, decoder, order)


def _angular_run(all_units: list[Unit], removable: list[Unit], analysis: dict[str, Any] | None, target: Target,
                 unit_parameters: Callable[[Unit], int], decoder: int, goal_count: int | None) -> list[Unit]:
    """Gromov et al.: the contiguous run of n units whose input and output streams are the most similar."""
    if not analysis or "angular" not in analysis:
        raise SurgeryError("the angular strategy needs an analysis with --method angular")
    if len(all_units[0]) != 2:
        raise SurgeryError("the angular strategy removes whole blocks (Gromov et al.): use --granularity block")
    distances = analysis["angular"]["distances"]
    size = goal_count if goal_count is not None else _closest_prefix([unit_parameters(u) for u in all_units], target.fraction * decoder)
    allowed = {u[0].layer for u in removable}
    runs = [(distances[size - 1][start], start) for start in range(len(all_units) - size + 1)
            if all(layer in allowed for layer in range(start, start + size))]
    if not runs:
        raise SurgeryError(f"no run of {size} consecutive blocks avoids the protected ones: lower the target or protect less")
    _, start = min(runs)
    return all_units[start:start + size]


def _iterative(removable: list[Unit], target: Target, unit_parameters: Callable[[Unit], int], decoder: int,
               goal_count: int | None, value_after: Callable[[list[Sublayer]], float], candidates: int,
               progress: Callable[[int, int], None] | None) -> tuple[list[Unit], list[Unit]]:
    """Remove one unit at a time: each step re-scores the remaining units on the model with the
    earlier removals applied and takes the one whose removal keeps the value highest. Only the
    `candidates` best units of the previous step are re-scored (all of them at the first step)."""
    chosen: list[Unit] = []
    remaining = list(removable)
    scores: dict[Unit, float] = {}
    goal = None if goal_count is not None else target.fraction * decoder
    removed_parameters = 0
    step = 0
    while remaining:
        if goal_count is not None and len(chosen) >= goal_count:
            break
        pool = remaining if not scores else sorted(remaining, key=lambda u: -scores[u])[:candidates]
        base = [s for u in chosen for s in u]
        for unit in pool:
            scores[unit] = value_after(base + list(unit))
        best = max(pool, key=lambda u: (scores[u], -u[0].position))
        if goal is not None:
            size = unit_parameters(best)
            if abs(removed_parameters + size - goal) > abs(removed_parameters - goal):
                break
            removed_parameters += size
        chosen.append(best)
        remaining.remove(best)
        step += 1
        if progress:
            progress(step, goal_count or 0)
    return chosen, chosen + sorted(remaining, key=lambda u: -scores.get(u, float("-inf")))
