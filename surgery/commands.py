"""The commands other than prune (surgery/prune.py): each resolves MODEL, checks its output, loads,
calls the library and writes its result. The CLI parses options into settings and calls these.

Everything checkable before loading is checked first, so bad input fails in seconds and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.settings import AnalysisSettings, EvalSettings, ExportSettings, LoadSettings


def resolve_with_output_check(model_spec: str, check_output: Callable[[list[Path]], Any], load: LoadSettings) -> Any:
    """Resolve MODEL, with the command's output check run against the folder MODEL names before
    resolving (which may convert or download) and against the resolved folder after."""
    from surgery.source import named_folder, resolve

    check_output(named_folder(model_spec))
    source = resolve(model_spec, allow_pickle=load.allow_pickle)
    check_output([source.path])
    return source


def _config_layers(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    if "num_hidden_layers" not in config:
        raise SurgeryError(f"{folder}/config.json has no num_hidden_layers: is it a decoder-only LLM?")
    return int(config["num_hidden_layers"])


def cut_and_export(model_spec: str, remove: str, out: Path, load: LoadSettings, *, force: bool = False,
                   export: ExportSettings = ExportSettings()) -> Any:
    """`surgery cut`: remove sublayers physically and write a verified checkpoint in `export.format`."""
    from surgery.cut import cut, validate_removal
    from surgery.export.checkpoint import export_checkpoint
    from surgery.export.nemotron import check_export_source
    from surgery.files import check_output_folder, claimed_folder
    from surgery.loading import load_model
    from surgery.sublayers import format_sublayers, parse_sublayers

    units = parse_sublayers(remove)
    source = resolve_with_output_check(model_spec, lambda protected: check_output_folder(out, force=force, protected=protected), load)
    validate_removal(units, _config_layers(source.path))
    check_export_source(source.path, export.format)
    with claimed_folder(out, force=force, protected=[source.path]):
        loaded = load_model(source, **load.kwargs())
        result = cut(loaded.model, units)
        record = {
            "removed": [str(u) for u in result.removed],
            "removed_compact": format_sublayers(result.removed),
            "kept_layers": result.kept_layers,
            "source": source.describe(),
            "parameters": {"before": result.parameters_before, "after": result.parameters_after,
                           "removed": result.parameters_before - result.parameters_after},
        }
        from surgery.publish import LOCAL_RECORD, published
        from surgery.source import cache_dir

        labels = {str(source.path): source.public_id(), str(cache_dir()): "<surgery cache>"}
        return export_checkpoint(loaded.model, loaded.tokenizer, out, record=published(record, labels), force=force,
                                 protected=[source.path], copy_from=source.path, unpublished=(LOCAL_RECORD,),
                                 extra_files={LOCAL_RECORD: json.dumps(record, indent=2) + "\n"}, layout=export.format)


def describe_model(model_spec: str, load: LoadSettings) -> None:
    """`surgery info`: the architecture entry, blocks and parameters of a model."""
    from rich.table import Table

    from surgery.console import console
    from surgery.cut import removed_sublayers
    from surgery.forward import count_parameters
    from surgery.loading import load_model
    from surgery.sublayers import format_sublayers

    loaded = load_model(model_spec, with_tokenizer=False, **load.kwargs())
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


def evaluate_and_save(model_spec: str, settings: EvalSettings, out: Path | None, load: LoadSettings, *, force: bool = False,
                      fit_context: bool = False) -> dict[str, Any]:
    """`surgery eval`: load, evaluate, write the results JSON. fit_context: the perplexity window
    is the default one, which a model with a shorter context gets shortened."""
    from surgery.evaluate import evaluate_model, fit_context_to_model
    from surgery.evaluate.tasks import check_task_names
    from surgery.files import check_output_file, write_json
    from surgery.loading import load_model

    if not settings.tasks and not settings.perplexity and not settings.speed:
        raise SurgeryError("nothing to evaluate: give --tasks, --ppl or --speed")
    check_task_names(settings.tasks)

    def check_out(protected: list[Path]) -> None:
        if out is not None:
            check_output_file(out, force=force, protected=protected)

    source = resolve_with_output_check(model_spec, check_out, load)
    loaded = load_model(source, **load.kwargs())
    if fit_context:
        settings = fit_context_to_model(settings, loaded.model.config)
    results = evaluate_model(loaded.model, loaded.tokenizer, settings, model_info=loaded.source.describe(),
                             folder=loaded.source.path)
    if out is not None:
        write_json(out, results)
    return results


def analyze_and_save(model_spec: str, settings: AnalysisSettings, out: Path, load: LoadSettings, *, force: bool = False,
                     command: str | None = None) -> Any:
    """`surgery analyze`: load, score, write analysis.json, plots and analysis.md into `out`."""
    from dataclasses import replace

    from surgery.analysis import EVALUATIONS_FILE, analyze, check_dropped_methods
    from surgery.files import check_resumable_folder, output_lock
    from surgery.loading import load_model
    from surgery.report import write_analysis_report
    from surgery.scoring import with_requirements

    settings = replace(settings, methods=with_requirements(settings.methods))
    if not force:
        check_dropped_methods(out, settings.methods)
    check = lambda protected: check_resumable_folder(out, EVALUATIONS_FILE, force=force, protected=protected)  # noqa: E731
    source = resolve_with_output_check(model_spec, check, load)
    with output_lock(out, what=f"the analysis folder {out}"):
        check([source.path])  # again, now that it is held: a run that waited may find it changed
        loaded = load_model(source, **load.kwargs())
        analysis = analyze(loaded.model, loaded.tokenizer, settings, out, model_info=loaded.source.describe(), force=force)
        write_analysis_report(analysis, Path(out), command)
    return analysis
