"""The `surgery` command line: parses options, calls the library, prints. No algorithms live here.

Heavy libraries are imported inside the commands, so `surgery --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from surgery import __version__
from surgery.errors import SurgeryError

_MODEL_HELP = "A model folder, a .gguf file, a Hub id (org/name[@revision]) or the built-in 'smollm2-135m'."


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
    """A SurgeryError becomes one red line on stderr and exit code 2; Ctrl-C exits 130."""

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

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="surgery")
def main() -> None:
    """Score, remove and heal the sublayers of decoder-only LLMs; export checkpoints that load anywhere.

    Sublayers are named L12.attn, L12.mlp, L12 (the whole block), 0-based; ranges such as L20-L23
    run in residual-stream order.
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
@eval_options
@model_options
@handle_errors
def eval_command(model: str, tasks: str, out: Path | None, **kwargs: Any) -> None:
    """Task accuracy (lm-eval), perplexity, speed and memory of a model."""
    from surgery.console import console
    from surgery.evaluate.table import comparison_table
    from surgery.pipeline import evaluate_and_save

    settings = eval_settings(kwargs, tasks)
    results = evaluate_and_save(model, settings, out, **load_options(kwargs))
    console.print(comparison_table({model: results}, title=f"surgery eval {model}"))
    if out:
        console.print(f"[green]wrote[/] {out}")
