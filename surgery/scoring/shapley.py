"""Shapley values of sublayers: exact, truncated permutation sampling, truncated neighbourhood sampling.

Every estimator takes `n` players and `value(removed) -> float`, the value of the coalition made
of all players except `removed` (a frozenset of positions), and asks for as few values as it can.
Coalitions are described by what is removed because a pruned LLM is always "almost everything".

Exact (n up to about 12):
    phi_i = sum over S not containing i of |S|! (n-|S|-1)! / n! * (v(S + i) - v(S)).

Truncated value (what both samplers estimate). With k = max_removed,
    phi^k_i = (1/k) * sum_{m=1..k} E[ v(N \\ R + i) - v(N \\ R) | |R| = m, i in R ]
the mean marginal contribution of i over the k largest coalition sizes, each size weighted
equally as in the Shapley formula. With k = n it is the Shapley value.

Permutation sampling: a random removal order; the m-th player removed (m <= k) contributes
v(N \\ R_{m-1}) - v(N \\ R_m). In a uniform order, the set removed with i at step m is a uniform
m-set containing i, so the mean of i's contributions estimates phi^k_i.

Neighbourhood sampling (Zhang, Dong and Kawaguchi 2024): only contiguous runs W of players are
removed (1 <= |W| <= k), so with N players it needs 1 + sum_{m=1..k} (N - m + 1) values, about
(N + N_min)(N - N_min)/2 with N_min = N - k, instead of 2^N. Player i gets a contribution from every
run with i at one of its ends, v(N \\ (W - i)) - v(N \\ W) (both coalitions are runs), and
    phi^nb_i = (1/k) * sum_{m=1..k} mean over runs W of length m with i at an end of W of those contributions.
It assumes interactions are local (neighbouring sublayers); docs/analysis.md says when that fails.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator

Value = Callable[[frozenset[int]], float]


def exact_shapley(n: int, value: Value) -> list[float]:
    """Exact Shapley values by enumerating all 2^n coalitions."""
    if n > 16:
        raise ValueError(f"exact Shapley values need 2^{n} evaluations: use a sampling estimator")
    everyone = frozenset(range(n))
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = [0.0] * n
    for size in range(n):
        for kept in itertools.combinations(range(n), size):
            kept_set = frozenset(kept)
            base = value(everyone - kept_set)
            for i in range(n):
                if i not in kept_set:
                    phi[i] += weights[size] * (value(everyone - kept_set - {i}) - base)
    return phi


def neighbourhood_windows(n: int, max_removed: int) -> Iterator[frozenset[int]]:
    """The coalitions neighbourhood sampling evaluates, shortest runs first (so a partial run
    still has every single-sublayer ablation)."""
    yield frozenset()
    for length in range(1, min(max_removed, n) + 1):
        for start in range(n - length + 1):
            yield frozenset(range(start, start + length))


def neighbourhood_shapley(n: int, value: Value, max_removed: int) -> tuple[list[float], list[int]]:
    """Truncated neighbourhood-sampling estimate; also the number of run lengths each player used."""
    phi, depths = [], []
    for i in range(n):
        per_length = []
        for length in range(1, min(max_removed, n) + 1):
            contributions = []
            for start in {i, i - length + 1}:  # runs with i at their left or right end
                if start >= 0 and start + length <= n:
                    run = frozenset(range(start, start + length))
                    with_i = _known(value, run - {i})
                    without_i = _known(value, run)
                    if with_i is not None and without_i is not None:
                        contributions.append(with_i - without_i)
            if contributions:
                per_length.append(sum(contributions) / len(contributions))
        phi.append(sum(per_length) / len(per_length) if per_length else float("nan"))
        depths.append(len(per_length))
    return phi, depths


def permutation_orders(n: int, permutations: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(n), n) for _ in range(permutations)]


def permutation_coalitions(n: int, permutations: int, max_removed: int, seed: int) -> Iterator[frozenset[int]]:
    """Every coalition the permutation estimator evaluates, in order."""
    yield frozenset()
    for order in permutation_orders(n, permutations, seed):
        for m in range(1, min(max_removed, n) + 1):
            yield frozenset(order[:m])


def permutation_shapley(n: int, value: Value, permutations: int, max_removed: int, seed: int) -> tuple[list[float], list[int]]:
    """Truncated permutation-sampling estimate; also the number of contributions per player."""
    sums, counts = [0.0] * n, [0] * n
    for order in permutation_orders(n, permutations, seed):
        previous = _known(value, frozenset())
        for m in range(1, min(max_removed, n) + 1):
            current = _known(value, frozenset(order[:m]))
            if previous is None or current is None:
                break
            player = order[m - 1]
            sums[player] += previous - current
            counts[player] += 1
            previous = current
    return [s / c if c else float("nan") for s, c in zip(sums, counts)], counts


def _known(value: Value, removed: frozenset[int]) -> float | None:
    """value(removed), or None where a budget-limited value function has no answer."""
    try:
        return value(removed)
    except KeyError:
        return None
