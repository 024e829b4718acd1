"""`surgery analyze`: score every sublayer (Shapley, ablation, angular distance, Block Influence)
and find the cornerstones. The scorers live in surgery.scoring; this module runs them, keeps
every evaluated coalition on disk as it finishes (so a run resumes), and writes the result.

Results are keyed by what determines a coalition's value (model fingerprint, calibration tokens
or task, metric), not by estimator settings: a later run with more permutations or a larger
--max-removed reuses every value already computed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.sublayers import Sublayer, all_sublayers

ANALYSIS_SCHEMA = "surgery-analysis"
ANALYSIS_VERSION = 1
METHODS = ("shapley", "ablation", "angular", "bi")
ESTIMATORS = ("neighbourhood", "permutation", "exact")
EVALUATIONS_FILE = "evaluations.jsonl"
ANALYSIS_FILE = "analysis.json"


@dataclass
class AnalysisSettings:
    """Everything that shapes an analysis; stored in analysis.json."""

    methods: tuple[str, ...] = METHODS
    metric: str = "loss"  # "loss": -mean token loss on calibration text; "acc": task accuracy
    task: str | None = None
    limit: int | None = None
    calibration: str = "c4"
    samples: int = 8
    seq_len: int = 256
    batch_size: int = 8
    estimator: str = "neighbourhood"
    max_removed: int = 4
    permutations: int = 16
    seed: int = 0
    budget_evaluations: int | None = None
    budget_seconds: float | None = None
    prefix_cache: bool = True
    coalition_batch: int = 0  # coalitions run together; 0: 4 on a GPU, 1 on a CPU (where it is slower)
    data_dir: Path | None = None
    text_field: str | None = None
    collapse_fraction: float = 0.25  # loss metric: ablation alone goes this far towards a uniform guess
    share_factor: float = 5.0  # Shapley share this many times the mean share

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SurgeryError(f"unknown method '{unknown[0]}': use one or more of {', '.join(METHODS)}")
        if self.metric not in ("loss", "acc"):
            raise SurgeryError(f"unknown metric '{self.metric}': use loss or acc")
        if self.metric == "acc" and not self.task:
            raise SurgeryError("--metric acc needs --task NAME (an lm-eval task, e.g. arc_easy)")
        if self.estimator not in ESTIMATORS:
            raise SurgeryError(f"unknown estimator '{self.estimator}': use one of {', '.join(ESTIMATORS)}")
        if self.max_removed < 1:
            raise SurgeryError("--max-removed must be at least 1")
        if not self.collapse_fraction > 0 or not self.share_factor > 0:
            raise SurgeryError("--collapse-fraction and --share-factor must be above 0 (at 0 every sublayer would be a cornerstone)")

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["data_dir"] = str(self.data_dir) if self.data_dir else None
        data["methods"] = list(self.methods)
        return data


# ------------------------------------------------------------------ value functions


class TaskAccuracy:
    """v(S) = accuracy on an lm-eval task with the removed sublayers ablated (no prefix cache:
    lm-eval drives the forward passes)."""

    def __init__(self, model: Any, tokenizer: Any, settings: AnalysisSettings, bar: Any) -> None:
        from surgery.evaluate import EvalSettings, TaskSuite

        self.model, self.tokenizer, self.bar = model, tokenizer, bar
        self.suite = TaskSuite(EvalSettings(tasks=(settings.task,), limit=settings.limit, perplexity=(), speed=False,
                                            data_dir=settings.data_dir, seed=settings.seed, batch_size=settings.batch_size))
        self.task = settings.task
        self.evaluations, self.seconds = 0, 0.0
        self._values: dict[frozenset[int], float] = {}
        self.details: dict[frozenset[int], dict[str, Any]] = {}
        self.value(frozenset())

    @property
    def full_value(self) -> float:
        return self._values[frozenset()]

    def known(self, removed: Iterable[int]) -> float | None:
        return self._values.get(frozenset(removed))

    def remember(self, removed: Iterable[int], value: float, detail: dict[str, Any] | None = None) -> None:
        self._values[frozenset(removed)] = value
        if detail:
            self.details[frozenset(removed)] = detail

    def values(self, coalitions: list[frozenset[int]], batch: int = 1) -> list[float]:
        return [self.value(c) for c in coalitions]  # lm-eval drives the passes: nothing to batch

    def value(self, removed: Iterable[int]) -> float:
        from surgery.ablation import ablated

        key = frozenset(removed)
        if key not in self._values:
            start = time.perf_counter()
            with ablated(self.model, [Sublayer.at(p) for p in key]):
                entry = self.suite.run(self.model, self.tokenizer, self.bar)[self.task]
            self.seconds += time.perf_counter() - start
            self.evaluations += 1 if key else 0
            self.details[key] = {k: entry[k] for k in ("acc", "acc_stderr", "chance", "n") if k in entry}
            self._values[key] = entry["acc"]
        return self._values[key]


# ------------------------------------------------------------------ the evaluation store


class EvaluationStore:
    """Each evaluated coalition appended to DIR/evaluations.jsonl as soon as it is known."""

    def __init__(self, folder: Path, key: str, header: dict[str, Any], *, force: bool) -> None:
        self.path = folder / EVALUATIONS_FILE
        self.records: list[dict[str, Any]] = []
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not force:
            lines = self.path.read_text().splitlines()
            first = json.loads(lines[0]) if lines else {}
            if first.get("key") != key:
                raise SurgeryError(
                    f"{folder} holds an analysis of another model, data or metric: choose another --out or pass --force to start over"
                )
            for line in lines[1:]:
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    break  # a line cut short by an interruption: recompute from there
        else:
            self.path.write_text(json.dumps({"key": key, **header}) + "\n")
            (folder / ANALYSIS_FILE).unlink(missing_ok=True)

    def add(self, removed: frozenset[int], value: float, detail: dict[str, Any] | None = None) -> None:
        record = {"removed": sorted(removed), "value": value, **({"detail": detail} if detail else {})}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)


# ------------------------------------------------------------------ running


def coalitions_to_evaluate(settings: AnalysisSettings, players: int) -> Iterator[frozenset[int]]:
    """In the order they are evaluated: single-sublayer ablations first, so a run cut short by a
    budget still has the ablation scores."""
    from itertools import combinations

    from surgery.scoring.shapley import neighbourhood_windows, permutation_coalitions

    seen: set[frozenset[int]] = set()

    def fresh(items: Iterable[frozenset[int]]) -> Iterator[frozenset[int]]:
        for item in items:
            if item not in seen:
                seen.add(item)
                yield item

    yield from fresh(frozenset({p}) for p in range(players))
    if "ablation" in settings.methods:  # whole blocks too, for block-granularity pruning
        yield from fresh(frozenset({p, p + 1}) for p in range(0, players, 2))
    if "shapley" in settings.methods:
        if settings.estimator == "neighbourhood":
            yield from fresh(neighbourhood_windows(players, settings.max_removed))
        elif settings.estimator == "permutation":
            yield from fresh(permutation_coalitions(players, settings.permutations, settings.max_removed, settings.seed))
        else:
            yield from fresh(frozenset(c) for size in range(players + 1) for c in combinations(range(players), size))


def analysis_key(model_fingerprint: str, settings: AnalysisSettings, calibration_digest: str | None) -> str:
    """What a coalition's value depends on; nothing else."""
    basis = {"model": model_fingerprint, "metric": settings.metric}
    if settings.metric == "loss":
        basis["calibration"] = calibration_digest
    else:
        basis |= {"task": settings.task, "limit": settings.limit, "data_dir": str(settings.data_dir), "seed": settings.seed}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def calibration_batches(tokenizer: Any, settings: AnalysisSettings) -> tuple[list[Any], str, str]:
    """The calibration token batches, where they came from, and a digest of the exact tokens."""
    from surgery.data import load_texts, pack_tokens

    texts, origin = load_texts(settings.calibration, role="calibration", data_dir=settings.data_dir, field=settings.text_field)
    ids = pack_tokens(tokenizer, texts, settings.samples, settings.seq_len, origin)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return list(ids.split(settings.batch_size)), origin, digest


