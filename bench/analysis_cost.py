"""Analysis cost on the real SmolLM2-135M (CPU): wall time and peak memory of each scorer on the
default calibration set, and the speed-up of the prefix cache over evaluating every coalition from
the embeddings, measured in the same run on the same coalitions.

    python bench/analysis_cost.py [--threads 2] [--sample-every 4] [--skip-sweeps]
    python bench/analysis_cost.py --speedup-only      # the speed-up alone (minutes): for a quiet machine
    python bench/analysis_cost.py --cli-run           # `surgery analyze smollm2-135m` as a user runs it, timed

The naive path costs several seconds a coalition here, so it runs on every k-th coalition of the
Shapley run (--max-removed 4), stratified over run length and position; the prefix path is timed
on exactly those coalitions, interleaved with the naive ones so machine noise hits both alike.

No cache can skip the output layer, so the speed-up is bounded by its share of a forward pass
(SmolLM2's 49,152-token vocabulary makes it large). The script measures that share, the bound it
implies, and the speed-up on random models with SmolLM2's body and smaller vocabularies. It also
reports how the cost grows with layers and calibration tokens on tiny models (8, 16, 32 layers).
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
    parser.add_argument("--skip-sweeps", action="store_true", help="only the SmolLM2 measurements")
    parser.add_argument("--scaling-only", action="store_true", help="only the tiny-model scaling table (analysis_scaling.json)")
    parser.add_argument("--speedup-only", action="store_true",
                        help="only the prefix-cache speed-up on SmolLM2 (analysis_speedup.json; minutes, for a quiet machine)")
    parser.add_argument("--cli-run", action="store_true",
                        help="only time a default `surgery analyze smollm2-135m` run of all methods (analysis_cli.json)")
    args = parser.parse_args()
    if args.cli_run:
        save("analysis_cli", cli_run())
        return
    threads = setup(args.threads)
    if args.scaling_only:
        save("analysis_scaling", {"scaling": scaling_table(), "threads": threads, "protocol": protocol()})
        return

    import torch

    from surgery.data import calibration_batches
    from surgery.loading import load_model
    from surgery.scoring.angular import angular_distances
    from surgery.scoring.block_influence import block_influence
    from surgery.scoring.residual import ResidualLoss
    from surgery.scoring.shapley import neighbourhood_windows
    from surgery.settings import AnalysisSettings

    settings = AnalysisSettings(data_dir=data_dir())  # the defaults of `surgery analyze`
    loaded = load_model("smollm2-135m", device="cpu")
    model = loaded.model
    batches, origin, _ = calibration_batches(loaded.tokenizer, settings)
    players = 2 * model.config.num_hidden_layers
    if args.speedup_only:
        windows = [w for w in neighbourhood_windows(players, settings.max_removed) if w]
        speed = prefix_speedup(model, batches, windows[:: args.sample_every], len(windows), settings.max_removed)
        print(f"prefix-cache speed-up {speed['speedup']:.2f}x (bound {speed['bound']:.2f}x)")
        save("analysis_speedup", {"prefix_cache_speedup": speed, "threads": threads, "protocol": protocol()})
        return
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

    speed = prefix_speedup(model, batches, windows[:: args.sample_every], len(windows), settings.max_removed)
    batching = coalition_batching(model, batches, players, settings.max_removed)
    results |= {
        "threads": threads,
        "reference_pass": {"seconds": reference.seconds, "peak_rss_bytes": reference.peak, "state_cache_bytes": state_bytes},
        "angular_and_block_influence": {"seconds": reference.seconds + similarity.seconds, "peak_rss_bytes": similarity.peak},
        "ablation": {"seconds": reference.seconds + ablation.seconds, "evaluations": players, "peak_rss_bytes": ablation.peak},
        "shapley": {"seconds": reference.seconds + shapley_seconds, "evaluations": players + len(windows) - players,
                    "max_removed": settings.max_removed, "peak_rss_bytes": shapley.peak},
        "prefix_cache_speedup": speed,
        "coalition_batching": batching,
    }
    if not args.skip_sweeps:
        results["vocabulary_sweep"] = vocabulary_sweep(model.config, batches, args.sample_every * 2)
        results["scaling"] = scaling_table()
    results["protocol"] = protocol()
    print(f"reference pass {reference.seconds:.1f}s, ablation {results['ablation']['seconds']:.0f}s, "
          f"shapley {results['shapley']['seconds']:.0f}s, prefix-cache speed-up {speed['speedup']:.2f}x "
          f"(max value difference {speed['max_abs_value_difference']:.2g})")
    save("analysis_cost", results)


def prefix_speedup(model, batches, sample: list, of: int, max_removed: int) -> dict:
    """Each sampled coalition with the prefix cache and from the embeddings, back to back, so that
    machine noise hits both alike; plus the output layer's share and the bound it implies."""
    import torch

    from surgery.scoring.residual import ResidualLoss

    naive, fresh = ResidualLoss(model, batches, prefix_cache=False), ResidualLoss(model, batches)
    naive_times, prefix_times, max_diff = [], [], 0.0
    with torch.no_grad():
        for window in sample:
            start = time.perf_counter()
            a = fresh.value(window)
            prefix_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = naive.value(window)
            naive_times.append(time.perf_counter() - start)
            max_diff = max(max_diff, abs(a - b))
    head = head_share(model, batches)
    fraction = mean_suffix_fraction(2 * model.config.num_hidden_layers, max_removed)
    return {"coalitions_sampled": len(sample), "of": of, "naive_seconds": sum(naive_times),
            "prefix_seconds": sum(prefix_times), "speedup": sum(naive_times) / sum(prefix_times),
            "naive_median_seconds": statistics.median(naive_times), "prefix_median_seconds": statistics.median(prefix_times),
            "max_abs_value_difference": max_diff, "target": 1.7, "output_layer_share": head,
            "mean_blocks_run_fraction": fraction, "bound": 1 / ((1 - head) * fraction + head)}


