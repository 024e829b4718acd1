"""Analysis cost on the real SmolLM2-135M (CPU): wall time and peak memory of each scorer on the
default calibration set, and the speed-up of the prefix cache over evaluating every coalition from
the embeddings, measured in the same run on the same coalitions.

    python bench/analysis_cost.py [--threads 2] [--sample-every 4]

The naive path costs about 10 s a coalition here, so it runs on every k-th coalition of the
Shapley run (--max-removed 4), stratified over run length and position; the prefix path is timed
on exactly those coalitions, interleaved with the naive ones so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import Timer, data_dir, protocol, save, setup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-every", type=int, default=4)
    args = parser.parse_args()
    threads = setup(args.threads)

    import torch

    from surgery.analysis import AnalysisSettings, calibration_batches
    from surgery.models import load_model
    from surgery.scoring.residual import ResidualLoss
    from surgery.scoring.shapley import neighbourhood_windows
    from surgery.scoring.similarity import angular_distances, block_influence

    settings = AnalysisSettings(data_dir=data_dir())  # the defaults of `surgery analyze`
    loaded = load_model("smollm2-135m", device="cpu")
    model = loaded.model
    batches, origin, _ = calibration_batches(loaded.tokenizer, settings)
    players = 2 * model.config.num_hidden_layers
    results: dict = {"model": "smollm2-135m", "players": players,
                     "calibration": {"source": origin, "samples": settings.samples, "seq_len": settings.seq_len}}

    with torch.no_grad():
        with Timer() as reference:
            residual = ResidualLoss(model, batches)
        state_bytes = sum(t.numel() * t.element_size() for b in residual._states for t in b)
        with Timer() as similarity:
            states = [[residual.states_at(p)[b] for p in range(players + 1)] for b in range(len(batches))]
            angular_distances([s[::2] for s in states])
            block_influence(states, 1)
            block_influence(states, 2)
        with Timer() as ablation:
            for p in range(players):
                residual.value(frozenset({p}))
        windows = [w for w in neighbourhood_windows(players, settings.max_removed) if w]
        per_coalition: dict[frozenset, float] = {}
        with Timer() as shapley:
            for window in windows:
                start = time.perf_counter()
                residual.value(window)
                per_coalition[window] = time.perf_counter() - start
        # ablation windows were timed in the ablation phase; Shapley = ablation + the longer runs
        shapley_seconds = ablation.seconds + shapley.seconds

        sample = windows[:: args.sample_every]
        naive = ResidualLoss(model, batches, prefix_cache=False)
        fresh = ResidualLoss(model, batches)
        naive_times, prefix_times, max_diff = [], [], 0.0
        for window in sample:
            start = time.perf_counter()
            a = fresh.value(window)
            prefix_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = naive.value(window)
            naive_times.append(time.perf_counter() - start)
            max_diff = max(max_diff, abs(a - b))

    speedup = sum(naive_times) / sum(prefix_times)
    results |= {
        "threads": threads,
        "reference_pass": {"seconds": reference.seconds, "peak_rss_bytes": reference.peak, "state_cache_bytes": state_bytes},
        "angular_and_block_influence": {"seconds": reference.seconds + similarity.seconds, "peak_rss_bytes": similarity.peak},
        "ablation": {"seconds": reference.seconds + ablation.seconds, "evaluations": players, "peak_rss_bytes": ablation.peak},
        "shapley": {"seconds": reference.seconds + shapley_seconds, "evaluations": players + len(windows) - players,
                    "max_removed": settings.max_removed, "peak_rss_bytes": shapley.peak},
        "prefix_cache_speedup": {
            "coalitions_sampled": len(sample), "of": len(windows), "naive_seconds": sum(naive_times),
            "prefix_seconds": sum(prefix_times), "speedup": speedup,
            "naive_median_seconds": statistics.median(naive_times), "prefix_median_seconds": statistics.median(prefix_times),
            "max_abs_value_difference": max_diff, "target": 1.7,
        },
    }
    results["protocol"] = protocol()
    print(f"reference pass {reference.seconds:.1f}s, ablation {results['ablation']['seconds']:.0f}s, "
          f"shapley {results['shapley']['seconds']:.0f}s, prefix-cache speed-up {speedup:.2f}x "
          f"(max value difference {max_diff:.2g})")
    save("analysis_cost", results)


if __name__ == "__main__":
    main()