def analyze(model: Any, tokenizer: Any, settings: AnalysisSettings, out: Path | None, *, model_info: dict[str, Any],
            force: bool = False, progress: Any = None) -> dict[str, Any]:
    """Run the analysis; returns (and, with `out`, writes) the analysis.json content."""
    import torch

    from surgery.arch import num_layers, unwrap
    from surgery.console import progress_bar
    from surgery.provenance import machine, now, versions
    from surgery.scoring.residual import ResidualLoss

    if tokenizer is None:
        raise SurgeryError("this model has no tokenizer: analyze a folder that holds one (tokenizer.json)")
    dropped = [m for m in saved_methods(out) if m not in settings.methods] if out is not None and not force else []
    if dropped:
        raise SurgeryError(f"{out} holds {', '.join(dropped)} results that this run would drop: add them to --method "
                           "(stored coalitions are not recomputed), or pass --force to replace them")
    base = unwrap(model)
    base.eval()
    layers = num_layers(base)
    players = 2 * layers
    if settings.estimator == "exact" and players > 16:
        raise SurgeryError(f"exact Shapley values need 2^{players} evaluations: use --estimator neighbourhood or permutation")
    started = time.perf_counter()
    cost: dict[str, float] = {}
    with progress_bar(progress) as bar, torch.no_grad():
        needs_states = settings.metric == "loss" or {"angular", "bi"} & set(settings.methods)
        batches, origin, digest = calibration_batches(tokenizer, settings) if needs_states else ([], None, None)
        task = bar.add_task("caching the residual stream", total=None)
        clock = time.perf_counter()
        residual = ResidualLoss(base, batches, prefix_cache=settings.prefix_cache) if needs_states else None
        cost["reference_pass_seconds"] = time.perf_counter() - clock
        bar.remove_task(task)
        value_function = residual if settings.metric == "loss" else TaskAccuracy(base, tokenizer, settings, bar)

        key = analysis_key(model_info.get("fingerprint", "in-memory"), settings, digest)
        store = None
        if out is not None:
            header = {"schema": ANALYSIS_SCHEMA, "model": model_info, "metric": settings.metric, "calibration": origin}
            store = EvaluationStore(Path(out), key, header, force=force)
            for record in store.records:
                value_function.remember(frozenset(record["removed"]), record["value"], record.get("detail"))
        complete, evaluated, total = _evaluate_all(value_function, settings, players, store, bar)
        cost["evaluation_seconds"] = value_function.seconds
        cost["evaluations"] = value_function.evaluations
        result = _assemble(settings, value_function, residual, players, complete, evaluated, total)
    cost["total_seconds"] = time.perf_counter() - started
    result = {
        "schema": ANALYSIS_SCHEMA, "version": ANALYSIS_VERSION, "created": now(), "key": key,
        "model": {**model_info, "layers": layers, "players": players},
        "settings": settings.describe(),
        "calibration": {"source": origin, "tokens": residual.tokens if residual else None, "digest": digest},
        **result,
        "cost": cost, "versions": versions(), "machine": machine(),
    }
    if out is not None:
        from surgery.pipeline import write_json

        write_json(Path(out) / ANALYSIS_FILE, result)
    return result


