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
from surgery.settings import AnalysisSettings, CutSettings, EvalSettings, LoadSettings


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


def cut_and_export(model_spec: str, remove: str, out: Path, load: LoadSettings, settings: CutSettings | None = None, *,
                   force: bool = False) -> Any:
    """`surgery cut`: remove sublayers physically and write a verified checkpoint, in memory or, for
    a model that does not fit (or with --stream), streamed file to file (surgery.export.streamed)."""
    from surgery.cut import validate_removal
    from surgery.files import check_output_folder, claimed_folder
    from surgery.sublayers import parse_sublayers

    settings = settings or CutSettings()
    units = parse_sublayers(remove)
    source = resolve_with_output_check(model_spec, lambda protected: check_output_folder(out, force=force, protected=protected), load)
    validate_removal(units, _config_layers(source.path))
    streamed = _streams(source.path, settings, load)
    with claimed_folder(out, force=force, protected=[source.path]):
        cutter = _cut_streamed if streamed else _cut_in_memory
        return cutter(source, units, out, load, settings, force)


def _streams(folder: Path, settings: CutSettings, load: LoadSettings) -> bool:
    """--stream / --no-stream as given; otherwise stream a safetensors model that does not fit in memory."""
    from surgery.export.streamed import NOT_SAFETENSORS, available_memory, fits_in_memory
    from surgery.shards import weight_files

    if settings.stream:
        if load.device_map:
            raise SurgeryError("--device-map places a whole model in memory; the streamed cut runs block by block: "
                               "drop --device-map, or pass --no-stream")
        weight_files(folder, NOT_SAFETENSORS)  # safetensors or a one-line error, before --out is claimed
    if settings.stream is not None:
        return settings.stream
    weights = list(folder.glob("*.safetensors"))
    if load.device_map or not weights:
        return False
    size, available = sum(p.stat().st_size for p in weights), available_memory()
    if fits_in_memory(size, available):
        return False
    from surgery.console import console

    console.print(f"streaming the cut file to file: the model ({size / 2**30:.1f} GiB) does not fit in memory "
                  f"({available / 2**30:.1f} GiB available); --no-stream to cut it in memory anyway")
    return True


def _cut_in_memory(source: Any, units: list, out: Path, load: LoadSettings, settings: CutSettings, force: bool) -> Any:
    from surgery.cut import cut
    from surgery.export.checkpoint import export_checkpoint
    from surgery.loading import load_model

    loaded = load_model(source, **load.kwargs())
    result = cut(loaded.model, units)
    return export_checkpoint(loaded.model, loaded.tokenizer, out, force=force, protected=[source.path], copy_from=source.path,
                             max_shard_size=settings.max_shard_bytes, **_cut_record(result, source))


def _cut_streamed(source: Any, units: list, out: Path, load: LoadSettings, settings: CutSettings, force: bool) -> Any:
    from surgery.export.streamed import export_streamed_cut, prepare_streamed_cut
    from surgery.loading import load_tokenizer, resolve_device

    device = resolve_device(load.device)
    prepared = prepare_streamed_cut(source.path, units, load.dtype)
    tokenizer = load_tokenizer(source.path, load.trust_remote_code)
    return export_streamed_cut(prepared, tokenizer, out, force=force, protected=[source.path], copy_from=source.path,
                               max_shard_size=settings.max_shard_bytes, device=device, **_cut_record(prepared.result, source))


def _cut_record(result: Any, source: Any) -> dict[str, Any]:
    """surgery.json's record of a cut (as published) and the full local record beside it."""
    from surgery.publish import LOCAL_RECORD, published
    from surgery.source import cache_dir
    from surgery.sublayers import format_sublayers

    record = {
        "removed": [str(u) for u in result.removed],
        "removed_compact": format_sublayers(result.removed),
        "kept_layers": result.kept_layers,
        "source": source.describe(),
        "parameters": {"before": result.parameters_before, "after": result.parameters_after,
                       "removed": result.parameters_before - result.parameters_after},
    }
    labels = {str(source.path): source.public_id(), str(cache_dir()): "<surgery cache>"}
    return {"record": published(record, labels), "unpublished": (LOCAL_RECORD,),
            "extra_files": {LOCAL_RECORD: json.dumps(record, indent=2) + "\n"}}


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
