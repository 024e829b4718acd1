"""The memory plan `surgery info` shows, against what each command holds, measured in the same run.

    python bench/memory_plan.py [--model smollm2-135m] [--device cpu|cuda] [--work DIR] [--name memory_plan]

Each command the plan describes runs in a child process on MODEL, the path the plan names forced
with its option (so both paths of a command are measured whatever fits here). Measured: on the CPU
the child's peak resident memory (VmHWM, read as it exits); on a GPU the CUDA caching allocator's
peak reserved bytes (torch.cuda.max_memory_reserved, read as it exits), beside its VmHWM. Healing
also gets a row for its training alone, from the peak its record keeps.
The plan's figure is the weights it counts plus 1 GiB for the libraries, and leaves out
activations; the ratio measured / planned says how far that holds. `--model` takes any model
folder or Hub id; `--make-llama WIDTH,FFN,LAYERS,VOCAB` first writes a random bf16 Llama of that
shape under --work (on the GPU: for an 8B shape where no download is possible), with the tokenizer
of --model (a model, or a folder holding only a tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import ROOT, data_dir, measured_child, protocol, save

# A child that reports the CUDA allocator's peak as it exits (the parent cannot see a child's GPU memory).
# Its peak resident set is VmHWM, which belongs to the program it runs: ru_maxrss from os.wait4 would
# start from the forking parent's resident set, since Linux carries it across exec.
CHILD = ("import atexit, sys, torch\n"
         "from surgery.memory import PeakMemory\n"
         "rss = PeakMemory('cpu')\n"
         "rss._reset = True  # VmHWM since exec, not reset\n"
         "def report():\n"
         "    print('PEAK_RSS', rss.read(), file=sys.__stderr__, flush=True)\n"
         "    if torch.cuda.is_available():\n"
         "        print('CUDA_PEAK_RESERVED', torch.cuda.max_memory_reserved(), file=sys.__stderr__, flush=True)\n"
         "atexit.register(report)\n"
         "from surgery.cli import main\n"
         "main(sys.argv[1:], prog_name='surgery')\n")


def commands(model: str, work: Path, data: Path, device: str) -> list[tuple[str, str, str, list[str]]]:
    """(plan row, path, the folder the plan is read on, the command's arguments): each path of each
    row, forced."""
    on = ["--device", device]
    quiet = ["--eval-tasks", "none", "--eval-ppl", "wikitext2", "--eval-ppl-windows", "2", "--no-eval-speed",
             "--data-dir", str(data)]
    ppl = ["--tasks", "none", "--ppl", "wikitext2", "--ppl-windows", "2", "--no-speed", "--data-dir", str(data)]
    cut = str(work / "cut")
    return [  # the healing input (the streamed cut) first, so that a run cut short by a lease still measures it
        ("analyze, eval", "in memory", model, ["eval", model, *ppl, "--no-layerwise", *on]),
        ("cut", "block by block", model, ["cut", model, "--remove", "L1", "--out", cut, "--stream", *on]),
        ("heal", "in memory", cut, ["heal", cut, "--out", str(work / "healed"), "--heal-steps", "2", "--heal-batch-size", "1",
                                    "--heal-grad-accum", "1", "--heal-seq-len", "128", "--no-stream", *quiet, *on]),
        ("analyze, eval", "block by block", model, ["eval", model, *ppl, "--layerwise", *on]),
        ("cut", "in memory", model, ["cut", model, "--remove", "L1", "--out", str(work / "cut-in-memory"), "--no-stream", *on]),
        ("prune", "in memory", model, ["prune", model, "--remove", "L1,L2", "--no-heal", "--no-bridge", "--out",
                                       str(work / "pruned"), "--no-eval-generation", *quiet, *on]),
    ]


def planned(row: str, path: str, folder: Path, device: str) -> tuple[int, str]:
    """The plan's figure for `row` on the path forced, and how the plan would run it here."""
    from surgery.memory import block_by_block_bytes, footprint, in_memory_bytes, loaded_bytes, plan, training_bytes

    if path == "training":
        return training_bytes(footprint(folder), loaded_bytes(folder)), "QLoRA on a 4-bit NF4 base"
    found, _, steps = plan(folder, device=device)
    step = next(s for s in steps if s.command == row)
    if row in ("heal", "prune"):
        return step.holds, step.how
    if path == "block by block":
        return block_by_block_bytes(found), step.how
    return in_memory_bytes(loaded_bytes(folder) or found.weights, 2 if row == "cut" else 1), step.how


def measure(row: str, path: str, folder: str, command: list[str], env: dict[str, str], device: str) -> list[dict]:
    """Run one command; its row (and for healing, its training's own peak from the heal record)."""
    from surgery.source import resolve

    measured = measured_child([sys.executable, "-c", CHILD, *command], env)
    reported = {key: int(value) for key, _, value in (line.partition(" ") for line in measured["output"].splitlines())
                if key in ("PEAK_RSS", "CUDA_PEAK_RESERVED")}
    cuda, rss = reported.get("CUDA_PEAK_RESERVED"), reported["PEAK_RSS"]
    found = [(path, cuda if device.startswith("cuda") else rss)]
    if row == "heal":
        record = json.loads((Path(command[command.index("--out") + 1]) / "local.json").read_text())
        found.append(("training", record["healing"]["training_peak"]["bytes"]))
    rows = []
    for name, peak in found:
        figure, how = planned(row, name, resolve(folder).path, device)
        rows.append({"row": row, "path": name, "command": " ".join(command[:1] + ["MODEL"] + command[2:]),
                     "planned_bytes": figure, "plan_here": how, "measured_peak_bytes": peak,
                     "peak_rss_bytes": rss, "cuda_peak_reserved_bytes": cuda,
                     "seconds": measured["seconds"]})
        print(f"{row:14} {name:15} planned {figure / 2**30:6.2f} GiB, measured {peak / 2**30:6.2f} GiB: "
              f"{peak / figure:.2f}x  ({measured['seconds']:.0f} s)", flush=True)
    return rows


def make_llama(shape: str, tokenizer_from: str, folder: Path) -> str:
    """A random bf16 Llama of WIDTH,FFN,LAYERS,VOCAB written to `folder` with --model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.loading import load_tokenizer
    from surgery.source import resolve

    width, ffn, layers, vocab = (int(x) for x in shape.split(","))
    config = AutoConfig.for_model("llama", hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                                  vocab_size=vocab, num_attention_heads=width // 128, num_key_value_heads=8, head_dim=128,
                                  tie_word_embeddings=False, max_position_embeddings=8192, rms_norm_eps=1e-5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the free memory the plan reads here is then the GPU's
    given = Path(tokenizer_from)
    load_tokenizer(given if (given / "tokenizer_config.json").is_file() else resolve(tokenizer_from).path).save_pretrained(folder)
    return str(folder)


def footprint_record(found) -> dict:
    return {"parameters": found.parameters, "weights_bytes": found.weights, "largest_block_bytes": max(found.blocks),
            "dtype": found.dtype}


def save_rows(name: str, result: dict) -> None:
    """After every row, so that a run cut short keeps what it measured."""
    if name.endswith(".json"):
        Path(name).write_text(json.dumps(result, indent=2) + "\n")
    else:
        save(name, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the written checkpoints (removed at the end).")
    parser.add_argument("--make-llama", default=None, help="WIDTH,FFN,LAYERS,VOCAB of a random bf16 Llama to measure instead.")
    parser.add_argument("--skip", default="", help="Rows to leave out, as ROW:PATH separated by ';' (e.g. 'prune:in memory').")
    parser.add_argument("--name", default="memory_plan", help="Results file name under bench/results (or a path ending .json).")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from surgery.memory import plan
    from surgery.source import resolve

    work = Path(tempfile.mkdtemp(dir=args.work, prefix="memory-plan-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        model = make_llama(args.make_llama, args.model, work / "model") if args.make_llama else args.model
        footprint, available, _ = plan(resolve(model).path, device=args.device)
        rows = []
        skipped = {tuple(item.split(":", 1)) for item in args.skip.split(";") if item}
        for row, path, folder, command in commands(model, work, data_dir(), args.device):
            if (row, path) in skipped:
                continue
            rows += measure(row, path, folder, command, env, args.device)
            written = Path(command[command.index("--out") + 1]) if "--out" in command else None
            if written and written != work / "cut":  # the cut is healed next; the rest would fill a small disk
                shutil.rmtree(written, ignore_errors=True)
            save_rows(args.name, {"protocol": protocol(model=model, device=args.device, shape=args.make_llama),
                                  "footprint": footprint_record(footprint), "available_bytes": available, "rows": rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
