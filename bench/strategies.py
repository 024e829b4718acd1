"""Quality at equal budget on the real SmolLM2-135M (CPU): every strategy of `surgery prune`, block
and sublayer granularity, 12.5% and 25% of decoder parameters removed, before and after the same
healing budget, next to the dense model.

    python bench/strategies.py [--workers 2] [--limit 250] [--heal-steps 60]      # resumes where it stopped
    python bench/strategies.py --spread                                             # the noisiest cell, another seed and item slice
    python bench/strategies.py --goal [--goal-limit 2400]                           # the goal's cells, every item
    python bench/strategies.py --goal --goal-offset 500 --goal-limit 2000           # continue an earlier --goal run

Headline quality (docs/results.md): WikiText-2 and C4 perplexity, and accuracy above chance
normalised by the dense model's margin, (acc - chance) / (acc_dense - chance), averaged over the
tasks where the dense model is clearly above chance (margin above three standard errors; chance
is the majority-class rate for BoolQ). Its standard error comes from the per-item results: all
models answer the same items, so differences between strategies are also given with paired
standard errors. Every job writes its own JSON under bench/results/strategies/ as it finishes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from dataclasses import fields
from pathlib import Path

from common import RESULTS, data_dir, protocol, save, setup
from stats import above_chance_tasks, normalised

from surgery.settings import DEFAULT_TASKS, PruneSettings

OUT = RESULTS / "strategies"  # --out changes it (smoke runs)
# Plan strategy plus a linear bridge folded in before the cut (surgery.bridge): `surgery prune`'s
# default method, and angular + bridge, which is ReplaceMe's recipe in closed form.
BRIDGED = ("bi+bridge", "angular+bridge")
FRACTIONS = (0.125, 0.25)
TASKS = DEFAULT_TASKS
PEERS = ("last", "angular", "bi", "random")  # the published rules the default is compared with


def default_strategy() -> tuple[str, str]:
    """`surgery prune`'s default as a grid cell: strategy (+bridge when bridging is on) and granularity."""
    defaults = {f.name: f.default for f in fields(PruneSettings)}
    return defaults["strategy"] + ("+bridge" if defaults["bridge"] else ""), defaults["granularity"]


def configurations() -> list[tuple[str, str, float]]:
    """Every registered strategy at each granularity it works at on SmolLM2, and the bridged cells, at each
    budget. (Not `period`: it removes periods of a layer pattern, which SmolLM2's layers do not follow.)"""
    from surgery.strategies import GRANULARITIES, STRATEGIES

    configs = []
    for fraction in FRACTIONS:
        for granularity in (g for g in GRANULARITIES if g != "period"):
            for name, strategy in STRATEGIES.items():
                if granularity in strategy.granularities:
                    configs.append((name, granularity, fraction))
        configs += [(label, "block", fraction) for label in BRIDGED]
    return configs


def job_name(strategy: str, granularity: str, fraction: float, tag: str = "") -> str:
    return f"{strategy}-{granularity}-{int(round(fraction * 1000)):03d}{tag}"


def settings_from(args: argparse.Namespace, job: dict | None = None, offset: int = 0, limit: int | None = None,
                  tasks: tuple[str, ...] = TASKS) -> PruneSettings:
    """The job as `surgery prune` settings: the benchmark's evaluation and healing, the job's plan."""
    from surgery.settings import AnalysisSettings, EvalSettings, HealSettings, LoadSettings, PerplexityProtocol

    job = job or {}
    strategy, _, method = job.get("strategy", "bi").partition("+")
    evaluation = EvalSettings(tasks=tuple(tasks), limit=limit or args.limit, perplexity=("wikitext2", "c4"), speed=False,
                              keep_items=True, items_offset=offset,
                              perplexity_protocol=PerplexityProtocol(windows=args.ppl_windows))
    healing = HealSettings(steps=args.heal_steps, seq_len=256, batch_size=2, learning_rate=1e-3, lora_r=32, lora_alpha=32,
                           quantize=False, heldout_samples=16, save_steps=10**6, seed=job.get("heal_seed"),
                           distill=args.distill)
    return PruneSettings(model="smollm2-135m", out=OUT / job.get("name", "job"), strategy=strategy,
                         granularity=job.get("granularity", "block"), remove=f"{100 * job.get('fraction', 0.25):g}%",
                         bridge=method == "bridge", iterative_candidates=args.iterative_candidates, heal=True,
                         load=LoadSettings(device="cpu"),
                         analysis=AnalysisSettings(data_dir=data_dir(), seed=args.seed), evaluation=evaluation, healing=healing)


