"""Workflows that wire the modules together for the commands: resolve -> cut -> export, and so on.

Each function takes plain arguments, checks everything it can before heavy work starts (so bad
input fails in seconds and writes nothing), and returns a result object for the CLI to print.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError


def _config_layers(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    if "num_hidden_layers" not in config:
        raise SurgeryError(f"{folder}/config.json has no num_hidden_layers: is it a decoder-only LLM?")
    return int(config["num_hidden_layers"])


def _resolve_apart(model_spec: str, check_output: Callable[[list[Path]], Any], load_kwargs: dict[str, Any]) -> Any:
    """Resolve MODEL with the command's output check run against the folder it names before
    resolving (which may convert or download) and against the resolved folder after."""
    from surgery.models import named_folder, resolve

    check_output(named_folder(model_spec))
    source = resolve(model_spec, allow_pickle=load_kwargs.get("allow_pickle", False))
    check_output([source.path])
    return source


def cut_and_export(model_spec: str, remove: str, out: Path, *, force: bool = False, **load_kwargs: Any) -> Any:
    """`surgery cut`: remove sublayers physically and write a verified checkpoint."""
    from surgery.cut import cut, validate_removal
    from surgery.export import check_output_path, export_checkpoint
    from surgery.models import load_model
    from surgery.sublayers import format_sublayers, parse_sublayers

    units = parse_sublayers(remove)
    source = _resolve_apart(model_spec, lambda protected: check_output_path(out, force=force, protected=protected), load_kwargs)
    validate_removal(units, _config_layers(source.path))
    loaded = load_model(source, **load_kwargs)
    result = cut(loaded.model, units)
    record = {
        "removed": [str(u) for u in result.removed],
        "removed_compact": format_sublayers(result.removed),
        "kept_layers": result.kept_layers,
        "source": source.describe(),
        "parameters": {"before": result.parameters_before, "after": result.parameters_after,
                       "removed": result.parameters_before - result.parameters_after},
    }
    return export_checkpoint(loaded.model, loaded.tokenizer, out, record=record, force=force,
                             protected=[source.path], copy_from=source.path)


def describe_model(model_spec: str, **load_kwargs: Any) -> None:
    """`surgery info`: the architecture entry, blocks and parameters of a model."""
    from rich.table import Table

    from surgery.console import console
    from surgery.cut import count_parameters, removed_sublayers
    from surgery.models import load_model
    from surgery.sublayers import format_sublayers

    loaded = load_model(model_spec, with_tokenizer=False, **load_kwargs)
    config = loaded.model.config
    table = Table(title=f"{model_spec}", show_header=False)
    table.add_row("folder", str(loaded.source.path))
    table.add_row("family", config.model_type)
    removed = removed_sublayers(loaded.model)
    table.add_row("blocks", f"{config.num_hidden_layers} (L0-L{config.num_hidden_layers - 1}), "
                            f"{2 * config.num_hidden_layers - len(removed)} sublayers")
    table.add_row("parameters", f"{count_parameters(loaded.model):,}")
    table.add_row("removed sublayers", format_sublayers(removed) if removed else "none")
    table.add_row("dtype / device", f"{loaded.model.dtype} / {loaded.options['device']}")
    console.print(table)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader never sees half a file, a failure leaves the old one."""
    import os
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"{path} is a folder: give a file name for the JSON results")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate_and_save(model_spec: str, settings: Any, out: Path | None, *, force: bool = False, fit_context: bool = False,
                      **load_kwargs: Any) -> dict[str, Any]:
    """`surgery eval`: load, evaluate, write the results JSON. fit_context: the perplexity window
    is the default one, which a model with a shorter context gets shortened."""
    from surgery.evaluate import evaluate_model, fit_context_to_model
    from surgery.export import check_output_file
    from surgery.models import load_model

    if not settings.tasks and not settings.perplexity and not settings.speed:
        raise SurgeryError("nothing to evaluate: give --tasks, --ppl or --speed")
    def check_out(protected: list[Path]) -> None:
        if out is not None:
            check_output_file(out, force=force, protected=protected)

    source = _resolve_apart(model_spec, check_out, load_kwargs)
    loaded = load_model(source, **load_kwargs)
    if fit_context:
        settings = fit_context_to_model(settings, loaded.model.config)
    results = evaluate_model(loaded.model, loaded.tokenizer, settings, model_info=loaded.source.describe(),
                             folder=loaded.source.path)
    if out is not None:
        write_json(out, results)
    return results


def parse_budget(text: str | None) -> tuple[int | None, float | None]:
    """'200' -> 200 evaluations; '90s', '30m', '1.5h' -> seconds."""
    if not text:
        return None, None
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        evaluations, seconds = (None, float(text[:-1]) * units[text[-1]]) if text[-1] in units else (int(text), None)
    except ValueError:
        raise SurgeryError(f"--budget '{text}' is not a number of evaluations (200) or a time (90s, 30m, 1.5h)") from None
    if not (evaluations or 0) > 0 and not (seconds or 0) > 0:
        raise SurgeryError(f"--budget '{text}' allows no work: give a positive number of evaluations or a time")
    return evaluations, seconds


def check_analysis_folder(out: Path, force: bool, protected: list[Path] = (), option: str = "--out") -> None:
    """An analysis folder is resumed, so it may hold an analysis; it must not be, hold or lie in a
    source model (or the checkpoint a prune writes)."""
    from surgery.analysis import EVALUATIONS_FILE
    from surgery.export import check_apart

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"{option} {out} is a file: give a folder for the analysis")
    check_apart(out, protected, option)
    if out.is_dir() and any(out.iterdir()) and not (out / EVALUATIONS_FILE).exists() and not force:
        raise SurgeryError(f"{option} {out} exists and is not an analysis folder: choose a new folder or pass --force")


def analyze_and_save(model_spec: str, settings: Any, out: Path, *, force: bool = False, command: str | None = None,
                     **load_kwargs: Any) -> dict[str, Any]:
    """`surgery analyze`: load, score, write analysis.json, plots and analysis.md into `out`."""
    from surgery.analysis import analyze
    from surgery.models import load_model
    from surgery.plots import plot_analysis
    from surgery.report import analysis_markdown

    if not settings.methods:
        raise SurgeryError("no method to run: give --method with any of shapley, ablation, angular, bi")
    source = _resolve_apart(model_spec, lambda protected: check_analysis_folder(out, force, protected=protected), load_kwargs)
    loaded = load_model(source, **load_kwargs)
    analysis = analyze(loaded.model, loaded.tokenizer, settings, out, model_info=loaded.source.describe(), force=force)
    plots = plot_analysis(analysis, Path(out))
    (Path(out) / "analysis.md").write_text(analysis_markdown(analysis, plots, command))
    return analysis
