"""The seeds' findings, reproduced on SmolLM2-135M (CPU).

    python bench/findings.py [--limit 200]

1. Cornerstones (Zhang et al. 2024): which sublayers `surgery analyze` calls cornerstones, and
   whether removing one alone collapses task accuracy to chance while removing any other costs
   little. Every cornerstone and a fixed sample of other sublayers (evenly spaced) are ablated and
   scored on ARC-Easy and PIQA, the tasks where the dense model is clearly above chance.
2. Angular distance (Gromov et al. 2024): for which block sizes the most similar run of blocks
   lies in the deeper half of the network.
The analysis is the one bench/strategies.py uses (the `surgery analyze` defaults); the command
that reproduces it is recorded.
"""

from __future__ import annotations

import argparse

from common import RESULTS, data_dir, protocol, save, setup

ANALYSIS = RESULTS / "strategies" / "analysis"
TASKS = ("arc_easy", "piqa")
COMMAND = "surgery analyze smollm2-135m --out runs/smollm2-analysis --data-dir ../shared/datasets"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--others", type=int, default=8, help="non-cornerstone sublayers to ablate for comparison")
    args = parser.parse_args()
    threads = setup(args.threads)

    from surgery.ablation import ablated
    from surgery.analysis import analyze, load_analysis
    from surgery.console import progress_bar
    from surgery.evaluate.suite import TaskSuite
    from surgery.loading import load_model
    from surgery.settings import AnalysisSettings, EvalSettings
    from surgery.sublayers import parse_sublayers

    loaded = load_model("smollm2-135m", device="cpu")
    path = ANALYSIS / "analysis.json"
    analysis = load_analysis(ANALYSIS) if path.is_file() else analyze(
        loaded.model, loaded.tokenizer, AnalysisSettings(data_dir=data_dir()), ANALYSIS, model_info=loaded.source.describe())
    cornerstones = [c["id"] for c in analysis.cornerstones]
    others = [p for p in analysis.players if p not in cornerstones]
    step = max(1, len(others) // args.others)
    sample = others[step // 2::step][: args.others]

    suite = TaskSuite(EvalSettings(tasks=TASKS, limit=args.limit, perplexity=(), speed=False, data_dir=data_dir()))
    rows = {}
    ablation, shares = analysis.section("ablation").sublayers, analysis.section("shapley").share
    with progress_bar():
        dense = suite.run(loaded.model, loaded.tokenizer)
        for name in [*cornerstones, *sample]:
            with ablated(loaded.model, parse_sublayers(name)):
                scores = suite.run(loaded.model, loaded.tokenizer)
            row = {"cornerstone": name in cornerstones, "ablation_loss_increase": ablation[name]["drop"],
                   "collapse_fraction": ablation[name].get("collapse"), "shapley_share": shares[name]}
            for task in TASKS:
                entry, base = scores[task], dense[task]
                row[task] = {"acc": entry["acc"], "stderr": entry["acc_stderr"], "chance": entry["chance"],
                             "drop": base["acc"] - entry["acc"],
                             "relative_drop": (base["acc"] - entry["acc"]) / base["acc"],
                             "at_chance": entry["acc"] <= entry["chance"] + 2 * entry["acc_stderr"]}
            rows[name] = row
            print(name, {t: round(row[t]["acc"], 3) for t in TASKS})

    layers = analysis.model["layers"]
    best = analysis.section("angular").best_block
    deep = [int(n) for n, b in best.items() if b["start"] >= layers / 2]
    result = {
        "analysis_command": COMMAND, "analysis_key": analysis.key, "cornerstones": analysis.cornerstones,
        "cornerstones_in_first_quarter": all(int(c.split(".")[0][1:]) < layers / 4 for c in cornerstones),
        "dense": {t: {"acc": dense[t]["acc"], "stderr": dense[t]["acc_stderr"], "chance": dense[t]["chance"], "n": dense[t]["n"]}
                  for t in TASKS},
        "ablations": rows,
        "angular": {"best_block": best, "sizes_with_deep_best_run": deep, "layers": layers},
        "limit": args.limit, "threads": threads, "protocol": protocol(),
    }
    save("findings", result)


if __name__ == "__main__":
    main()
