"""What only a GPU shows, in one short script (under 8 minutes on one H200), tried on the CPU first:

    python bench/gpu_check.py                  # on a CUDA machine: a random-init ~1.1B Llama (TinyLlama's shape)
    python bench/gpu_check.py --small --cpu    # the same checks on a small model, on this CPU

1. QLoRA gradients on CUDA: LoRA gradients through the 4-bit NF4 model, against those of a float32
   model holding the dequantised weights, are no further off than a bf16 model's with those weights.
2. Analysis timings in bf16: the prefix-cached loss of every run of up to 3 sublayers, one
   coalition at a time and 4 at a time (coalition batching), with the values of both.
3. Layer-by-layer analysis against in-memory: the same coalitions' values from a model streamed
   one block at a time from its saved checkpoint.
4. The CLI on the device, with --cli: `surgery prune --heal` end to end (analysis, bridge, QLoRA
   healing through bitsandbytes on CUDA, merge, export, evaluation with lm-eval), `surgery heal`
   of a cut under `accelerate launch` with FSDP + QLoRA (peft's config, one process), and
   `surgery analyze` under torchrun (NCCL, one process) against the same analysis without it.
   The model is a random-init Llama of SmolLM2-135M's shape with its tokenizer (--tokenizer: a
   folder with tokenizer.json and config.json); its scores are meaningless, the run is the check.

No download is possible there: the model is built from a config. Packages the GPU image lacks
(bitsandbytes, trl) travel as wheels (docs/scale.md, "On a GPU"); a check whose package is
missing says so and the others run. Writes $OUT/gpu_check.json (or bench/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config(small: bool) -> dict:
    if small:
        return dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                    vocab_size=4096, max_position_embeddings=1024)
    return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                vocab_size=32000, max_position_embeddings=2048)  # TinyLlama-1.1B's shape


def build(small: bool, dtype, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config(small), tie_word_embeddings=False)).to(dtype)
    return model.to(device).eval()


def qlora_gradients(small: bool, device: str, folder: Path) -> dict:
    """Check 1; needs bitsandbytes with CUDA (or its CPU backend). The exact gradient is that of a
    float32 model holding the dequantised weights; the 4-bit model computes in bf16 on a GPU, so it
    is judged against what bf16 itself costs: a bf16 model holding the same weights. It passes when
    the 4-bit gradients are no further from the exact ones than twice the bf16 model's distance."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError as error:
        return {"ran": False, "why": f"bitsandbytes missing: {error}"}
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from surgery.heal import load_4bit

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    build(small, dtype, "cpu").save_pretrained(folder)
    quantized = load_4bit(folder, device)
    dequantised = {name + ".weight": bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
                   for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)}

    def reference(precision):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision).to(device)  # the same embeddings and norms
        state = model.state_dict()
        state.update({name: weight.to(precision) for name, weight in dequantised.items()})
        model.load_state_dict(state)
        return model

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    models = {"4bit": get_peft_model(quantized, lora), "bf16": get_peft_model(reference(dtype), lora),
              "float32": get_peft_model(reference(torch.float32), lora)}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (name, a), *others in zip(*(m.named_parameters() for m in models.values())):
            if "lora_" in name:
                a.copy_(torch.randn(a.shape, generator=generator) * 0.02)
                for _, b in others:
                    b.copy_(a)
    ids = torch.randint(3, 1000, (2, 64), generator=generator).to(device)
    grads = {}
    for key, model in models.items():
        model.train()
        model(ids, labels=ids).loss.backward()
        grads[key] = [p.grad.float() for n, p in model.named_parameters() if "lora_" in n]

    def distance(key: str) -> float:
        return max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(grads[key], grads["float32"]))

    four_bit, floor = distance("4bit"), distance("bf16")
    return {"ran": True, "compute_dtype": str(dtype),
            "embedding_dtype_4bit": str(quantized.get_input_embeddings().weight.dtype),
            "max_relative_gradient_difference_4bit": four_bit, "max_relative_gradient_difference_bf16": floor,
            "ok": four_bit <= max(2 * floor, 1e-3)}