def coalition_batching(model, batches, players: int, max_removed: int) -> dict:
    """All runs that end at the same sublayer, for every 8th sublayer: one batch of 4 against one at a time."""
    import torch

    from surgery.scoring.residual import ResidualLoss

    groups = [[frozenset(range(end - length, end)) for length in range(1, max_removed + 1)]
              for end in range(max_removed, players, 8)]
    coalitions = [c for group in groups for c in group]
    timings = {}
    with torch.no_grad():
        for batch in (1, max_removed):
            residual = ResidualLoss(model, batches)
            start = time.perf_counter()
            residual.values(coalitions, batch=batch)
            timings[batch] = time.perf_counter() - start
    return {"coalitions": len(coalitions), "batch": max_removed, "one_at_a_time_seconds": timings[1],
            "batched_seconds": timings[max_removed], "speedup": timings[1] / timings[max_removed],
            "device": str(next(model.parameters()).device)}


def head_share(model, batches) -> float:
    """Share of a full evaluation spent in the output layer and loss (median of 3)."""
    import torch

    from surgery.forward import final_hidden, token_nll

    body, head = [], []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            hidden = [final_hidden(model, ids) for ids in batches]
            body.append(time.perf_counter() - start)
            start = time.perf_counter()
            for h, ids in zip(hidden, batches):
                token_nll(model, h, ids)
            head.append(time.perf_counter() - start)
    return statistics.median(head) / (statistics.median(head) + statistics.median(body))


def mean_suffix_fraction(players: int, max_removed: int) -> float:
    """Mean share of the blocks a neighbourhood coalition still runs (an MLP-only first block counts 3/4)."""
    layers = players // 2
    fractions = []
    for length in range(1, max_removed + 1):
        for start in range(players - length + 1):
            resume = start + length
            fractions.append(((layers - resume // 2) - (0.25 if resume % 2 else 0)) / layers)
    return sum(fractions) / len(fractions)


def speedup_on(model, batches, every: int, max_removed: int = 4) -> dict:
    from surgery.scoring.shapley import neighbourhood_windows

    windows = [w for w in neighbourhood_windows(2 * model.config.num_hidden_layers, max_removed) if w]
    speed = prefix_speedup(model, batches, windows[::every], len(windows), max_removed)
    return {"coalitions": speed["coalitions_sampled"], "speedup": speed["speedup"], "output_layer_share": speed["output_layer_share"]}


def vocabulary_sweep(config, batches, every: int) -> list[dict]:
    """SmolLM2's body (random weights) with smaller vocabularies: speed does not depend on the weights."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = []
    for vocab in (49152, 16384, 4096):
        values = {**config.to_dict(), "vocab_size": vocab}
        values.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(config)(**values), dtype=torch.float32).eval()
        ids = [b % vocab for b in batches]
        with torch.no_grad():
            rows.append({"vocab_size": vocab, **speedup_on(model, ids, every)})
        print(f"vocabulary {vocab}: speed-up {rows[-1]['speedup']:.2f}x, output layer {100 * rows[-1]['output_layer_share']:.0f}%")
    return rows


def scaling_table() -> list[dict]:
    """Shapley (--max-removed 4) cost on tiny Llama models: layers x calibration tokens."""
    import torch

    from surgery.scoring.residual import ResidualLoss
    from surgery.scoring.shapley import neighbourhood_windows
    from surgery.tiny import tiny_model

    rows = []
    for layers in (8, 16, 32):
        model = tiny_model("llama", num_layers=layers, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=32)
        for tokens in (512, 2048):
            batches = list(torch.randint(3, 300, (tokens // 128, 128), generator=torch.Generator().manual_seed(0)).split(8))
            with torch.no_grad():
                start = time.perf_counter()
                residual = ResidualLoss(model, batches)
                windows = [w for w in neighbourhood_windows(2 * layers, 4) if w]
                for window in windows:
                    residual.value(window)
                seconds = time.perf_counter() - start
            states = sum(t.numel() * t.element_size() for b in residual._states for t in b)
            rows.append({"layers": layers, "tokens": tokens, "evaluations": len(windows), "seconds": seconds,
                         "state_cache_bytes": states})
            print(f"{layers} layers, {tokens} tokens: {len(windows)} coalitions in {seconds:.1f}s")
    return rows


def cli_run() -> dict:
    """Wall time and peak memory of the command a user runs, in a fresh folder (nothing resumed),
    with the CLI's own defaults (all methods, every core)."""
    import resource
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        command = [str(Path(sys.executable).with_name("surgery")), "analyze", "smollm2-135m",
                   "--out", str(Path(folder) / "analysis"), "--data-dir", str(data_dir())]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"surgery analyze smollm2-135m: {seconds / 60:.1f} min, peak RSS {peak / 2**30:.2f} GiB")
    return {"command": "surgery analyze smollm2-135m --out DIR --data-dir DATA", "seconds": seconds,
            "peak_rss_bytes": peak, "target_seconds": 20 * 60, "protocol": protocol()}


if __name__ == "__main__":
    main()
