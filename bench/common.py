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
