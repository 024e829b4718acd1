"""Block-by-block evaluation: `surgery eval --layerwise` with lm-eval tasks on the synthetic
Llama-shaped checkpoint of bench/out_of_core.py (over 6 GiB in bf16), in a child process, twice on
the same requests: as it runs (lm-eval's requests scored in waves, each reading the checkpoint
once) and with every wave held to one batch of --batch-size requests (the checkpoint read once per
batch, as HFLM batches them). Measured: wall time, peak RSS, the reads of the first block, and
whether the two runs gave the same accuracies.

    python bench/layerwise_eval.py [--work DIR] [--source DIR] [--smoke]

The checkpoint carries surgery's tiny test tokenizer (its token ids are below the vocabulary size)
and random weights: the scores mean nothing, the time and reads are what is measured. Needs about
7 GiB free under --work; everything written is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import ROOT, data_dir, measured_child, protocol
from layerwise_analysis import run_on_synthetic, synthetic_source
from out_of_core import SHAPE

TASKS = ["--tasks", "arc_easy,piqa", "--limit", "4", "--batch-size", "4"]
EVAL = [*TASKS, "--ppl", "none", "--no-speed", "--layerwise", "--device", "cpu"]
# The child: surgery's CLI, counting the first block's reads; "one-batch" holds each wave to one batch.
CHILD = """
import sys
import surgery.evaluate.suite as suite
from surgery.layerwise import LayerwiseModel
if sys.argv.pop(1) == "one-batch":
    suite._wave_bytes = lambda: 1
block, reads = LayerwiseModel.block, []
def counted(self, index, skip_kinds=()):
    if index == 0:
        reads.append(index)
    return block(self, index, skip_kinds)
LayerwiseModel.block = counted
from surgery.cli import main
try:
    main(standalone_mode=False)
finally:
    print("first block read", len(reads), "times")
"""


def run_eval(source: Path, out: Path, waves: str, threads: int) -> dict:
    """`surgery eval` in a child process; returns its measures, the first block's reads and results."""
    command = [sys.executable, "-c", CHILD, waves, "eval", str(source), "--out", str(out), "--data-dir", str(data_dir()), *EVAL]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    measured = measured_child(command, env)
    results = json.loads(out.read_text())
    out.unlink()
    reads = int(measured.pop("output").rsplit("first block read", 1)[1].split()[0])
    return {**measured, "first_block_reads": reads, "tasks": results["tasks"]}


def main() -> None:
    run_on_synthetic("layerwise_eval", measure, hidden=("protocol", "runs"))


def measure(work: Path, args: argparse.Namespace) -> dict:
    source = synthetic_source(work, args)
    runs = {waves: run_eval(source, work / f"{waves}.json", waves, args.threads) for waves in ("waves", "one-batch")}
    for waves, run in runs.items():
        print(f"{waves}: {run['seconds']:.0f} s, first block read {run['first_block_reads']} times, "
              f"peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB")
    scores = {waves: {name: (entry["acc"], entry["acc_norm"]) for name, entry in run["tasks"].items()} for waves, run in runs.items()}
    return {"shape": SHAPE, "dtype": "bfloat16", "eval": EVAL,
            "source_bytes": sum(p.stat().st_size for p in source.glob("*.safetensors")),
            "seconds": {w: r["seconds"] for w, r in runs.items()},
            "peak_rss_bytes": {w: r["peak_rss_bytes"] for w, r in runs.items()},
            "first_block_reads": {w: r["first_block_reads"] for w, r in runs.items()},
            "speedup": runs["one-batch"]["seconds"] / runs["waves"]["seconds"],
            "same_scores": scores["waves"] == scores["one-batch"],
            "runs": {w: r["tasks"] for w, r in runs.items()},
            "threads": args.threads, "protocol": protocol()}


if __name__ == "__main__":
    main()