def run_job(job: dict) -> str:
    """One configuration through `surgery prune`'s own stages: choose, bridge, cut, evaluate, heal,
    evaluate; written to OUT/<name>.json (nothing is exported)."""
    setup(job["threads"])
    import shutil

    import torch

    from surgery import prune as stages
    from surgery.analysis import load_analysis
    from surgery.source import resolve

    args = argparse.Namespace(**job["args"])
    _use_out(args)
    settings = settings_from(args, job, job.get("offset", 0), job.get("limit"), job.get("tasks", TASKS))
    start = time.perf_counter()
    loaded = stages.load(settings, resolve(settings.model))
    value_after = None
    if settings.strategy == "iterative":
        value_after = _shared_values(stages.CalibrationValue(loaded, settings), OUT / f"iterative-values-{settings.granularity}.jsonl")
    plan = stages.choose(settings, loaded, load_analysis(OUT / "analysis"), value_after=value_after)
    result = {"job": job["name"], "plan": plan.describe(), "plan_seconds": time.perf_counter() - start}
    if settings.bridge:
        clock = time.perf_counter()
        result["bridge"] = {**stages.bridge(settings, loaded, plan), "seconds": time.perf_counter() - clock}
    stages.cut(loaded, plan)
    if not job.get("healed_only"):
        result["pruned"] = stages.evaluate(settings, "pruned", loaded.model, loaded.tokenizer)
    work = OUT / "work" / job["name"]
    healed = stages.heal(settings, loaded, loaded.model, plan, work)
    result["healing"] = {"loss_before": healed.loss_before, "loss_after": healed.loss_after, "seconds": healed.seconds,
                         "settings": healed.settings}
    result["healed"] = stages.evaluate(settings, "healed", healed.model, loaded.tokenizer)
    result["seconds"] = time.perf_counter() - start
    (OUT / f"{job['name']}.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    del healed
    torch.set_num_threads(job["threads"])
    return job["name"]


def _shared_values(value_after, path: Path):
    """The iterative strategy's value function with its values kept on disk: the 12.5% run walks
    the same greedy path as the 25% run, so it reads instead of recomputing."""
    known: dict[frozenset, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            known[frozenset(record["removed"])] = record["value"]

    def cached(removed) -> float:
        key = frozenset(s.position for s in removed)
        if key not in known:
            known[key] = value_after(removed)
            from surgery.files import append_line

            append_line(path, json.dumps({"removed": sorted(key), "value": known[key]}))
        return known[key]

    return cached


def dense_job(job: dict) -> str:
    setup(job["threads"])
    from surgery import prune as stages
    from surgery.source import resolve

    args = argparse.Namespace(**job["args"])
    _use_out(args)
    settings = settings_from(args, job, job.get("offset", 0), job.get("limit"))
    loaded = stages.load(settings, resolve(settings.model))
    result = {"job": job["name"], "dense": stages.evaluate(settings, "dense", loaded.model, loaded.tokenizer)}
    (OUT / f"{job['name']}.json").write_text(json.dumps(result, indent=1))
    return job["name"]


def ensure_analysis(args: argparse.Namespace) -> None:
    """The scores the analysis-based strategies share: `surgery analyze` defaults, all methods."""
    setup(args.threads)
    from surgery.analysis import analyze
    from surgery.loading import load_model
    from surgery.settings import AnalysisSettings

    folder = OUT / "analysis"
    if (folder / "analysis.json").is_file() and json.loads((folder / "analysis.json").read_text()).get("complete"):
        return
    loaded = load_model("smollm2-135m", device="cpu")
    analyze(loaded.model, loaded.tokenizer, AnalysisSettings(data_dir=data_dir()), folder,
            model_info=loaded.source.describe())


# ------------------------------------------------------------------ aggregation


def dense_margins() -> tuple[dict, list[str], dict]:
    """The reference every normalised score divides by: the dense model's accuracy and chance on
    the tasks where it is clearly above chance, from its wide evaluation. Returns (margins, those
    tasks, the wide evaluation)."""
    wide = json.loads((OUT / "dense-wide.json").read_text())["dense"]
    tasks = above_chance_tasks(wide)
    return {"tasks": {t: {"acc": wide["tasks"][t]["acc"], "chance": wide["tasks"][t]["chance"]} for t in tasks}}, tasks, wide


def aggregate(args: argparse.Namespace) -> dict:
    dense = json.loads((OUT / "dense.json").read_text())["dense"]
    margins, tasks, wide = dense_margins()
    rows = []
    for strategy, granularity, fraction in configurations():
        path = OUT / f"{job_name(strategy, granularity, fraction)}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        row = {"strategy": strategy, "granularity": granularity, "target": fraction,
               "removed_fraction": data["plan"]["fraction_of_decoder_parameters"], "removed": data["plan"]["removed_compact"],
               "heal_loss": [data["healing"]["loss_before"], data["healing"]["loss_after"]], "seconds": data["seconds"],
               "phase_seconds": phase_seconds(data)}
        for stage in ("pruned", "healed"):
            score, stderr = normalised(data[stage], margins, tasks)
            row[stage] = {"normalised_accuracy": score, "normalised_stderr": stderr,
                          "wikitext2_ppl": data[stage]["perplexity"]["wikitext2"]["perplexity"],
                          "c4_ppl": data[stage]["perplexity"]["c4"]["perplexity"],
                          "tasks": {t: {"acc": data[stage]["tasks"][t]["acc"], "stderr": data[stage]["tasks"][t]["acc_stderr"]}
                                    for t in TASKS}}
        rows.append(row)
    dense_score, dense_stderr = normalised(dense, margins, tasks)
    analysis = json.loads((OUT / "analysis" / "analysis.json").read_text())
    summary = {"dense": {"normalised_accuracy": dense_score, "normalised_stderr": dense_stderr,
                         "wikitext2_ppl": dense["perplexity"]["wikitext2"]["perplexity"],
                         "c4_ppl": dense["perplexity"]["c4"]["perplexity"],
                         "tasks": _task_table(dense),
                         "wide_tasks": _task_table(wide)},
               "above_chance_tasks": tasks, "rows": rows, "analysis_seconds": analysis["cost"]["total_seconds"],
               "default": list(default_strategy())}  # the default this grid compared (it changes: docs/protocol.md)
    return summary


def phase_seconds(data: dict) -> dict[str, float]:
    """Where one configuration's time went: choosing, bridging, healing, and the rest (loading
    and the two evaluations, before and after healing)."""
    phases = {"plan": data["plan_seconds"], "bridge": data.get("bridge", {}).get("seconds", 0.0),
              "healing": data["healing"]["seconds"]}
    return {**phases, "evaluation": data["seconds"] - sum(phases.values())}


def _task_table(result: dict) -> dict:
    return {t: {"acc": e["acc"], "stderr": e["acc_stderr"], "chance": e["chance"], "chance_kind": e["chance_kind"], "n": e["n"]}
            for t, e in result["tasks"].items()}


def spread(args: argparse.Namespace) -> None:
    """Rerun the noisiest cell (the 25%-after-healing configuration with the largest standard error
    among the default and the peers' rules) with another healing seed and the next slice of items,
    and say whether its place in the ranking holds."""
    summary = json.loads((RESULTS / "strategies.json").read_text())
    strategy, granularity = default_strategy()
    candidates = [r for r in summary["rows"] if r["target"] == 0.25 and (r["strategy"] in PEERS or
                                                                         (r["strategy"], r["granularity"]) == (strategy, granularity))]
    noisiest = max(candidates, key=lambda r: r["healed"]["normalised_stderr"] or 0)
    name = job_name(noisiest["strategy"], noisiest["granularity"], 0.25, "-spread")
    job = {"threads": args.workers * args.threads, "args": {**vars(args), "out": str(OUT)}, "name": name, "kind": "prune",
           "strategy": noisiest["strategy"], "granularity": noisiest["granularity"], "fraction": 0.25,
           "offset": args.limit, "heal_seed": args.seed + 1}
    if not (OUT / f"{name}.json").is_file():
        run_job(job)
    rerun = json.loads((OUT / f"{name}.json").read_text())
    margins, tasks, _ = dense_margins()
    score, stderr = normalised(rerun["healed"], margins, tasks)
    ppl = rerun["healed"]["perplexity"]["wikitext2"]["perplexity"]
    rows = [r for r in summary["rows"] if r["target"] == 0.25]

    def place(value: float, key, lower_is_better: bool) -> int:
        others = [key(r) for r in rows if r is not noisiest]
        return 1 + sum((v < value) if lower_is_better else (v > value) for v in others)

    ppl_key = lambda r: r["healed"]["wikitext2_ppl"]  # noqa: E731
    acc_key = lambda r: r["healed"]["normalised_accuracy"]  # noqa: E731
    before = (place(ppl_key(noisiest), ppl_key, True), place(acc_key(noisiest), acc_key, False))
    after = (place(ppl, ppl_key, True), place(score, acc_key, False))
    holds = before == after
    statement = (f"The noisiest cell, {noisiest['strategy']} ({noisiest['granularity']}) at 25% after healing "
                 f"(normalised accuracy {acc_key(noisiest):.1f} ± {noisiest['healed']['normalised_stderr']:.1f}, WikiText-2 "
                 f"{ppl_key(noisiest):.2f}), rerun with healing seed {args.seed + 1} and items {args.limit}-{2 * args.limit - 1}: "
                 f"normalised accuracy {score:.1f} ± {stderr:.1f}, WikiText-2 {ppl:.2f}. Its place among the "
                 f"{len(rows)} configurations at 25% is {before[0]} by perplexity and {before[1]} by accuracy in the main run, "
                 f"{after[0]} and {after[1]} in the rerun: the ranking {'holds' if holds else 'does not hold'}.")
    print(statement)
    save("strategies_spread", {"cell": name, "before": before, "after": after, "holds": holds, "statement": statement,
                               "rerun": {"normalised_accuracy": score, "normalised_stderr": stderr, "wikitext2_ppl": ppl},
                               "protocol": protocol()})


def goal_tag(offset: int = 0, distill: float = 0.0) -> str:
    """File tag of a --goal run: `-goal`, `-goal-from500` for the items from 500 on (the same model
    again: the runs are deterministic, and make_results checks it), `-kd1` for distilled healing."""
    return "-goal" + (f"-from{offset}" if offset else "") + (f"-kd{distill:g}" if distill else "")


def goal(args: argparse.Namespace) -> None:
    """The goal's comparison with more items: the default and each peer rule's best cell at 25%,
    rerun exactly (same plan, same healing seed) and scored after healing on the above-chance tasks
    only, with --goal-limit items each, and WikiText-2 with per-window losses for paired errors."""
    summary = json.loads((RESULTS / "strategies.json").read_text())
    rows = [r for r in summary["rows"] if r["target"] == 0.25]
    cells = [default_strategy()]
    for peer in PEERS:
        ran = [r for r in rows if r["strategy"] == peer]
        if ran:
            best = min(ran, key=lambda r: r["healed"]["wikitext2_ppl"])
            cells.append((peer, best["granularity"]))
    _, tasks, _ = dense_margins()
    common = {"threads": args.threads, "args": {**vars(args), "out": str(OUT)}}
    tag = goal_tag(args.goal_offset, args.distill)
    jobs = [{**common, "name": job_name(strategy, granularity, 0.25, tag), "kind": "prune", "strategy": strategy,
             "granularity": granularity, "fraction": 0.25, "tasks": tasks, "limit": args.goal_limit, "healed_only": True,
             "offset": args.goal_offset}
            for strategy, granularity in cells]
    jobs = [job for job in jobs if not (OUT / f"{job['name']}.json").is_file()
            and (not args.only or any(t in job["name"] for t in args.only.split(",")))]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, maxtasksperchild=1) as pool:
        for name in pool.imap_unordered(_dispatch, jobs):
            print(f"done {name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--limit", type=int, default=60, help="items per task for every pruned and healed model")
    parser.add_argument("--wide-limit", type=int, default=500, help="items per task for the dense model's margins")
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--heal-steps", type=int, default=32)
    parser.add_argument("--distill", type=float, default=0.0, help="healing's weight of the KL to the dense model (surgery.heal)")
    parser.add_argument("--iterative-candidates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", action="store_true", help="rerun the noisiest cell with another seed and item slice")
    parser.add_argument("--goal", action="store_true", help="the goal's cells again, healed only, with --goal-limit items")
    parser.add_argument("--goal-limit", type=int, default=2400,
                        help="items per above-chance task in --goal (2400: all of PIQA's and ARC-Easy's)")
    parser.add_argument("--goal-offset", type=int, default=0,
                        help="--goal from this item on (clipped to each task's size): adds items to an earlier --goal run")
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--only", default=None, help="run only jobs whose name contains one of these comma-separated texts")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/strategies)")
    args = parser.parse_args()
    global OUT
    if args.out:
        OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    if args.spread:
        spread(args)
        return
    if args.goal:
        goal(args)
        return
    started = time.perf_counter()
    common = {"threads": args.threads, "args": {**vars(args), "out": str(OUT)}}
    if not args.aggregate_only:
        ensure_analysis(argparse.Namespace(threads=args.workers * args.threads))
        jobs = []
        if not (OUT / "dense.json").is_file():
            jobs.append({**common, "name": "dense", "kind": "dense"})
        if not (OUT / "dense-wide.json").is_file():
            jobs.append({**common, "name": "dense-wide", "kind": "dense", "limit": args.wide_limit})
        for strategy, granularity, fraction in configurations():
            name = job_name(strategy, granularity, fraction)
            if not (OUT / f"{name}.json").is_file() and (not args.only or any(t in name for t in args.only.split(","))):
                jobs.append({**common, "name": name, "kind": "prune", "strategy": strategy, "granularity": granularity,
                             "fraction": fraction})
        # the 25% cells first (the goal's comparison), iterative at 25% leading (slowest; its values
        # serve the 12.5% runs, which go last), so a stopped run has the headline cells
        def order(job: dict) -> tuple:
            if job["kind"] == "dense":
                return (1, 0)
            iterative = job["strategy"] == "iterative"
            if job["fraction"] == 0.25:
                return (0 if iterative else 2, 0)
            return (3, iterative)

        jobs.sort(key=order)
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.workers, maxtasksperchild=1) as pool:
            for name in pool.imap_unordered(_dispatch, jobs):
                print(f"[{time.perf_counter() - started:6.0f}s] done {name}", flush=True)
    summary = aggregate(args)
    summary["protocol"] = protocol(limit=args.limit, ppl_windows=args.ppl_windows, heal_steps=args.heal_steps,
                                   workers=args.workers, threads_per_worker=args.threads, seed=args.seed,
                                   iterative_candidates=args.iterative_candidates, seconds=time.perf_counter() - started)
    save("strategies", summary)


def _use_out(args: argparse.Namespace) -> None:
    """Worker processes start fresh: take the results folder from the job."""
    global OUT
    OUT = Path(args.out)


def _dispatch(job: dict) -> str:
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    return dense_job(job) if job["kind"] == "dense" else run_job(job)


if __name__ == "__main__":
    main()
