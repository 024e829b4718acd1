"""Scoring on several processes: `surgery analyze smollm2-135m --method ablation` as one process with
one thread against torchrun's two processes with one thread each, on the same machine in the same
run, back to back; the values must be identical and the speed-up is the ratio of wall times.

    python bench/several_processes.py [--method ablation]

Writes bench/results/several_processes.json. Each command is timed as a user runs it (imports, loading,
the reference pass each process makes, scoring, writing), and its analysis' own clock is recorded
beside it (the scoring alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import data_dir, protocol, save

SPEEDUP_TARGET = 1.8  # issue 16: 2 processes x 1 thread against 1 process x 1 thread


def analyze(out: Path, method: str, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGERY_DATA_DIR": str(data_dir()), "HF_HUB_OFFLINE": "1"}
    command = ["-m", "surgery", "analyze", "smollm2-135m", "--out", str(out), "--method", method, "--device", "cpu"]
    if processes > 1:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                   "--master-port", str(port), *command]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    analysis = json.loads((out / "analysis.json").read_text())
    return {"seconds": seconds, "scoring_seconds": analysis["cost"]["total_seconds"], "evaluations": analysis["cost"]["evaluations"],
            "sections": analysis["sections"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="ablation")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="multiprocess-"))
    try:
        # SmolLM2's conversion from the PyPI package, cached before timing (and the files read once)
        subprocess.run([sys.executable, "-m", "surgery", "info", "smollm2-135m"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       check=True, capture_output=True)
        one = analyze(work / "one", args.method, 1)
        two = analyze(work / "two", args.method, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"method": args.method, "one_process_seconds": one["seconds"], "two_processes_seconds": two["seconds"],
              "speedup": one["seconds"] / two["seconds"], "scoring_speedup": one["scoring_seconds"] / two["scoring_seconds"],
              "evaluations": [one["evaluations"], two["evaluations"]], "identical_values": one["sections"] == two["sections"],
              "threads_per_process": 1, "speedup_target": SPEEDUP_TARGET, "protocol": protocol()}
    result["met"] = result["speedup"] >= SPEEDUP_TARGET and result["identical_values"]
    print(f"{args.method}: 1 process {one['seconds']:.0f} s, 2 processes {two['seconds']:.0f} s, speed-up {result['speedup']:.2f}x "
          f"(scoring alone {result['scoring_speedup']:.2f}x), identical values: {result['identical_values']}")
    save("several_processes", result)


if __name__ == "__main__":
    main()
