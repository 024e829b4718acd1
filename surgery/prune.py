"""`surgery prune`: evaluate, analyze, plan, cut, heal, evaluate again, export with card and report.

The one workflow that uses every module; each step is a call into the module that owns it.
Everything that can be checked before the slow steps (paths, ids, data, recipe values) is
checked first, so bad input fails in seconds and writes nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError


@dataclass
class PruneSettings:
    model: str
    out: Path
    strategy: str = "bi"  # the best at 25% in bench/strategies.py (docs/results.md)
    granularity: str = "block"
    remove: str = "25%"
    keep_cornerstones: bool = False
    bridge: bool = True  # fold a least-squares linear bridge across each cut run (surgery.bridge)
    bridge_samples: int = 128  # calibration sequences the bridges are fitted on
    protect: str | None = None
    heal: bool = False
    analysis_dir: Path | None = None
    iterative_candidates: int = 16
    seed: int = 0
    force: bool = False
    keep_work: bool = False
    load: dict[str, Any] = field(default_factory=dict)
    analysis: Any = None  # AnalysisSettings
    evaluation: Any = None  # EvalSettings
    healing: Any = None  # HealSettings
    command: str | None = None

    def describe(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("analysis", "evaluation", "healing", "load")}
        data["out"] = str(self.out)
        data["analysis_dir"] = str(self.analysis_dir) if self.analysis_dir else None
        data["load"] = self.load
        data["analysis"] = self.analysis.describe() if self.analysis else None
        data["evaluation"] = self.evaluation.describe() if self.evaluation else None
        data["healing"] = self.healing.describe() if self.healing and self.heal else None
        return data


def _work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.surgery-work"


@contextmanager
def _working_folder(work: Path, *, keep: bool) -> Iterator[Path]:
    """Removed when the job ends, unless asked to keep it, or a failure leaves healing checkpoints
    that the same command resumes from (said on the terminal, with how to start over)."""
    try:
        yield work
    except BaseException:
        if any((work / "checkpoints").glob("checkpoint-*")):
            from surgery.console import console

            console.print(f"[yellow]kept {work}: the same command resumes healing from its last checkpoint "
                          "(delete the folder to start over)[/]", soft_wrap=True)
        elif not keep:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def _check_data(settings: PruneSettings, needs_calibration: bool) -> None:
    """Missing calibration, healing or evaluation data (or an unknown task) is an error now, not after an hour of work."""
    from surgery.data import CORPORA, find_file
    from surgery.evaluate.tasks import check_task_names
    from surgery.models import hub_reachable

    data_dir = settings.analysis.data_dir
    wanted = []
    if needs_calibration:
        wanted.append((settings.analysis.calibration, "calibration"))
    if settings.heal:
        wanted.append((settings.healing.data, "healing"))
    wanted += [(corpus, "perplexity") for corpus in settings.evaluation.perplexity]
    for source, role in wanted:
        if source in CORPORA:
            stem = CORPORA[source][0]
            if find_file(data_dir, stem) is None and not hub_reachable():
                where = data_dir or "no data directory (pass --data-dir or set SURGERY_DATA_DIR)"
                raise SurgeryError(f"no {source} text for {role}: {stem}.jsonl.gz not in {where}, and the Hub is offline")
        elif not Path(source).expanduser().is_file():
            problem = "is a folder" if Path(source).expanduser().is_dir() else "not found"
            raise SurgeryError(f"{role} file {source} {problem}: give a .txt/.jsonl/.parquet file or one of {', '.join(CORPORA)}")
    check_task_names(settings.evaluation.tasks)


def needed_methods(settings: PruneSettings) -> tuple[str, ...]:
    from surgery.plan import NEEDS_ANALYSIS

    methods = list(NEEDS_ANALYSIS.get(settings.strategy, ()))
    if settings.keep_cornerstones:  # collapse on removal defines a cornerstone; Shapley shares count where computed
        methods.append("ablation")
    return tuple(dict.fromkeys(methods))


def ensure_analysis(loaded: Any, settings: PruneSettings, methods: tuple[str, ...], bar: Any) -> dict[str, Any]:
    """A saved analysis with these methods and settings (reused), or a new one written beside it."""
    from dataclasses import replace

    from surgery.analysis import analysis_key, analyze, calibration_batches, load_analysis, saved_methods
    from surgery.models import cache_dir

    chosen = replace(settings.analysis, methods=methods)
    _, _, digest = calibration_batches(loaded.tokenizer, chosen)
    info = loaded.source.describe()
    key = analysis_key(info["fingerprint"], chosen, digest)
    folder = Path(settings.analysis_dir) if settings.analysis_dir else cache_dir() / "analyses" / key[:24]
    earlier = [m for m in saved_methods(folder) if m not in methods]
    chosen = replace(chosen, methods=(*methods, *earlier))  # a rerun adds to the folder, never drops what it held
    try:
        saved = load_analysis(folder)
        wanted = {k: v for k, v in chosen.describe().items() if k not in ("methods", "budget_evaluations", "budget_seconds", "data_dir")}
        have = {k: saved["settings"].get(k) for k in wanted}
        if saved.get("key") == key and saved.get("complete") and set(methods) <= set(saved["settings"]["methods"]) and have == wanted:
            saved["folder"] = str(folder)
            saved["reused"] = True
            return saved
    except SurgeryError:
        pass
    from surgery.plots import plot_analysis
    from surgery.report import analysis_markdown

    result = analyze(loaded.model, loaded.tokenizer, chosen, folder, model_info=info, progress=bar)
    plots = plot_analysis(result, folder)
    (folder / "analysis.md").write_text(analysis_markdown(result, plots))
    if not result["complete"]:
        raise SurgeryError(f"the analysis in {folder} is partial (budget reached): run surgery prune again to finish it")
    result["folder"] = str(folder)
    result["reused"] = False
    return result


def prune(settings: PruneSettings) -> dict[str, Any]:
    """Run the whole job; returns the report (also written into the exported folder)."""
    from surgery.arch import num_layers
    from surgery.console import console, progress_bar
    from surgery.cut import cut, validate_removal
    from surgery.evaluate import fit_context_to_model
    from surgery.export import check_output_path, export_checkpoint
    from surgery.models import check_device_options, load_model, named_folder, resolve
    from surgery.pipeline import check_analysis_folder
    from surgery.plan import ALL_STRATEGIES, GRANULARITIES, Target, make_plan
    from surgery.provenance import now, versions
    from surgery.sublayers import check_in_range, parse_sublayers

    started = time.perf_counter()
    if settings.strategy not in ALL_STRATEGIES:
        raise SurgeryError(f"unknown strategy '{settings.strategy}': use one of {', '.join(ALL_STRATEGIES)}")
    if settings.granularity not in GRANULARITIES:
        raise SurgeryError(f"unknown granularity '{settings.granularity}': use block or sublayer")
    out = check_output_path(settings.out, force=settings.force, protected=named_folder(settings.model))
    check_device_options(settings.load.get("device"), settings.load.get("device_map"))
    check_device_options(None, settings.healing.device_map)
    target = Target.parse(settings.remove)
    manual = parse_sublayers(settings.protect) if settings.protect else []
    methods = () if target.ids else needed_methods(settings)
    _check_data(settings, needs_calibration=bool(methods) or settings.strategy == "iterative" or settings.bridge)
    source = resolve(settings.model, allow_pickle=settings.load.get("allow_pickle", False))
    check_output_path(out, force=settings.force, protected=[source.path])
    if settings.analysis_dir:  # an analysis inside --out would be replaced by the export
        check_analysis_folder(Path(settings.analysis_dir), force=True, protected=[source.path, out], option="--analysis")
    loaded = load_model(source, **settings.load)
    layers = num_layers(loaded.model)
    check_in_range([*manual, *target.ids], layers)
    if loaded.tokenizer is None:
        raise SurgeryError(f"{settings.model} has no tokenizer: prune needs one for calibration, healing and evaluation")
    settings.evaluation = fit_context_to_model(settings.evaluation, loaded.model.config)  # prune has no --ppl-context
    if settings.heal:
        from surgery.heal import check_lora_targets

        check_lora_targets(loaded.model, settings.healing.target_modules or loaded.arch.lora_targets)

    report: dict[str, Any] = {"schema": "surgery-prune-report", "version": 1, "created": now(),
                              "command": settings.command, "settings": settings.describe(),
                              "source": loaded.source.describe(), "evaluations": {}, "timings": {}}
    work = _work_folder(out)

    def step(text: str) -> None:  # a line per stage: visible in logs too, where live bars are not drawn
        console.print(f"[bold cyan][{time.perf_counter() - started:6.0f}s][/] {text}")

    with _working_folder(work, keep=settings.keep_work), progress_bar() as bar:
        analysis = None
        if methods:
            clock = time.perf_counter()
            step(f"analysis: {', '.join(methods)}")
            analysis = ensure_analysis(loaded, settings, methods, bar)
            report["timings"]["analysis_seconds"] = time.perf_counter() - clock
            report["analysis"] = {"folder": analysis["folder"], "reused": analysis["reused"], "key": analysis["key"],
                                  "cornerstones": analysis.get("cornerstones", [])}
        protected = list(manual)
        if settings.keep_cornerstones and analysis is not None:
            protected += [s for c in analysis.get("cornerstones", []) for s in parse_sublayers(c["id"]) if s not in protected]

        clock = time.perf_counter()
        unit_parameters = _parameter_counter(loaded.model, loaded.arch)
        value_after = _iterative_value(loaded, settings) if settings.strategy == "iterative" and not target.ids else None
        step(f"planning: strategy {settings.strategy}, {settings.granularity} granularity, target {target.describe()}")
        plan_task = bar.add_task("planning", total=None)
        plan = make_plan(settings.strategy, settings.granularity, target, layers, unit_parameters, analysis=analysis,
                         protected=protected, seed=settings.seed, value_after=value_after,
                         candidates=settings.iterative_candidates,
                         progress=lambda done, total: bar.update(plan_task, description=f"planning: {done} units chosen"))
        bar.remove_task(plan_task)
        del value_after  # the iterative evaluator's stream cache is not needed any more
        if analysis is not None and analysis.get("cornerstones"):
            plan.notes.append("cornerstones found by the analysis: " + ", ".join(c["id"] for c in analysis["cornerstones"]))
        if not plan.units:
            raise SurgeryError(f"--remove {settings.remove} is less than one {settings.granularity} of this model: "
                               "give a larger share, or a count such as --remove 1")
        validate_removal(plan.units, layers)  # e.g. every block: fails now, not after the first evaluation
        report["timings"]["plan_seconds"] = time.perf_counter() - clock
        step(f"plan: remove {plan.describe()['removed_compact']} ({100 * plan.fraction:.1f}% of decoder parameters)")

        clock = time.perf_counter()  # after planning: a plan that cannot be met fails before this slow step
        step(f"evaluating the source model ({layers} blocks)")
        report["evaluations"]["source"] = _evaluate("source", loaded.model, loaded.tokenizer, settings, loaded.source.path, bar)
        report["timings"]["evaluate_source_seconds"] = time.perf_counter() - clock

        if settings.bridge:
            clock = time.perf_counter()
            step(f"fitting linear bridges across the cut ({settings.bridge_samples} calibration sequences)")
            report["bridge"] = _bridge(loaded, settings, plan)
            report["timings"]["bridge_seconds"] = time.perf_counter() - clock
        report["plan"] = plan.describe()  # after the bridges, whose notes it carries
        cut_result = cut(loaded.model, plan.units)
        model = loaded.model
        step("evaluating the pruned model")
        report["evaluations"]["pruned"] = _evaluate("pruned", model, loaded.tokenizer, settings, None, bar)

        if settings.heal:
            from surgery.heal import heal

            clock = time.perf_counter()
            distill = f", distilling from the source model (weight {settings.healing.distill:g})" if settings.healing.distill else ""
            step(f"healing: {'QLoRA' if settings.healing.quantize else 'LoRA'}, {settings.healing.steps} steps{distill}")
            device = str(next(model.parameters()).device)
            job = {"source": report["source"]["fingerprint"], "removed": report["plan"]["removed_compact"],
                   "bridge": f"{settings.bridge_samples} sequences" if settings.bridge else "off"}
            healed = heal(model, loaded.tokenizer, settings.healing, work, data_dir=settings.analysis.data_dir,
                          device=device, progress=bar, teacher=loaded.source.path, job=job)
            model = healed.model
            report["healing"] = {"settings": healed.settings, "data_source": healed.data_source,
                                 "loss_before": healed.loss_before, "loss_after": healed.loss_after,
                                 "seconds": healed.seconds, "log": healed.log, "resumed_from": healed.resumed_from}
            report["timings"]["heal_seconds"] = time.perf_counter() - clock
            step(f"held-out loss {healed.loss_before:.4f} -> {healed.loss_after:.4f}; evaluating the healed model")
            report["evaluations"]["healed"] = _evaluate("healed", model, loaded.tokenizer, settings, None, bar)

        report["versions"] = versions()
        report["timings"]["total_seconds"] = time.perf_counter() - started
        record = {"removed": [str(u) for u in plan.units], "removed_compact": report["plan"]["removed_compact"],
                  "kept_layers": cut_result.kept_layers, "source": loaded.source.describe(), "plan": report["plan"],
                  "parameters": {"before": cut_result.parameters_before, "after": cut_result.parameters_after,
                                 "removed": cut_result.parameters_before - cut_result.parameters_after},
                  "healing": report.get("healing", {}).get("settings")}
        step(f"exporting to {out} and verifying the reload")
        export_task = bar.add_task("exporting and verifying", total=None)
        exported = export_checkpoint(model, loaded.tokenizer, out, record=record, force=settings.force,
                                     protected=[source.path], copy_from=source.path,
                                     finalize=lambda folder: _write_report(folder, report, analysis, layers))
        bar.remove_task(export_task)
    report["export"] = {"path": str(exported.path), "max_logit_diff": exported.max_logit_diff, "loader": exported.loader}
    return report


def _evaluate(stage: str, model: Any, tokenizer: Any, settings: PruneSettings, folder: Path | None, bar: Any) -> dict[str, Any]:
    from surgery.evaluate import evaluate_model

    task = bar.add_task(f"evaluating the {stage} model", total=None)
    try:
        return evaluate_model(model, tokenizer, settings.evaluation, model_info={"stage": stage}, folder=folder, progress=bar)
    finally:
        bar.remove_task(task)


def _parameter_counter(model: Any, arch: Any):
    """Parameters of a unit (tuple of sublayers), counted from the modules that would go."""
    from surgery.arch import decoder_layers

    layers = decoder_layers(model, arch)
    cache: dict[tuple[int, str], int] = {}

    def sublayer(layer: int, kind: str) -> int:
        if (layer, kind) not in cache:
            modules = [getattr(layers[layer], name) for name in arch.sublayer_modules(kind)]
            cache[(layer, kind)] = sum(p.numel() for m in modules for p in m.parameters())
        return cache[(layer, kind)]

    return lambda unit: sum(sublayer(s.layer, s.kind) for s in unit)


def _iterative_value(loaded: Any, settings: PruneSettings):
    """v(removed) on the calibration set, through the prefix-cached evaluator on the unpruned model."""
    from surgery.analysis import calibration_batches
    from surgery.scoring.residual import ResidualLoss

    batches, _, _ = calibration_batches(loaded.tokenizer, settings.analysis)
    residual = ResidualLoss(loaded.model, batches)
    return lambda removed: residual.value(frozenset(s.position for s in removed))


def _bridge(loaded: Any, settings: PruneSettings, plan: Any) -> dict[str, Any]:
    """Fold the linear bridges into the dense model before the cut; the plan's notes say what was done."""
    from dataclasses import replace

    from surgery.analysis import calibration_batches
    from surgery.bridge import fit_and_fold

    batches, origin, _ = calibration_batches(loaded.tokenizer, replace(settings.analysis, samples=settings.bridge_samples))
    result = fit_and_fold(loaded.model, plan.units, batches)
    if result.bridges:
        fits = ", ".join(f"{b.run} into {b.into} (closes {100 * b.explained:.0f}% of the stream gap)" for b in result.bridges)
        plan.notes.append(f"linear bridges (least squares on {result.tokens:,} calibration tokens): {fits}")
    plan.notes += [f"no bridge for {line}" for line in result.skipped]
    return {**result.describe(), "calibration": origin}


