"""The statistics behind the published verdicts, in one place, tested against hand-computed values
(tests/test_bench_stats.py): accuracy above chance normalised by the dense model's margin, paired
differences over shared items, the log-ratio standard error of two perplexities, and the joins
of results scored in several parts."""

from __future__ import annotations

import math


def above_chance_tasks(wide: dict) -> list[str]:
    """Tasks where the dense model's accuracy is more than three standard errors above chance,
    measured on the wide dense evaluation (more items than the per-strategy ones)."""
    return [task for task, entry in wide["tasks"].items() if entry["acc"] - entry["chance"] > 3 * entry["acc_stderr"]]


def normalised(results: dict, dense: dict, tasks: list[str]) -> tuple[float | None, float | None]:
    """Mean over `tasks` of (acc - chance) / (acc_dense - chance), in percent, and its standard error
    from the items (dense margins taken as fixed)."""
    if not tasks:
        return None, None
    values, variances = [], []
    for task in tasks:
        margin = dense["tasks"][task]["acc"] - dense["tasks"][task]["chance"]
        items = results["tasks"][task]["items"]
        acc = sum(items) / len(items)
        values.append((acc - dense["tasks"][task]["chance"]) / margin)
        variances.append(acc * (1 - acc) / (len(items) - 1) / margin**2)
    mean = sum(values) / len(values)
    return 100 * mean, 100 * math.sqrt(sum(variances)) / len(values)


def paired_difference(a: dict, b: dict, dense: dict, tasks: list[str]) -> tuple[float, float]:
    """Normalised score of a minus b, in points, with the standard error of the paired item differences."""
    diffs, variances = [], []
    for task in tasks:
        margin = dense["tasks"][task]["acc"] - dense["tasks"][task]["chance"]
        x, y = a["tasks"][task]["items"], b["tasks"][task]["items"]
        d = [(p - q) / margin for p, q in zip(x, y)]
        mean = sum(d) / len(d)
        diffs.append(mean)
        variances.append(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    return 100 * sum(diffs) / len(diffs), 100 * math.sqrt(sum(variances)) / len(diffs)


def shared_items(a: dict, b: dict) -> tuple[dict, dict]:
    """Two results cut to the items both scored (one may have been scored on more)."""
    a, b = {**a, "tasks": dict(a["tasks"])}, {**b, "tasks": dict(b["tasks"])}
    for task in a["tasks"]:
        n = min(a["tasks"][task]["n"], b["tasks"][task]["n"])
        a["tasks"][task], b["tasks"][task] = (first_items(r["tasks"][task], n) for r in (a, b))
    return a, b


def first_items(entry: dict, n: int) -> dict:
    items = entry["items"][:n]
    return {**entry, "items": items, "n": n, "acc": sum(items) / n}


def join_parts(parts: list[dict]) -> dict:
    first = parts[0]
    for part in parts[1:]:
        same = part["perplexity"]["wikitext2"]["perplexity"] / first["perplexity"]["wikitext2"]["perplexity"]
        if abs(same - 1) > 1e-6:
            raise SystemExit(f"a --goal continuation scored a different model (WikiText-2 {same:.6f} x the first run's): rerun it")
    tasks = {}
    for task in first["tasks"]:
        items = [v for part in parts for v in part["tasks"][task]["items"]]
        tasks[task] = first_items({**first["tasks"][task], "items": items}, len(items))
    return {**first, "tasks": tasks}


def log_ratio_stderr(a: dict, b: dict) -> float:
    """Standard error of log(ppl_a / ppl_b): paired over the windows both models read when both
    results list them, else the two window-spread errors combined as if independent (wider)."""
    x, y = a.get("window_nll"), b.get("window_nll")
    if x and y and len(x) == len(y) > 1:
        d = [p - q for p, q in zip(x, y)]
        mean = sum(d) / len(d)
        return math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    return math.hypot(a["nll_stderr"], b["nll_stderr"])