def _evaluate_all(value_function: Any, settings: AnalysisSettings, players: int, store: EvaluationStore | None,
                  bar: Any) -> tuple[bool, int, int]:
    """Evaluate every needed coalition (skipping known ones) until done or out of budget."""
    from surgery.scoring.residual import group_key

    wanted = list(coalitions_to_evaluate(settings, players))
    batch = settings.coalition_batch or _default_coalition_batch(value_function)
    order = wanted
    if batch > 1:  # ablations first, then runs grouped by where they resume, so groups fill batches
        singles = [c for c in wanted if len(c) <= 1]
        rest = sorted((c for c in wanted if len(c) > 1), key=lambda c: (group_key(c)[0], sorted(group_key(c)[1]), min(c)))
        order = singles + rest
    task = bar.add_task(f"{settings.metric} of {len(wanted)} coalitions", total=len(wanted))
    start = time.perf_counter()
    new = done = 0
    position = 0
    while position < len(order):
        chunk = []
        while position < len(order) and len(chunk) < batch:
            if value_function.known(order[position]) is None:
                chunk.append(order[position])
            else:
                done += 1
                bar.advance(task)
            position += 1
        if not chunk:
            continue
        out_of_evaluations = settings.budget_evaluations is not None and new + len(chunk) > settings.budget_evaluations
        out_of_time = settings.budget_seconds is not None and time.perf_counter() - start >= settings.budget_seconds
        if out_of_evaluations or out_of_time:
            bar.remove_task(task)
            return False, done, len(wanted)
        values = value_function.values(chunk, batch)
        for removed, value in zip(chunk, values):
            new += 1
            done += 1
            if store is not None:
                store.add(removed, value, getattr(value_function, "details", {}).get(removed))
            bar.advance(task)
    bar.remove_task(task)
    return True, len(wanted), len(wanted)


