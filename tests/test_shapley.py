"""The Shapley estimators on small games whose answers are known."""

import itertools
import math
import random

import pytest

from surgery.scoring.shapley import (
    exact_shapley,
    neighbourhood_shapley,
    neighbourhood_windows,
    permutation_coalitions,
    permutation_shapley,
)


def game(kept_value):
    """Turn v(kept set) into the estimators' v(removed set) over n players."""

    def make(n):
        everyone = frozenset(range(n))
        calls = []

        def value(removed):
            calls.append(removed)
            return kept_value(everyone - removed)

        return value, calls

    return make


def additive(weights):
    return game(lambda kept: sum(weights[i] for i in kept))


def truncated_target(n, kept_value, k):
    """phi^k_i by brute force: mean over sizes m<=k of the mean contribution over all m-sets containing i."""
    everyone = frozenset(range(n))
    result = []
    for i in range(n):
        per_size = []
        for m in range(1, k + 1):
            contributions = [kept_value(everyone - frozenset(r) | {i}) - kept_value(everyone - frozenset(r))
                             for r in itertools.combinations(range(n), m) if i in r]
            per_size.append(sum(contributions) / len(contributions))
        result.append(sum(per_size) / k)
    return result


def ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0] * len(values)
    for rank, i in enumerate(order):
        out[i] = rank
    return out


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def test_exact_is_exact_on_an_additive_game():
    weights = [0.5, -0.2, 3.0, 1.0, 0.0, 2.5]
    value, _ = additive(weights)(6)
    assert exact_shapley(6, value) == pytest.approx(weights)


def test_exact_is_exact_on_a_majority_game_with_interactions():
    """v = 1 when at least two of players 0, 1, 2 are present; players 3-5 are dummies.
    Shapley: 1/3 each for 0, 1, 2 by symmetry and efficiency, 0 for the dummies."""
    value, _ = game(lambda kept: float(len(kept & {0, 1, 2}) >= 2))(6)
    phi = exact_shapley(6, value)
    assert phi == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0, 0, 0])


def test_exact_satisfies_efficiency_on_a_random_game():
    rng = random.Random(3)
    table = {frozenset(s): rng.random() for r in range(7) for s in itertools.combinations(range(6), r)}
    value, _ = game(lambda kept: table[kept])(6)
    phi = exact_shapley(6, value)
    assert sum(phi) == pytest.approx(table[frozenset(range(6))] - table[frozenset()])


def test_neighbourhood_is_exact_for_additive_games_and_evaluates_only_runs():
    weights = [random.Random(i).uniform(-1, 3) for i in range(20)]
    value, calls = additive(weights)(20)
    for removed in neighbourhood_windows(20, 4):
        value(removed)
    phi, support = neighbourhood_shapley(20, value, 4)
    assert phi == pytest.approx(weights)
    assert all(s == 4 for s in support)
    distinct = set(calls)
    assert len(distinct) == 1 + sum(20 - m + 1 for m in range(1, 5))  # 75 instead of 2^20
    n, n_min = 20, 16
    assert abs(len(distinct) - (n + n_min) * (n - n_min) / 2) <= 4  # the paper's (N + N_min)(N - N_min)/2
    assert all(max(r) - min(r) + 1 == len(r) for r in distinct if r)  # only contiguous runs are removed


def local_interaction_game(n, seed, strength):
    """Additive values plus synergies between neighbours: the setting neighbourhood sampling assumes."""
    rng = random.Random(seed)
    weights = [rng.uniform(0, 1) for _ in range(n)]
    pair = [strength * rng.uniform(-1, 1) for _ in range(n - 1)]

    def kept_value(kept):
        return sum(weights[i] for i in kept) + sum(pair[i] for i in range(n - 1) if i in kept and i + 1 in kept)

    return kept_value


@pytest.mark.parametrize("seed", range(5))
def test_neighbourhood_ranks_players_like_exact_shapley_when_interactions_are_local(seed):
    n = 10
    kept_value = local_interaction_game(n, seed, strength=0.2)
    value, _ = game(kept_value)(n)
    exact = exact_shapley(n, value)
    estimate, _ = neighbourhood_shapley(n, value, 4)
    assert spearman(exact, estimate) > 0.9
    strength = 0.2
    for i, j in itertools.combinations(range(n), 2):  # clear gaps are never inverted
        if abs(exact[i] - exact[j]) > 2 * strength:
            assert (exact[i] > exact[j]) == (estimate[i] > estimate[j]), (i, j)


def test_neighbourhood_misses_redundancy_between_distant_players():
    """Documented failure (docs/analysis.md): v = 1 if player 0 OR player 7 is present. Each is
    worth 1/2, but no run of at most 4 removes both, so the truncated estimate sees 0 for both."""
    n = 8
    value, _ = game(lambda kept: float(bool(kept & {0, 7})))(n)
    assert exact_shapley(n, value)[0] == pytest.approx(0.5)
    estimate, _ = neighbourhood_shapley(n, value, 4)
    assert estimate[0] == pytest.approx(0.0) and estimate[7] == pytest.approx(0.0)


def test_truncated_permutation_sampling_estimates_the_truncated_value():
    n, k = 7, 3
    kept_value = local_interaction_game(n, seed=11, strength=0.8)
    value, _ = game(kept_value)(n)
    target = truncated_target(n, kept_value, k)
    estimate, counts = permutation_shapley(n, value, permutations=3000, max_removed=k, seed=0)
    assert estimate == pytest.approx(target, abs=0.03)
    assert sum(counts) == 3000 * k


def test_untruncated_permutation_sampling_converges_to_exact():
    n = 6
    kept_value = local_interaction_game(n, seed=5, strength=1.0)
    value, _ = game(kept_value)(n)
    estimate, _ = permutation_shapley(n, value, permutations=4000, max_removed=n, seed=1)
    assert estimate == pytest.approx(exact_shapley(n, value), abs=0.03)


def test_permutation_sampling_is_reproducible_and_uses_the_listed_coalitions():
    n = 12
    value, calls = additive(list(range(n)))(n)
    first = permutation_shapley(n, value, permutations=5, max_removed=3, seed=7)
    assert str(first) == str(permutation_shapley(n, value, permutations=5, max_removed=3, seed=7))  # NaN-safe equality
    assert set(calls) == set(permutation_coalitions(n, 5, 3, seed=7))
    assert str(first) != str(permutation_shapley(n, value, permutations=5, max_removed=3, seed=8))


def test_missing_values_give_partial_estimates():
    """A budget-limited run: only single removals known, so only depth 1 contributes."""
    n = 6
    known = {frozenset(): 10.0, **{frozenset({i}): 10.0 - i for i in range(n)}}

    def value(removed):
        return known[removed]  # KeyError for anything not evaluated

    phi, support = neighbourhood_shapley(n, value, 3)
    assert phi == pytest.approx([float(i) for i in range(n)])
    assert support == [1] * n
    assert not any(math.isnan(p) for p in phi)