def batching_timings(small: bool, device: str) -> dict:
    """Check 2: the prefix-cached loss of the runs of up to 3 sublayers, batched 1 and 4 at a time."""
    import torch

    from surgery.scoring.residual import ResidualLoss
    from surgery.scoring.shapley import neighbourhood_windows

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build(small, dtype, device)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 1000, (8, 256), generator=generator) for _ in range(2)]
    windows = [w for w in neighbourhood_windows(2 * model.config.num_hidden_layers, 3) if w]
    result = {"coalitions": len(windows), "dtype": str(dtype)}
    values = {}
    for batch in (1, 4):
        residual = ResidualLoss(model, batches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        values[batch] = residual.values(windows, batch=batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result[f"seconds_batch_{batch}"] = time.perf_counter() - start
    result["speedup_batch_4"] = result["seconds_batch_1"] / result["seconds_batch_4"]
    result["max_value_difference"] = max(abs(a - b) for a, b in zip(values[1], values[4]))
    return result


def layerwise_against_memory(small: bool, device: str, folder: Path) -> dict:
    """Check 3: values from a model streamed block by block against the model in memory."""
    try:
        from surgery.scoring.layerwise import LayerwiseResidualLoss
    except ImportError as error:
        return {"ran": False, "why": f"layer-by-layer analysis missing: {error}"}
    import torch

    from surgery.layerwise import LayerwiseModel
    from surgery.scoring.residual import ResidualLoss

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build(small, dtype, "cpu")
    model.save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(3, 1000, (2, 128), generator=generator)]
    players = 2 * model.config.num_hidden_layers
    coalitions = [frozenset({p}) for p in range(players)] + [frozenset({p, p + 1}) for p in range(0, players, 2)]
    start = time.perf_counter()
    memory = ResidualLoss(model.to(device), batches).values(coalitions)
    in_memory_seconds = time.perf_counter() - start
    del model
    start = time.perf_counter()
    layerwise = LayerwiseResidualLoss(LayerwiseModel(folder / "model", device=device), batches)
    streamed = layerwise.values(coalitions, batch=layerwise.default_batch)  # a group per read of the blocks
    return {"ran": True, "coalitions": len(coalitions), "max_value_difference": max(abs(a - b) for a, b in zip(memory, streamed)),
            "in_memory_seconds": in_memory_seconds, "layerwise_seconds": time.perf_counter() - start}


def _run(command: list[str], log: Path, timeout: float, env: dict) -> dict:
    """One CLI command, its output appended to `log`; the result says how it ended."""
    import subprocess

    start = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        try:
            code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"exit": code, "seconds": round(time.perf_counter() - start, 1)}


