"""The cost of the default strategy's search (sleb, blocks, --remove 25%) on the real SmolLM2-135M
(CPU), with the calibration cache rebased on the blocks chosen so far (as it runs: each candidate
resumes at itself) and without (each candidate resumes at the earliest block chosen so far), in
the same run on the same calibration set (without first, then rebased). Measured: wall time of
each search (its cache build and rebases included), the time spent rebasing, the calls of decoder
blocks (counted by hooks: evaluations, cache builds and rebases alike) and whether both chose the
same blocks, evaluating the same coalitions to the same values.

    python bench/search_cost.py [--threads 2] [--samples 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import Timer, data_dir, protocol, save, setup


class _Counted:
    """The calibration value, timing the search's calls to `rebase`; `rebase` passes through only
    when `rebased`, so the search sees a plain function otherwise."""

    def __init__(self, value, rebased: bool) -> None:
        self.value, self.values, self.rebase_seconds = value, {}, 0.0
        if rebased:
            self.rebase = self._rebase

    def __call__(self, removed) -> float:
        self.values[frozenset(s.position for s in removed)] = value = self.value(removed)
        return value

    def _rebase(self, removed) -> None:
        start = time.perf_counter()
        self.value.rebase(removed)
        self.rebase_seconds += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default: surgery's)")
    args = parser.parse_args()
    threads = setup(args.threads)

    from surgery.arch import decoder_layers
    from surgery.loading import load_model
    from surgery.prune import CalibrationValue, choose
    from surgery.settings import AnalysisSettings, PruneSettings

    analysis = AnalysisSettings(data_dir=data_dir(), **({"samples": args.samples} if args.samples else {}))
    settings = PruneSettings(model="smollm2-135m", out=Path("unused"), analysis=analysis)
    loaded = load_model("smollm2-135m", device="cpu")
    calls = [0]  # every call of a decoder block: evaluations, cache builds and rebases alike
    for layer in decoder_layers(loaded.model):
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    runs, values = {}, {}
    for name, rebased in (("from the earliest choice", False), ("rebased", True)):
        counted, calls[0] = _Counted(CalibrationValue(loaded, settings), rebased), 0
        with Timer() as timer:
            plan = choose(settings, loaded, value_after=counted)
        values[name] = counted.values
        runs[name] = {"seconds": timer.seconds, "block_calls": calls[0], "rebase_seconds": counted.rebase_seconds,
                      "evaluations": len(counted.values), "removed": plan.describe()["removed_compact"]}
        print(f"{name}: {timer.seconds:.0f} s ({counted.rebase_seconds:.0f} s rebasing), {calls[0]} block calls, "
              f"{len(counted.values)} evaluations, removed {runs[name]['removed']}")
    rebased, plain = runs["rebased"], runs["from the earliest choice"]
    a, b = values["rebased"], values["from the earliest choice"]
    save("search_cost", {
        "strategy": settings.strategy, "granularity": settings.granularity, "remove": settings.remove,
        "samples": analysis.samples, "seq_len": analysis.seq_len, "threads": threads, "runs": runs,
        "same_plan": rebased["removed"] == plain["removed"] and a.keys() == b.keys(),
        "max_value_difference": max(abs(a[c] - b[c]) for c in a) if a.keys() == b.keys() else None,
        "speedup": plain["seconds"] / rebased["seconds"], "block_calls_ratio": plain["block_calls"] / rebased["block_calls"],
        "protocol": protocol()})


if __name__ == "__main__":
    main()
