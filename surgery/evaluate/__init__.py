"""Evaluation: task accuracy (lm-eval), perplexity, speed and memory, on a model object or a MODEL.

`evaluate_model` works on any in-memory model (pruned, healed, wrapped by peft) with no save, so
analysis, pruning and benchmarks use exactly what `surgery eval` reports. Every number is stored
with the protocol that produced it; the schema is documented in docs/evaluation.md.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgery.evaluate.perplexity import PerplexityProtocol
from surgery.evaluate.speed import SpeedProtocol

RESULTS_SCHEMA = "surgery-eval"
RESULTS_VERSION = 1
DEFAULT_TASKS = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
DEFAULT_PERPLEXITY = ("wikitext2", "c4")
_HEADLINE_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc")


@dataclass
class EvalSettings:
    """What to measure and how; stored verbatim in the results as the protocol."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None
    num_fewshot: int = 0
    batch_size: int = 8
    seed: int = 1234
    perplexity: tuple[str, ...] = DEFAULT_PERPLEXITY
    perplexity_protocol: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    speed: bool = True
    speed_protocol: SpeedProtocol = field(default_factory=SpeedProtocol)
    data_dir: Path | None = None
    text_field: str | None = None
    keep_items: bool = False  # store per-item correctness (for paired comparisons)
    items_offset: int = 0  # evaluate items [offset, offset + limit) instead of the first `limit`

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks), "limit": self.limit, "items_offset": self.items_offset, "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size, "seed": self.seed, "data_dir": str(self.data_dir) if self.data_dir else None,
            "perplexity": {"corpora": list(self.perplexity), **self.perplexity_protocol.describe()},
            "speed": asdict(self.speed_protocol) if self.speed else None,
        }


def fit_context_to_model(settings: EvalSettings, config: Any) -> EvalSettings:
    """The default perplexity window shortened to a model trained on fewer positions; the results
    record the length used. A window the user chose is never changed: evaluate_model refuses it."""
    from dataclasses import replace

    trained = _context_overrun(settings, config)
    if trained is None:
        return settings
    return replace(settings, perplexity_protocol=replace(settings.perplexity_protocol, context=trained))


def _context_overrun(settings: EvalSettings, config: Any) -> int | None:
    """The model's trained positions, when the perplexity window is longer than them."""
    trained = getattr(config, "max_position_embeddings", None)
    return trained if trained and settings.perplexity_protocol.context > trained else None


def evaluate_model(model: Any, tokenizer: Any, settings: EvalSettings, *, model_info: dict[str, Any] | None = None,
                   folder: Path | None = None, progress: Any = None) -> dict[str, Any]:
    """Evaluate an in-memory model; returns a results dict in the documented schema."""
    import torch

    from surgery.arch import unwrap
    from surgery.console import progress_bar
    from surgery.cut import count_parameters
    from surgery.provenance import machine, now, versions

    if tokenizer is None and (settings.tasks or settings.perplexity):
        from surgery.errors import SurgeryError

        raise SurgeryError("this model has no tokenizer: evaluate a folder that holds one (tokenizer.json)")
    base = unwrap(model)
    trained = _context_overrun(settings, base.config)
    if settings.perplexity and trained:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"--ppl-context {settings.perplexity_protocol.context} is longer than the model's context "
                           f"({trained} positions): perplexity there measures nothing it learned; give {trained} or less")
    was_training = base.training
    base.eval()
    torch.manual_seed(settings.seed)
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "version": RESULTS_VERSION,
        "created": now(),
        "model": {**(model_info or {}), "parameters": count_parameters(base), "dtype": str(base.dtype).removeprefix("torch."),
                  "device": str(next(base.parameters()).device)},
        "protocol": settings.describe(),
        "tasks": {},
        "perplexity": {},
        "speed": None,
    }
    try:
        with progress_bar(progress) as bar:
            if settings.tasks:
                results["tasks"] = run_tasks(model, tokenizer, settings, bar)
            for corpus in settings.perplexity:
                results["perplexity"][_corpus_key(corpus)] = run_perplexity(model, tokenizer, corpus, settings, bar)
            if settings.speed:
                task = bar.add_task("speed and memory", total=None)
                from surgery.evaluate.speed import measure_speed

                results["speed"] = measure_speed(model, settings.speed_protocol, folder)
                bar.remove_task(task)
    finally:
        base.train(was_training)
    results["versions"] = versions()
    results["machine"] = machine()
    return results


def _corpus_key(corpus: str) -> str:
    from surgery.data import CORPORA

    return corpus if corpus in CORPORA else Path(corpus).name


def run_perplexity(model: Any, tokenizer: Any, corpus: str, settings: EvalSettings, bar: Any) -> dict[str, Any]:
    from surgery.data import load_texts
    from surgery.evaluate.perplexity import perplexity

    texts, origin = load_texts(corpus, role="heldout", data_dir=settings.data_dir, field=settings.text_field)
    protocol = settings.perplexity_protocol
    task = bar.add_task(f"perplexity {_corpus_key(corpus)}", total=protocol.windows)
    try:
        value = perplexity(model, tokenizer, texts, protocol, advance=lambda n: bar.advance(task, n))
    except ValueError as error:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"{origin}: {error}; use a longer text or a smaller --ppl-context") from None
    finally:
        bar.remove_task(task)
    return {**value, "source": origin, "context": protocol.context}