def _default_coalition_batch(value_function: Any) -> int:
    base = getattr(value_function, "base", None)
    on_gpu = base is not None and next(base.parameters()).device.type == "cuda"
    return 4 if on_gpu else 1


# ------------------------------------------------------------------ assembling the result


def _lookup(value_function: Any):
    def value(removed: frozenset[int]) -> float:
        known = value_function.known(removed)
        if known is None:
            raise KeyError(removed)
        return known

    return value


def _assemble(settings: AnalysisSettings, value_function: Any, residual: Any, players: int, complete: bool,
              evaluated: int, total: int) -> dict[str, Any]:
    from surgery.scoring.shapley import exact_shapley, neighbourhood_shapley, permutation_shapley

    ids = [str(u) for u in all_sublayers(players // 2)]
    full = value_function.full_value
    value = _lookup(value_function)
    result: dict[str, Any] = {"complete": complete, "coalitions": {"evaluated": evaluated, "wanted": total}, "players": ids}
    baseline: dict[str, Any] = {"value": full}
    if settings.metric == "loss":
        baseline |= {"loss": -full, "uniform_loss": math.log(_vocab(value_function))}
    else:
        baseline |= value_function.details.get(frozenset(), {})
    result["baseline"] = baseline

    if "ablation" in settings.methods or "shapley" in settings.methods:
        ablation = {}
        for position, name in enumerate(ids):
            known = value_function.known(frozenset({position}))
            if known is None:
                continue
            entry = {"drop": full - known, "value": known}
            if settings.metric == "loss":
                entry["loss"] = -known
                # How far towards a uniform guess; undefined for a model no better than one (random
                # weights), whose loss sits at ln V or above it, up to rounding.
                headroom = baseline["uniform_loss"] - baseline["loss"]
                entry["collapse"] = (full - known) / headroom if headroom > 1e-6 * baseline["uniform_loss"] else None
            else:
                detail = value_function.details.get(frozenset({position}), {})
                entry |= {k: detail[k] for k in ("acc_stderr", "chance") if k in detail}
                if "chance" in detail:
                    entry["at_chance"] = known <= detail["chance"] + 2 * detail.get("acc_stderr", 0.0)
            ablation[name] = entry
        result["ablation"] = ablation
        blocks = {}
        for layer in range(players // 2):
            known = value_function.known(frozenset({2 * layer, 2 * layer + 1}))
            if known is not None:
                blocks[f"L{layer}"] = {"drop": full - known, "value": known}
        result["block_ablation"] = blocks

    if "shapley" in settings.methods:
        if settings.estimator == "neighbourhood":
            phi, support = neighbourhood_shapley(players, value, settings.max_removed)
            formula = "phi_i = (1/k) sum_{m=1..k} mean_{runs W, |W|=m, i at an end of W} [v(N \\ (W - i)) - v(N \\ W)]"
        elif settings.estimator == "permutation":
            phi, support = permutation_shapley(players, value, settings.permutations, settings.max_removed, settings.seed)
            formula = "phi_i = mean over sampled removal orders of v(N \\ R_{m-1}) - v(N \\ R_m), i removed at step m <= k"
        else:
            phi, support = exact_shapley(players, value), [2 ** (players - 1)] * players
            formula = "exact Shapley value over all 2^N coalitions"
        phi = [None if math.isnan(p) else p for p in phi]  # None: no evaluated coalition informs it (partial run)
        total_value = sum(p for p in phi if p is not None)
        result["shapley"] = {
            "estimator": settings.estimator, "max_removed": settings.max_removed, "formula": formula,
            "values": dict(zip(ids, phi)),
            "share": {i: (p / total_value if p is not None and total_value else None) for i, p in zip(ids, phi)},
            "support": dict(zip(ids, support)),
        }

    if residual is not None and {"angular", "bi"} & set(settings.methods):
        from surgery.scoring.similarity import angular_distances, best_blocks, block_influence

        states = [[residual.states_at(p)[b] for p in range(players + 1)] for b in range(len(residual.batches))]
        if "angular" in settings.methods:
            distances = angular_distances([s[::2] for s in states])
            result["angular"] = {"distances": distances, "best_block": best_blocks(distances),
                                 "note": "distances[n-1][l] = d(l, n), last token, mean over sequences"}
        if "bi" in settings.methods:
            result["block_influence"] = {
                "blocks": {f"L{i}": v for i, v in enumerate(block_influence(states, 2))},
                "sublayers": dict(zip(ids, block_influence(states, 1))),
            }
    result["cornerstones"] = find_cornerstones(result, settings)
    return result


def _vocab(value_function: Any) -> int:
    return int(value_function.base.config.vocab_size)


def find_cornerstones(result: dict[str, Any], settings: AnalysisSettings) -> list[dict[str, Any]]:
    """The documented rule (docs/analysis.md): a sublayer is a cornerstone when removing it alone
    collapses the model (loss: it goes `collapse_fraction` of the way from the model's loss to a
    uniform guess, ln V; accuracy: it falls to within two standard errors of chance), or when its
    Shapley share is at least `share_factor` times the mean share 1/N."""
    cornerstones = []
    players = result["players"]
    shares = result.get("shapley", {}).get("share", {})
    for name in players:
        reasons = []
        evidence: dict[str, Any] = {}
        ablation = result.get("ablation", {}).get(name)
        if ablation:
            evidence["ablation_drop"] = ablation["drop"]
            if settings.metric == "loss":
                evidence["collapse"] = ablation["collapse"]
                if ablation["collapse"] is not None and ablation["collapse"] >= settings.collapse_fraction:
                    reasons.append(f"removing it alone raises the loss from {result['baseline']['loss']:.2f} to "
                                   f"{ablation['loss']:.2f} nats, {100 * ablation['collapse']:.0f}% of the way to a uniform guess "
                                   f"(rule: {100 * settings.collapse_fraction:.0f}%)")
            elif ablation.get("at_chance"):
                reasons.append(f"removing it alone drops {settings.task} accuracy to {ablation['value']:.3f}, "
                               f"within two standard errors of chance ({ablation.get('chance', float('nan')):.3f})")
        share = shares.get(name)
        if share is not None:
            evidence["shapley_share"] = share
            if share >= settings.share_factor / len(players):
                reasons.append(f"its Shapley share is {100 * share:.1f}%, {share * len(players):.1f}x the mean "
                               f"(rule: {settings.share_factor:g}x)")
        if reasons:
            cornerstones.append({"id": name, "reasons": reasons, "evidence": evidence})
    return cornerstones


def saved_methods(folder: Path) -> list[str]:
    """The methods of the analysis saved in `folder`, if any."""
    try:
        return list(json.loads((Path(folder) / ANALYSIS_FILE).read_text())["settings"]["methods"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def load_analysis(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ANALYSIS_FILE
    if not path.is_file():
        raise SurgeryError(f"{path} not found: run surgery analyze first")
    return json.loads(path.read_text())
