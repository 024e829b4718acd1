"""Out-of-core cut: a synthetic Llama-shaped checkpoint of over 6 GiB (bf16, random weights), cut by
`surgery cut --stream` in a child process, against copying the same bytes in the same run.

    python bench/out_of_core.py [--work DIR] [--keep | --source DIR] [--remove L3,L7] [--fp8]

Targets (issue 16): the cut's peak RSS under 1.5 GiB (os.wait4's ru_maxrss of the child: the most
resident memory at any moment, file-mapped pages included) and its wall time within 2x of
shutil.copyfile of the source shards (the faster of a copy before and one after the cut). The cut
runs with an empty cache, as a first cut of a model does. Recorded beside the targets, from the same
run: both times until the data is on disk (os.sync) rather than in the page cache; the same command
on a checkpoint of a few MiB (what does not grow with size: imports, planning, the checks' fixed
part); the time of the source's fingerprint (SHA-256 of every source file, part of a first cut);
and this CPU's SHA-256 and CRC-32 rates.

--fp8: the same shape stored as an FP8 release is (each block's projections float8 beside a grid of
128 x 128 block scales; surgery/fp8.py), cut as stored and cut turned back (--dtype bfloat16), each
against the copy; written to bench/results/out_of_core_fp8.json.

The checkpoint is written shard by shard, a tensor piece at a time, so the generator stays small.
Needs about 13 GiB free under --work (checked first: the source, then one copy or one cut at a
time); everything written is removed at the end, the source too unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, measured_child, protocol, save

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=10, vocab_size=128256, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192, rms_norm_eps=1e-5)
NEEDS_FREE = 13 << 30
RSS_TARGET = 1.5 * 2**30
TIME_TARGET = 2.0
SMALL = {**SHAPE, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 4096, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64}  # the same command on a few MiB: what does not grow with size
PIECE = 1 << 24  # elements generated at once


FP8_BLOCK = 128


def write_checkpoint(folder: Path, shape: dict, shard_size: str = "5GB", fp8: bool = False) -> None:
    """A Llama-shaped bf16 checkpoint with random weights (norms 1), written shard by shard; fp8: each
    block's projections float8 beside a float32 grid of FP8_BLOCK x FP8_BLOCK scales, as FP8 releases store them."""
    import torch
    from transformers import LlamaConfig

    from surgery.layerwise import checkpoint_shapes, skeleton
    from surgery.shards import TensorInfo, parse_size, plan_shards, write_index, write_shard

    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    config = LlamaConfig(**shape, dtype="bfloat16", **({"quantization_config": quantization} if fp8 else {}))
    config.save_pretrained(folder)
    shapes = checkpoint_shapes(skeleton(config, torch.bfloat16))
    dtypes = {name: "BF16" for name in shapes}
    if fp8:
        for name in [n for n in shapes if ".layers." in n and n.endswith("proj.weight")]:
            dtypes[name] = "F8_E4M3"
            rows, columns = shapes[name]
            shapes[name + "_scale_inv"], dtypes[name + "_scale_inv"] = (-(-rows // FP8_BLOCK), -(-columns // FP8_BLOCK)), "F32"
    width = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
    sizes = {name: torch.Size(shape).numel() * width[dtypes[name]] for name, shape in shapes.items()}
    shards = plan_shards(sizes, parse_size(shard_size))
    generator = torch.Generator().manual_seed(0)

    def pieces(info: TensorInfo):
        count = torch.Size(info.shape).numel()
        for start in range(0, count, PIECE):
            n = min(PIECE, count - start)
            if info.dtype == "F32":  # (the block scales of an FP8 weight whose values are about N(0, 1))
                values = torch.full((n,), 0.02)
            elif info.dtype == "F8_E4M3":
                values = torch.randn(n, generator=generator).to(torch.float8_e4m3fn)
            else:
                values = torch.ones(n) if info.name.endswith("norm.weight") else torch.randn(n, generator=generator) * 0.02
                values = values.to(torch.bfloat16)
            yield values.view(torch.uint8).numpy().tobytes()

    for file, names in shards.items():
        write_shard(folder / file, [TensorInfo(n, dtypes[n], shapes[n], sizes[n]) for n in names], pieces)
    if len(shards) > 1:
        write_index(folder, shards, sum(sizes.values()), sum(sizes.values()) // 2)


def copy_seconds(source: Path, target: Path, durable: bool = False) -> float:
    """Wall time of shutil.copyfile over every weight file of `source` (then removed); durable:
    until the copy is on disk (os.sync), not only in the page cache."""
    target.mkdir()
    os.sync()  # each timed phase starts with no writeback pending from the one before
    start = time.perf_counter()
    for file in sorted(source.glob("*.safetensors")):
        shutil.copyfile(file, target / file.name)
    if durable:
        os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return seconds


def run_cut(source: Path, out: Path, remove: str, threads: int, cache: Path, durable: bool = False,
            extra: tuple[str, ...] = ()) -> dict:
    """`surgery cut --stream` in a child process with an empty cache (as a first cut of this model
    runs: the source's fingerprint is computed): wall time (durable: until the cut is on disk),
    ru_maxrss and sampled RSS parts. The cut is removed afterwards."""
    command = [sys.executable, "-m", "surgery", "cut", str(source), "--remove", remove, "--out", str(out), "--stream",
               "--device", "cpu", "--max-shard-size", "5GB", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "SURGERY_CACHE": str(cache)}
    shutil.rmtree(cache, ignore_errors=True)
    measured = measured_child(command, env, durable)
    manifest = json.loads((out / "surgery.json").read_text())
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out)
    measured.pop("output")
    return {"command": " ".join(["surgery", *command[3:]]), **measured, "output_bytes": out_bytes,
            "verified": manifest["verified"]}


def hash_rates() -> dict[str, float]:
    """Bytes per second of SHA-256 and CRC-32 on this CPU, one thread: what the checksums cost."""
    import hashlib
    import zlib

    data = os.urandom(1 << 28)
    rates = {}
    for name, digest in (("sha256", lambda: hashlib.sha256(data).digest()), ("crc32", lambda: zlib.crc32(data))):
        start = time.perf_counter()
        digest()
        rates[name] = len(data) / (time.perf_counter() - start)
    return rates


def fingerprint_seconds(source: Path, cache: Path) -> float:
    """The part of a first cut spent on the source's fingerprint (SHA-256 of every file; cached after)."""
    os.environ["SURGERY_CACHE"] = str(cache)
    from surgery.source import fingerprint

    start = time.perf_counter()
    fingerprint(source)
    return time.perf_counter() - start


def synthetic_parser() -> argparse.ArgumentParser:
    """The options of the benchmarks on the synthetic checkpoint (this one and bench/layerwise_analysis.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoints are written")
    parser.add_argument("--source", type=Path, help="a checkpoint an earlier bench/out_of_core.py --keep wrote (not removed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a small model, to try the script (prints, saves nothing)")
    return parser


def prepare(args: argparse.Namespace, needs_free: int) -> None:
    """--smoke shrinks the shape to SMALL; otherwise the work folder must have `needs_free` bytes free."""
    if args.smoke:
        SHAPE.update(SMALL)
        return
    free = shutil.disk_usage(args.work).free
    if free < needs_free:
        sys.exit(f"{args.work} has {free / 2**30:.1f} GiB free; the benchmark needs {needs_free / 2**30:.0f} GiB: pass --work")


def main() -> None:
    parser = synthetic_parser()
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint (for --source)")
    parser.add_argument("--remove", default="L3,L7", help="blocks to cut")
    parser.add_argument("--fp8", action="store_true", help="the checkpoint stored as an FP8 release is, cut both ways")
    args = parser.parse_args()
    prepare(args, NEEDS_FREE)
    work = Path(tempfile.mkdtemp(prefix="surgery-out-of-core-", dir=args.work))
    try:
        result = measure_fp8(work, args) if args.fp8 else measure(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not args.smoke:
        save("out_of_core_fp8" if args.fp8 else "out_of_core", result)


def measure(work: Path, args: argparse.Namespace) -> dict:
    source, out, cache = args.source or work / "source", work / "cut", work / "cache"
    if args.source is None:
        start = time.perf_counter()
        write_checkpoint(source, SHAPE)
        print(f"wrote a checkpoint in {time.perf_counter() - start:.0f} s")
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    copies = [copy_seconds(source, work / "copy")]
    cut = run_cut(source, out, args.remove, args.threads, cache)
    copies.append(copy_seconds(source, work / "copy"))
    copy = min(copies)  # the faster copy: the conservative ratio
    ratio = cut["seconds"] / copy
    print(f"cut {cut['seconds']:.1f} s, copy {copy:.1f} s ({ratio:.2f}x; target {TIME_TARGET}x); "
          f"peak RSS {cut['peak_rss_bytes'] / 2**30:.2f} GiB (target {RSS_TARGET / 2**30} GiB)")
    durable = {"copy_seconds": copy_seconds(source, work / "copy", durable=True),
               "cut_seconds": run_cut(source, out, args.remove, args.threads, cache, durable=True)["seconds"]}
    write_checkpoint(work / "small", SMALL)
    small = run_cut(work / "small", out, args.remove, args.threads, cache)
    return {"shape": SHAPE, "dtype": "bfloat16", "removed": args.remove, "source_bytes": source_bytes, "cut": cut,
            "copy_seconds": copies, "time_ratio": ratio, "rss_target_bytes": RSS_TARGET, "time_target_ratio": TIME_TARGET,
            "rss_met": cut["peak_rss_bytes"] < RSS_TARGET, "time_met": ratio <= TIME_TARGET,
            "until_on_disk": {**durable, "ratio": durable["cut_seconds"] / durable["copy_seconds"]},
            "small_model": {"shape": SMALL, "source_bytes": sum(p.stat().st_size for p in (work / "small").glob("*.safetensors")),
                            "seconds": small["seconds"], "peak_rss_bytes": small["peak_rss_bytes"]},
            "fingerprint_seconds": fingerprint_seconds(source, work / "fingerprint-cache"), "hash_bytes_per_second": hash_rates(),
            "threads": args.threads, "memory_total_bytes": _memory_total(), "protocol": protocol()}


def measure_fp8(work: Path, args: argparse.Namespace) -> dict:
    """The FP8 checkpoint cut as stored and turned back, each against the faster of two copies of its shards."""
    source, out, cache = args.source or work / "source", work / "cut", work / "cache"
    if args.source is None:
        write_checkpoint(source, SHAPE, fp8=True)
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    copies = [copy_seconds(source, work / "copy")]
    cuts = {"as_stored": run_cut(source, out, args.remove, args.threads, cache),
            "turned_back": run_cut(source, out, args.remove, args.threads, cache, extra=("--dtype", "bfloat16"))}
    copies.append(copy_seconds(source, work / "copy"))
    copy = min(copies)
    for name, cut in cuts.items():
        print(f"{name}: {cut['seconds']:.1f} s ({cut['seconds'] / copy:.2f}x the copy), peak RSS "
              f"{cut['peak_rss_bytes'] / 2**30:.2f} GiB, {cut['output_bytes'] / 2**30:.2f} GiB written")
    return {"shape": SHAPE, "dtype": "float8_e4m3fn projections, bfloat16 elsewhere", "block": FP8_BLOCK,
            "removed": args.remove, "source_bytes": source_bytes, "cuts": cuts, "copy_seconds": copies,
            "time_ratios": {name: cut["seconds"] / copy for name, cut in cuts.items()},
            "rss_target_bytes": RSS_TARGET, "time_target_ratio": TIME_TARGET,
            "rss_met": {name: cut["peak_rss_bytes"] < RSS_TARGET for name, cut in cuts.items()},
            "threads": args.threads, "memory_total_bytes": _memory_total(), "protocol": protocol()}


def _memory_total() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    main()
