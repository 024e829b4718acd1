"""Layer-by-layer analysis: `surgery analyze --layerwise --method ablation,bi` on the synthetic
Llama-shaped checkpoint of bench/out_of_core.py (over 6 GiB in bf16) with 2 x 128 calibration
tokens, in a child process; and, on the same shape at a few MiB (what fits in memory), the same
command layer by layer against in memory.

    python bench/layerwise_analysis.py [--work DIR] [--source DIR]

Target (issue 16): the analysis' peak RSS under 3 GiB (os.wait4's ru_maxrss of the child, file-mapped
pages included); its time is reported. The small model's analyses must agree (largest difference of
any ablation value or Block Influence score, recorded). The checkpoint carries surgery's tiny test
tokenizer: calibration only needs token ids below the vocabulary size. Needs about 7 GiB free under
--work; everything written is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import ROOT, data_dir, measured_child, protocol, save
from out_of_core import SHAPE, SMALL, prepare, synthetic_parser, write_checkpoint

RSS_TARGET = 3 * 2**30
NEEDS_FREE = 7 << 30
ANALYSIS = ["--method", "ablation,bi", "--samples", "2", "--seq-len", "128", "--batch-size", "2", "--device", "cpu"]


def with_tokenizer(folder: Path) -> Path:
    from surgery.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    return folder


def run_analysis(source: Path, out: Path, mode: str, threads: int) -> dict:
    """`surgery analyze` in a child process; returns its measures and the analysis it wrote."""
    command = [sys.executable, "-m", "surgery", "analyze", str(source), "--out", str(out), mode, "--data-dir", str(data_dir()),
               *ANALYSIS]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    measured = measured_child(command, env)
    analysis = json.loads((out / "analysis.json").read_text())
    shutil.rmtree(out)
    measured.pop("output")
    shown = " ".join(["surgery", *command[3:]]).replace(f"{source.parent}/", "").replace(str(data_dir()), "DATA")
    return {"command": shown, **measured, "analysis": analysis}


def scores(analysis: dict) -> dict[str, float]:
    """Every ablation value and Block Influence score of an analysis, by name."""
    ablation, bi = analysis["sections"]["ablation"], analysis["sections"]["bi"]
    found = {f"ablation {k}": entry["value"] for k, entry in {**ablation["sublayers"], **ablation["blocks"]}.items()}
    return found | {f"bi {k}": v for k, v in {**bi["blocks"], **bi["sublayers"]}.items()}


def main() -> None:
    run_on_synthetic("layerwise_analysis", measure, hidden=("protocol", "large"))


def run_on_synthetic(name: str, measure: Callable[[Path, argparse.Namespace], dict], hidden: tuple[str, ...]) -> None:
    """A benchmark on the synthetic checkpoint: options, a work folder removed at the end, the
    result printed (less `hidden`) and saved as bench/results/NAME.json (not with --smoke)."""
    args = synthetic_parser().parse_args()
    prepare(args, 0 if args.source else NEEDS_FREE)
    work = Path(tempfile.mkdtemp(prefix=f"surgery-{name}-", dir=args.work))
    try:
        result = measure(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in hidden}, indent=1))
    if not args.smoke:
        save(name, result)


def synthetic_source(work: Path, args: argparse.Namespace) -> Path:
    """--source, or the synthetic checkpoint written under `work`; with surgery's tiny tokenizer."""
    source = args.source
    if source is None:
        source = work / "source"
        start = time.perf_counter()
        write_checkpoint(source, SHAPE)
        print(f"wrote a checkpoint in {time.perf_counter() - start:.0f} s")
    if not (source / "tokenizer.json").exists():
        with_tokenizer(source)
    return source


def measure(work: Path, args: argparse.Namespace) -> dict:
    source = synthetic_source(work, args)
    large = run_analysis(source, work / "large", "--layerwise", args.threads)
    print(f"layer by layer: {large['seconds']:.0f} s, peak RSS {large['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(target {RSS_TARGET / 2**30:.0f} GiB)")
    small = with_tokenizer(work / "small")
    write_checkpoint(small, SMALL)
    parts = run_analysis(small, work / "parts", "--layerwise", args.threads)
    whole = run_analysis(small, work / "whole", "--no-layerwise", args.threads)
    a, b = scores(parts["analysis"]), scores(whole["analysis"])
    if set(a) != set(b) or not a:
        sys.exit(f"the two analyses score different things: {sorted(set(a) ^ set(b))}")
    difference = max(abs(a[k] - b[k]) for k in a)
    print(f"small model: largest difference layer by layer vs in memory {difference:.2e} over {len(a)} scores")
    return {"shape": SHAPE, "dtype": "bfloat16", "analysis": ANALYSIS,
            "source_bytes": sum(p.stat().st_size for p in source.glob("*.safetensors")),
            "seconds": large["seconds"], "peak_rss_bytes": large["peak_rss_bytes"],
            "peak_rss_anon_sampled_bytes": large["peak_rss_anon_sampled_bytes"],
            "peak_rss_file_sampled_bytes": large["peak_rss_file_sampled_bytes"],
            "rss_target_bytes": RSS_TARGET, "rss_met": large["peak_rss_bytes"] < RSS_TARGET,
            "evaluations": large["analysis"]["cost"].get("evaluations"), "cost": large["analysis"]["cost"],
            "baseline_loss": large["analysis"]["baseline"].get("loss"),
            "small_model": {"shape": SMALL, "scores": len(a), "max_abs_difference": difference,
                            "seconds": {"layerwise": parts["seconds"], "in_memory": whole["seconds"]},
                            "peak_rss_bytes": {"layerwise": parts["peak_rss_bytes"], "in_memory": whole["peak_rss_bytes"]}},
            "threads": args.threads, "command": large["command"], "protocol": protocol()}


if __name__ == "__main__":
    main()