def run_tasks(model: Any, tokenizer: Any, settings: EvalSettings, bar: Any) -> dict[str, Any]:
    """lm-eval on the in-memory model; per task the headline metrics, their standard errors,
    the number of items, the chance level and the data source."""
    return TaskSuite(settings).run(model, tokenizer, bar)


class TaskSuite:
    """lm-eval tasks loaded once (data read, configs fixed) and run on any number of models or
    ablations of one model: the accuracy value function of `surgery analyze` reuses one suite."""

    def __init__(self, settings: EvalSettings) -> None:
        from surgery.evaluate.tasks import load_tasks
        from surgery.models import hub_offline, hub_reachable

        logging.getLogger("lm-eval").setLevel(logging.ERROR)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.settings = settings
        online = not hub_offline() and hub_reachable()
        self.loaded = load_tasks(list(settings.tasks), settings.data_dir, online)
        for task in self.loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0 or settings.num_fewshot == 0:
                task.set_config(key="num_fewshot", value=settings.num_fewshot)
            task.set_fewshot_seed(seed=settings.seed)

    def run(self, model: Any, tokenizer: Any, bar: Any) -> dict[str, Any]:
        import lm_eval

        lm = _progress_lm(model, tokenizer, self.settings.batch_size, bar)
        limit, samples = self.settings.limit, None
        if self.settings.items_offset:
            limit, samples = None, self._item_windows()
        raw = lm_eval.evaluate(lm=lm, task_dict=self.loaded, limit=limit, samples=samples, bootstrap_iters=1000,
                               log_samples=True, verbosity="ERROR")
        return summarise_tasks(raw, self.settings)

    def _item_windows(self) -> dict[str, list[int]]:
        """Items [offset, offset + limit) of each task, clipped to the items the task has, so one
        window can run to the end of tasks of different sizes."""
        from surgery.errors import SurgeryError

        offset, limit = self.settings.items_offset, self.settings.limit
        if limit is None:
            raise SurgeryError("an item offset needs a limit: give both")
        windows = {}
        for name, task in self.loaded["tasks"].items():
            size = len(task.eval_docs)
            if offset >= size:
                raise SurgeryError(f"{name} has {size} items, none from offset {offset}: use a smaller offset")
            windows[name] = list(range(offset, min(offset + limit, size)))
        return windows


def _progress_lm(model: Any, tokenizer: Any, batch_size: int, bar: Any) -> Any:
    """lm-eval's HFLM on the in-memory model, reporting its requests to our progress bar."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class ProgressHook(CacheHook):
        def __init__(self) -> None:
            self.dbdict = None
            self.task = None

        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            if self.task is not None:
                bar.advance(self.task)

    hook = ProgressHook()

    class ProgressHFLM(HFLM):
        def _run(self, method: Any, label: str, requests: list) -> Any:
            hook.task = bar.add_task(f"lm-eval {label}", total=len(requests))
            try:
                return method(requests, disable_tqdm=True)
            finally:
                bar.remove_task(hook.task)
                hook.task = None

        def loglikelihood(self, requests, disable_tqdm=False):
            return self._run(super().loglikelihood, "loglikelihood requests", requests)

        def generate_until(self, requests, disable_tqdm=False):
            return self._run(super().generate_until, "generation requests", requests)

    device = str(next(model.parameters()).device)
    lm = ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    lm.set_cache_hook(hook)
    return lm


def summarise_tasks(raw: dict[str, Any], settings: EvalSettings) -> dict[str, Any]:
    """lm-eval's results -> {task: {metric, metric_stderr, n, chance, ...}}, groups with subtasks."""
    from surgery.evaluate.tasks import chance_level_from_samples

    summary: dict[str, Any] = {}
    subtasks_of = raw.get("group_subtasks", {})
    for name in settings.tasks:
        entry = _metrics(raw["results"].get(name) or raw.get("groups", {}).get(name, {}))
        members = _leaves(name, subtasks_of)
        samples = [s for member in members for s in raw.get("samples", {}).get(member, [])]
        entry["n"] = sum(raw["n-samples"].get(m, {}).get("effective", 0) for m in members)
        entry["chance"], entry["chance_kind"] = chance_level_from_samples(samples)
        entry["source"] = _source(raw, members)
        if members != [name]:
            entry["subtasks"] = {m: {**_metrics(raw["results"].get(m, {})), "n": raw["n-samples"].get(m, {}).get("effective", 0)}
                                 for m in members}
        if settings.keep_items and members == [name]:
            entry["items"] = [float(s.get("acc", s.get("exact_match", 0.0))) for s in sorted(samples, key=lambda s: int(s["doc_id"]))]
        summary[name] = entry
    return summary


def _leaves(name: str, subtasks_of: dict[str, list[str]]) -> list[str]:
    if name not in subtasks_of:
        return [name]
    return [leaf for child in subtasks_of[name] for leaf in _leaves(child, subtasks_of)]


def _metrics(values: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        base = metric.removesuffix("_stderr")
        if base in _HEADLINE_METRICS and isinstance(value, (int, float)):
            found[metric if filt in ("none", "") else f"{metric}[{filt}]"] = float(value)
    return found


def _source(raw: dict[str, Any], members: list[str]) -> str:
    sources = set()
    for member in members:
        config = raw.get("configs", {}).get(member, {})
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        sources.update(files.values() if files else [f"hf://{config.get('dataset_path')}"])
    return ", ".join(sorted(sources))