def _report(folder: Path) -> dict:
    """An export's record: prune's report.json, or heal's surgery.json."""
    for name in ("report.json", "surgery.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return {}


def cli_model(small: bool, tokenizer: Path, folder: Path, dtype) -> Path:
    """A random-init Llama of the tokenizer folder's config (SmolLM2-135M's) saved with its tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tokenizer)
    if small:
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def cli_checks(small: bool, device: str, work: Path, tokenizer: Path, data: Path, out: Path) -> dict:
    """Check 4: prune --heal end to end, heal under FSDP, analyze under torchrun, on the device."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = cli_model(small, tokenizer, work / "model", dtype)
    env = {**os.environ, "SURGERY_DATA_DIR": str(data), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "SURGERY_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    log = out / "gpu_check_cli.log"
    python = sys.executable
    on = ["--device", device]
    result: dict = {}

    pruned = work / "pruned"
    result["prune_heal"] = _run([python, "-m", "surgery", "prune", str(model), "--out", str(pruned), "--heal", "--heal-steps", "20",
                                 "--eval-tasks", "arc_easy,piqa", "--eval-limit", "100", "--eval-ppl", "wikitext2",
                                 "--eval-ppl-windows", "16", *on], log, 240, env)
    report = _report(pruned)
    if report:
        (out / "gpu_check_prune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    result["prune_heal"]["exported"] = bool(report)

    cut, healed = work / "cut", work / "healed"
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    remove = f"L{layers - 3}-L{layers - 2}"
    result["cut"] = _run([python, "-m", "surgery", "cut", str(model), "--remove", remove, "--out", str(cut), *on],
                         log, 90, env)
    fsdp = work / "fsdp-1process.yaml"
    recipe = (ROOT / "recipes" / "accelerate" / "fsdp-qlora-2gpu.yaml").read_text()
    fsdp.write_text(recipe.replace("num_processes: 2", "num_processes: 1"))
    result["heal_fsdp"] = _run([python, "-m", "accelerate.commands.launch", "--config_file", str(fsdp), "-m", "surgery", "heal",
                                str(cut), "--out", str(healed), "--heal-steps", "10", "--eval-tasks", "none",
                                "--eval-ppl", "wikitext2", "--eval-ppl-windows", "4", "--no-eval-speed"], log, 180, env)
    report = _report(healed)
    if report:
        (out / "gpu_check_heal_fsdp_report.json").write_text(json.dumps(report, indent=2) + "\n")
    result["heal_fsdp"]["exported"] = bool(report)

    alone, launched = work / "analysis-alone", work / "analysis-torchrun"
    analyze = ["analyze", str(model), "--method", "ablation,bi", "--samples", "8"]
    result["analyze_alone"] = _run([python, "-m", "surgery", *analyze, "--out", str(alone), *on], log, 90, env)
    result["analyze_torchrun"] = _run([python, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "surgery", *analyze,
                                       "--out", str(launched)], log, 90, env)
    try:
        values = [json.loads((folder / "analysis.json").read_text()) for folder in (alone, launched)]
        result["analyze_torchrun"]["same_analysis_json_scores"] = values[0].get("scores") == values[1].get("scores")
    except (OSError, ValueError) as error:
        result["analyze_torchrun"]["compare"] = f"{type(error).__name__}: {error}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a small model (to try the script on a CPU)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--cli", action="store_true", help="check 4: the CLI end to end on the device")
    parser.add_argument("--only-cli", action="store_true", help="check 4 alone")
    parser.add_argument("--tokenizer", type=Path, help="folder with SmolLM2's tokenizer.json and config.json (check 4)")
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("SURGERY_DATA_DIR"), help="the shared datasets (check 4)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "small": args.small,
              "torch": torch.__version__}
    started = time.perf_counter()
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        checks = [("qlora_gradients", lambda: qlora_gradients(args.small, device, Path(work) / "q")),
                  ("coalition_batching", lambda: batching_timings(args.small, device)),
                  ("layerwise", lambda: layerwise_against_memory(args.small, device, Path(work)))]
        if args.only_cli:
            checks = []
        if args.cli or args.only_cli:  # second: the device's time may run out before the timings
            checks.insert(1, ("cli", lambda: cli_checks(args.small, device, Path(work) / "cli", args.tokenizer, args.data_dir, out)))
        name = "gpu_check.json" if device == "cuda" else "gpu_check_cpu_trial.json"
        for check_name, check in checks:
            clock = time.perf_counter()
            try:
                report[check_name] = {**check(), "seconds": time.perf_counter() - clock}
            except Exception as error:  # one failed check must not hide the others' results
                report[check_name] = {"ran": False, "error": f"{type(error).__name__}: {error}"}
            print(check_name, json.dumps(report[check_name])[:400], flush=True)
            report["seconds"] = time.perf_counter() - started
            (out / name).write_text(json.dumps(report, indent=2) + "\n")  # after each check: a run cut short keeps the rest
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
