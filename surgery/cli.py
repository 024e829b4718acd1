"""The `surgery` command line: parses options, calls the library, prints. No algorithms live here.

Heavy libraries are imported inside the commands, so `surgery --help` stays fast.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from surgery import __version__
from surgery.errors import SurgeryError
from surgery.export_gguf import DTYPES as GGUF_TYPES


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The loading options every command that takes a MODEL shares."""
    options = [
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                     help="Weights dtype ('auto': as stored)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)."),
        click.option("--device-map", default=None, help="'auto' to spread a model larger than one GPU over all of them."),
        click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights, which can run code when loaded."),
        click.option("--trust-remote-code", is_flag=True, help="Run modeling code shipped with the model (off by default)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the shared model options out of a command's kwargs."""
    return {name: kwargs.pop(name) for name in ("dtype", "device", "device_map", "allow_pickle", "trust_remote_code")}


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """A SurgeryError (or a full disk) becomes one red line on stderr and exit code 2; Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from surgery.console import console, offline_defaults, plain_progress

        offline_defaults()
        plain_progress()
        try:
            return command(*args, **kwargs)
        except SurgeryError as error:
            console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)
        except OSError as error:  # a full disk can strike any step that writes (healing copies, caches)
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" while writing {error.filename}" if error.filename else ""
            console.print(f"[bold red]error:[/] no space left on the device{where}: free some space or write elsewhere", soft_wrap=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="surgery")
def main() -> None:
    """Score, remove and heal the sublayers of decoder-only LLMs; export checkpoints that load anywhere.

    MODEL is a model folder, a .gguf file, a Hub id (org/name[@revision]) or the built-in
    smollm2-135m. Sublayers are named L12.attn, L12.mlp, L12 (the whole block), 0-based; ranges
    such as L20-L23 run in residual-stream order.
    """


@main.command()
@click.argument("model")
@click.option("--remove", "remove", required=True, help="Sublayers to remove, e.g. 'L20-L23,L5.attn'.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the new checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@model_options
@handle_errors
def cut(model: str, remove: str, out: Path, force: bool, **kwargs: Any) -> None:
    """Physically remove sublayers and export a verified, smaller checkpoint."""
    from surgery.pipeline import cut_and_export

    result = cut_and_export(model, remove, out, force=force, **load_options(kwargs))
    from surgery.console import console

    console.print(f"[green]wrote[/] {result.path}  (verified: max |Δlogit| {result.max_logit_diff:.2g}, loads via {result.loader})")


@main.command()
@click.argument("model")
@model_options
@handle_errors
def info(model: str, **kwargs: Any) -> None:
    """Show a model's architecture, blocks and parameter count."""
    from surgery.pipeline import describe_model

    describe_model(model, **load_options(kwargs))


def _names(value: str | None) -> tuple[str, ...]:
    if value is None or value.strip().lower() in ("", "none"):
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def eval_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Evaluation options shared by `eval` and `prune` (which evaluates before and after)."""
    options = [
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="Folder of <task>_<split>.jsonl[.gz] files (default: $SURGERY_DATA_DIR)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Items per task (the first N; default all)."),
        click.option("--num-fewshot", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--seed", type=int, default=1234, show_default=True),
        click.option("--ppl", default="wikitext2,c4", show_default=True,
                     help="Perplexity corpora: wikitext2, c4, or .txt/.jsonl/.parquet files; 'none' to skip."),
        click.option("--ppl-context", type=click.IntRange(min=8), default=512, show_default=True),
        click.option("--ppl-windows", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--ppl-stride", type=click.IntRange(min=1), default=None, help="Default: the context (no overlap)."),
        click.option("--text-field", default=None, help="Field holding the text in .jsonl/.parquet files."),
        click.option("--speed/--no-speed", default=True, show_default=True, help="Measure prefill/decode speed and memory."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def eval_settings(kwargs: dict[str, Any], tasks: str | None) -> Any:
    """Pop the evaluation options out of a command's kwargs into EvalSettings."""
    from surgery.data import resolve_data_dir
    from surgery.evaluate import EvalSettings
    from surgery.evaluate.perplexity import PerplexityProtocol

    return EvalSettings(
        tasks=_names(tasks), limit=kwargs.pop("limit"), num_fewshot=kwargs.pop("num_fewshot"),
        batch_size=kwargs.pop("batch_size"), seed=kwargs.pop("seed"), perplexity=_names(kwargs.pop("ppl")),
        perplexity_protocol=PerplexityProtocol(context=kwargs.pop("ppl_context"), windows=kwargs.pop("ppl_windows"),
                                               stride=kwargs.pop("ppl_stride")),
        speed=kwargs.pop("speed"), data_dir=resolve_data_dir(kwargs.pop("data_dir")), text_field=kwargs.pop("text_field"),
    )


@main.command(name="eval")
@click.argument("model")
@click.option("--tasks", default="boolq,piqa,winogrande,arc_easy,arc_challenge,openbookqa", show_default=True,
              help="lm-eval task or group names, comma-separated; 'none' to skip.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the results JSON here.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@eval_options
@model_options
@click.pass_context
@handle_errors
def eval_command(ctx: click.Context, model: str, tasks: str, out: Path | None, force: bool, **kwargs: Any) -> None:
    """Task accuracy (lm-eval), perplexity, speed and memory of a model."""
    from surgery.console import console
    from surgery.evaluate.table import comparison_table
    from surgery.pipeline import evaluate_and_save

    default_window = ctx.get_parameter_source("ppl_context") == click.core.ParameterSource.DEFAULT
    settings = eval_settings(kwargs, tasks)
    results = evaluate_and_save(model, settings, out, force=force, fit_context=default_window, **load_options(kwargs))
    console.print(comparison_table({model: results}, title=f"surgery eval {model}"))
    if out:
        console.print(f"[green]wrote[/] {out}")


def analysis_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """How sublayers are scored; shared by `analyze` and `prune` (which analyzes when it must)."""
    options = [
        click.option("--metric", type=click.Choice(["loss", "acc"]), default="loss", show_default=True,
                     help="loss: -mean token loss on calibration text (fast); acc: accuracy on --task."),
        click.option("--task", "metric_task", default=None, help="lm-eval task for --metric acc."),
        click.option("--task-limit", type=click.IntRange(min=1), default=None, help="Items of --task per evaluation."),
        click.option("--calibration", default="c4", show_default=True, help="c4, or a .txt/.jsonl/.parquet file."),
        click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Calibration sequences."),
        click.option("--seq-len", type=click.IntRange(min=8), default=256, show_default=True, help="Tokens per calibration sequence."),
        click.option("--estimator", type=click.Choice(["neighbourhood", "permutation", "exact"]), default="neighbourhood",
                     show_default=True, help="Shapley estimator."),
        click.option("--max-removed", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Truncation: coalitions with at most this many sublayers removed."),
        click.option("--permutations", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Removal orders for --estimator permutation."),
        click.option("--budget", default=None, help="Stop after this many evaluations (200) or this long (30m); partial results are marked."),
        click.option("--no-prefix-cache", is_flag=True, help="Evaluate every coalition from the embeddings (slower; for comparison)."),
        click.option("--coalition-batch", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Coalitions that resume at the same sublayer run as one batch, up to this many (0: 4 on a GPU, 1 on a CPU)."),
        click.option("--collapse-fraction", type=float, default=0.25, show_default=True,
                     help="Cornerstone rule: removing it alone goes this far from the model's loss to a uniform guess."),
        click.option("--share-factor", type=float, default=5.0, show_default=True,
                     help="Cornerstone rule: a Shapley share this many times the mean."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def analysis_settings(kwargs: dict[str, Any], methods: str, seed: int, data_dir: Any, batch_size: int, text_field: str | None) -> Any:
    """Pop the analysis options out of a command's kwargs into AnalysisSettings."""
    from surgery.analysis import AnalysisSettings
    from surgery.data import resolve_data_dir
    from surgery.pipeline import parse_budget

    budget_evaluations, budget_seconds = parse_budget(kwargs.pop("budget"))
    return AnalysisSettings(
        methods=_names(methods), metric=kwargs.pop("metric"), task=kwargs.pop("metric_task"), limit=kwargs.pop("task_limit"),
        calibration=kwargs.pop("calibration"), samples=kwargs.pop("samples"), seq_len=kwargs.pop("seq_len"),
        batch_size=batch_size, estimator=kwargs.pop("estimator"), max_removed=kwargs.pop("max_removed"),
        permutations=kwargs.pop("permutations"), seed=seed, budget_evaluations=budget_evaluations,
        budget_seconds=budget_seconds, prefix_cache=not kwargs.pop("no_prefix_cache"),
        coalition_batch=kwargs.pop("coalition_batch"),
        data_dir=resolve_data_dir(data_dir), text_field=text_field,
        collapse_fraction=kwargs.pop("collapse_fraction"), share_factor=kwargs.pop("share_factor"),
    )


@main.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for analysis.json, plots and analysis.md.")
@click.option("--method", "methods", default="shapley,ablation,angular,bi", show_default=True,
              help="Any of shapley, ablation, angular, bi (ShortGPT Block Influence).")
@analysis_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Default: $SURGERY_DATA_DIR.")
@click.option("--text-field", default=None, help="Field holding the text in .jsonl/.parquet files.")
@click.option("--force", is_flag=True,
              help="Start over in an --out that holds another analysis or results this run leaves out (discards them).")
@model_options
@handle_errors
def analyze(model: str, out: Path, methods: str, batch_size: int, seed: int, data_dir: Path | None, text_field: str | None,
            force: bool, **kwargs: Any) -> None:
    """Score every attention and FFN/MoE sublayer and find the cornerstones."""
    from surgery.console import console
    from surgery.pipeline import analyze_and_save
    from surgery.report import analysis_tables

    settings = analysis_settings(kwargs, methods, seed, data_dir, batch_size, text_field)
    command = "surgery " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("surgery") else None
    analysis = analyze_and_save(model, settings, out, force=force, command=command, **load_options(kwargs))
    for table in analysis_tables(analysis):
        console.print(table)
    state = "complete" if analysis["complete"] else "[yellow]partial (budget reached; rerun to continue)[/]"
    console.print(f"[green]wrote[/] {out}/analysis.json, analysis.md and plots ({state})")


@main.command(context_settings={"show_default": True})
@click.argument("model", required=False)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for the pruned checkpoint (required).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="YAML recipe; command-line options override it.")
@click.option("--strategy", type=click.Choice(["shapley", "ablation", "bi", "last", "random", "angular", "iterative"]),
              default="bi", help="How to choose what to remove (docs/pruning.md; the default measured best, docs/results.md).")
@click.option("--granularity", type=click.Choice(["block", "sublayer"]), default="block",
              help="Remove whole blocks, or attention and FFN sublayers separately.")
@click.option("--remove", default="25%", help="A count of units (8), a share of decoder parameters (25%) or ids (L20-L23).")
@click.option("--keep-cornerstones/--no-keep-cornerstones", default=False, help="Never remove a cornerstone found by the analysis.")
@click.option("--protect", default=None, help="Sublayers never to remove, e.g. L0.attn,L1.mlp.")
@click.option("--analysis", "analysis_dir", type=click.Path(path_type=Path), default=None,
              help="Analysis folder to reuse or write (default: a cache folder keyed by model, data and settings).")
@click.option("--bridge/--no-bridge", default=True,
              help="Fold a least-squares linear map across each cut into the layer before it (docs/pruning.md).")
@click.option("--bridge-samples", type=click.IntRange(min=1), default=128, help="Calibration sequences for the bridges.")
@click.option("--iterative-candidates", type=click.IntRange(min=1), default=16,
              help="iterative: units re-scored after each removal (the best of the previous step).")
@click.option("--heal/--no-heal", default=False, help="Heal with (Q)LoRA on C4 after cutting.")
@click.option("--heal-steps", type=click.IntRange(min=1), default=100)
@click.option("--heal-tokens", type=click.IntRange(min=1), default=None, help="Training tokens instead of --heal-steps.")
@click.option("--heal-seq-len", type=click.IntRange(min=8), default=256)
@click.option("--heal-batch-size", type=click.IntRange(min=1), default=4)
@click.option("--heal-grad-accum", type=click.IntRange(min=1), default=1)
@click.option("--heal-lr", type=float, default=2e-4)
@click.option("--heal-save-steps", type=click.IntRange(min=1), default=50,
              help="Steps between healing checkpoints (an interrupted run resumes from the last one).")
@click.option("--heal-data", default="c4", help="c4 (data directory, or the Hub online) or a text file.")
@click.option("--heal-distill", type=click.FloatRange(0, 1), default=0.0,
              help="Weight of the KL to the dense model's next-token distribution in the healing loss (0: plain LM loss).")
@click.option("--lora-r", type=click.IntRange(min=1), default=16)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=32)
@click.option("--lora-dropout", type=click.FloatRange(0, 1), default=0.05)
@click.option("--lora-targets", default=None, help="Module names for LoRA (default: the family's, see surgery/arch.py).")
@click.option("--quantize/--no-quantize", default=True, help="QLoRA on a 4-bit NF4 base, or LoRA on full precision.")
@click.option("--heal-device-map", default=None, help="'auto' spreads the 4-bit base over several GPUs.")
@click.option("--eval-tasks", default="arc_easy,piqa,boolq,winogrande,arc_challenge,openbookqa", help="lm-eval tasks before and after; 'none' to skip.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="Items per task.")
@click.option("--eval-ppl", default="wikitext2,c4", help="Perplexity corpora before and after; 'none' to skip.")
@click.option("--eval-ppl-windows", type=click.IntRange(min=1), default=64)
@click.option("--eval-speed/--no-eval-speed", default=True)
@analysis_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Sequences per forward pass (analysis, evaluation).")
@click.option("--seed", type=int, default=0)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Default: $SURGERY_DATA_DIR.")
@click.option("--text-field", default=None)
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--keep-work", is_flag=True, help="Keep the working folder (healing checkpoints, adapter).")
@model_options
@click.pass_context
@handle_errors
def prune(ctx: click.Context, **kwargs: Any) -> None:
    """Choose, remove and heal sublayers; export a verified checkpoint with a model card and report."""
    from surgery.console import console
    from surgery.evaluate.table import comparison_table

    if kwargs.get("recipe"):
        from surgery.recipe import apply_recipe

        kwargs.update(apply_recipe(ctx, kwargs["recipe"]))
    settings = prune_settings(kwargs)
    from surgery.prune import prune as run_prune

    report = run_prune(settings)
    console.print(comparison_table(report["evaluations"], title="before and after"))
    if "healing" in report:
        healing = report["healing"]
        console.print(f"healing: held-out loss {healing['loss_before']:.4f} -> {healing['loss_after']:.4f}")
    console.print(f"[green]wrote[/] {report['export']['path']} (verified; report.md, README.md model card, surgery.json)")


def prune_settings(kwargs: dict[str, Any]) -> Any:
    """Turn the prune command's options (after the recipe) into PruneSettings."""
    from surgery.heal import HealSettings
    from surgery.prune import PruneSettings

    if not kwargs.get("model"):
        raise SurgeryError("no MODEL: give one on the command line or as 'model:' in the recipe")
    if not kwargs.get("out"):
        raise SurgeryError("no --out folder: give one on the command line or as 'out:' in the recipe")
    analysis = analysis_settings(kwargs, "shapley,ablation", kwargs["seed"], kwargs["data_dir"], kwargs["batch_size"],
                                 kwargs["text_field"])
    from surgery.evaluate import EvalSettings
    from surgery.evaluate.perplexity import PerplexityProtocol

    evaluation = EvalSettings(tasks=_names(kwargs["eval_tasks"]), limit=kwargs["eval_limit"], batch_size=kwargs["batch_size"],
                              seed=kwargs["seed"], perplexity=_names(kwargs["eval_ppl"]),
                              perplexity_protocol=PerplexityProtocol(windows=kwargs["eval_ppl_windows"]),
                              speed=kwargs["eval_speed"], data_dir=analysis.data_dir, text_field=kwargs["text_field"])
    healing = HealSettings(
        steps=kwargs["heal_steps"], tokens=kwargs["heal_tokens"], seq_len=kwargs["heal_seq_len"],
        batch_size=kwargs["heal_batch_size"], grad_accum=kwargs["heal_grad_accum"], learning_rate=kwargs["heal_lr"],
        save_steps=kwargs["heal_save_steps"],
        lora_r=kwargs["lora_r"], lora_alpha=kwargs["lora_alpha"], lora_dropout=kwargs["lora_dropout"],
        target_modules=_names(kwargs["lora_targets"]) or None, quantize=kwargs["quantize"], data=kwargs["heal_data"],
        device_map=kwargs["heal_device_map"], seed=kwargs["seed"], distill=kwargs["heal_distill"],
    )
    command = "surgery " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("surgery") else None
    return PruneSettings(
        model=kwargs["model"], out=Path(kwargs["out"]), strategy=kwargs["strategy"], granularity=kwargs["granularity"],
        remove=kwargs["remove"], keep_cornerstones=kwargs["keep_cornerstones"], protect=kwargs["protect"], heal=kwargs["heal"],
        analysis_dir=kwargs["analysis_dir"], iterative_candidates=kwargs["iterative_candidates"], seed=kwargs["seed"],
        bridge=kwargs["bridge"], bridge_samples=kwargs["bridge_samples"],
        force=kwargs["force"], keep_work=kwargs["keep_work"], load=load_options(kwargs), analysis=analysis,
        evaluation=evaluation, healing=healing, command=command,
    )


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The .gguf file to write.")
@click.option("--type", "dtype", type=click.Choice(GGUF_TYPES), default="f16", show_default=True,
              help="Tensor type of the weight matrices (norms and biases stay f32).")
@click.option("--tokenizer-pre", default=None,
              help="llama.cpp's pre-tokenizer name (llama-bpe, qwen2, ...), where tokenizer.json does not tell it.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@handle_errors
def gguf(folder: Path, out: Path, dtype: str, tokenizer_pre: str | None, force: bool) -> None:
    """Write a block-pruned checkpoint (or any Llama/Mistral/Qwen2/Qwen3 folder) as one GGUF file for llama.cpp."""
    from surgery.console import console
    from surgery.export_gguf import export_gguf

    result = export_gguf(folder, out, dtype=dtype, tokenizer_pre=tokenizer_pre, force=force)
    console.print(f"[green]wrote[/] {result.path}  ({result.architecture}, {result.tensors} tensors, {result.bytes / 2**20:.1f} MiB; "
                  f"verified with transformers' GGUF reader: max |Δlogit| {result.max_abs_logit_diff:.2g}, "
                  f"max KL {result.max_kl:.2g}; "
                  f"tokenizer from {result.tokenizer_from})")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="USER/NAME on the Hugging Face Hub.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded; send nothing.")
@handle_errors
def push(folder: Path, repo_id: str, private: bool, dry_run: bool) -> None:
    """Publish a verified export (with its model card) to the Hugging Face Hub."""
    from rich.table import Table

    from surgery.console import console
    from surgery.hub import plan_push
    from surgery.hub import push as upload

    plan = plan_push(folder, repo_id, private, needs_hub=not dry_run)
    table = Table(title=f"{'would upload' if dry_run else 'uploading'} to {repo_id} ({'private' if private else 'public'})")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for name, size in plan.files:
        table.add_row(name, f"{size:,}")
    table.add_row("total", f"{plan.total_bytes:,}")
    console.print(table)
    if dry_run:
        click.echo("\n".join(name for name, _ in plan.files))
        return
    console.print(f"[green]uploaded[/] {upload(plan)}")
