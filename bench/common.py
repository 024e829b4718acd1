"""Shared by the benchmark scripts: protocol records, peak memory, output files."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def setup(threads: int | None = None) -> int:
    """Offline, no telemetry, a fixed thread count (recorded: timings depend on it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from surgery.console import quiet_transformers

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def data_dir() -> Path:
    value = os.environ.get("SURGERY_DATA_DIR") or ROOT.parent / "shared" / "datasets"
    path = Path(value)
    if not path.is_dir():
        sys.exit(f"data directory {path} not found: set SURGERY_DATA_DIR")
    return path.resolve()


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class Timer:
    def __enter__(self):
        reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.peak = peak_rss()


def sampled_peaks(pid: int, peaks: dict[str, int], done) -> None:
    """The largest RssAnon (heap, copies) and RssFile (mapped file pages) seen while `pid` runs."""
    while not done.wait(0.1):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile") and value.strip():
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)


def measured_child(command: list[str], env: dict[str, str], durable: bool = False) -> dict:
    """Run `command`: wall time (durable: until its writes are on disk, os.sync), ru_maxrss (the
    most resident memory at any moment, file-mapped pages included; an upper bound, since Linux
    starts it from this forking process's resident set and carries it across exec), sampled RSS
    parts, output.
    Exits with the output if it fails."""
    import subprocess
    import threading

    os.sync()  # no writeback pending from what ran before
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[str, int] = {}
    done = threading.Event()
    sampler = threading.Thread(target=sampled_peaks, args=(child.pid, peaks, done))
    sampler.start()
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if durable:
        os.sync()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"{' '.join(command)} failed ({code}):\n{output}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_rss_anon_sampled_bytes": peaks.get("RssAnon"),
            "peak_rss_file_sampled_bytes": peaks.get("RssFile"), "output": output}


def protocol(**extra) -> dict:
    from surgery.provenance import machine, now, versions

    return {"created": now(), "versions": versions(), "machine": machine(), "command": " ".join(sys.argv),
            "load_average_1min": os.getloadavg()[0], **extra}  # wall times on a busy machine say so


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path