def _write_report(folder: Path, report: dict[str, Any], analysis: dict[str, Any] | None, layers: int) -> None:
    """report.json, report.md, plots and the model card, written into the export before it is sealed."""
    from surgery.card import model_card
    from surgery.evaluate.speed import files_bytes
    from surgery.plots import ANALYSIS_PLOTS, plot_removal_map
    from surgery.report import prune_markdown

    final = "healed" if "healed" in report["evaluations"] else "pruned"
    speed = report["evaluations"][final].get("speed")
    if speed is not None:
        speed["file_bytes"] = files_bytes(folder)
    plots = {}
    plan = report["plan"]
    plots["removal map"] = plot_removal_map(layers, set(plan["removed"]), set(plan["protected"]), folder / "removal_map.png",
                                            f"{plan['strategy']} ({plan['granularity']}), {100 * plan['fraction_of_decoder_parameters']:.1f}% of decoder parameters").name
    if analysis is not None:  # only the plots of sections this analysis holds (folders written before cleanup existed)
        source_folder = Path(analysis["folder"])
        for name, section in ANALYSIS_PLOTS.items():
            if section in analysis and (source_folder / name).is_file():
                shutil.copy2(source_folder / name, folder / f"analysis_{name}")
                plots[name.removesuffix(".png")] = f"analysis_{name}"
    report["plots"] = plots
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (folder / "report.md").write_text(prune_markdown(report))
    (folder / "README.md").write_text(model_card(report))
