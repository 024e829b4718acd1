"""The accuracy value function: v(S) = accuracy on an lm-eval task with the removed sublayers
ablated. No prefix cache: lm-eval drives the forward passes."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from surgery.scoring.base import ValueFunction
from surgery.sublayers import Sublayer


class TaskAccuracy(ValueFunction):
    """v(S) = accuracy on an lm-eval task with the removed sublayers ablated (no prefix cache:
    lm-eval drives the forward passes)."""

    def __init__(self, model: Any, tokenizer: Any, settings: Any) -> None:
        from surgery.evaluate.suite import TaskSuite
        from surgery.settings import EvalSettings

        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.suite = TaskSuite(EvalSettings(tasks=(settings.task,), limit=settings.limit, perplexity=(), speed=False,
                                            data_dir=settings.data_dir, seed=settings.seed, batch_size=settings.batch_size))
        self.task = settings.task
        self.details: dict[frozenset[int], dict[str, Any]] = {}
        self.value(frozenset())

    def remember(self, removed: Iterable[int], value: float, detail: dict[str, Any] | None = None) -> None:
        self._values[frozenset(removed)] = value
        if detail:
            self.details[frozenset(removed)] = detail

    def values(self, coalitions: list[frozenset[int]], batch: int = 1) -> list[float]:
        return [self.value(c) for c in coalitions]  # lm-eval drives the passes: nothing to batch

    def value(self, removed: Iterable[int]) -> float:
        from surgery.ablation import ablated

        key = frozenset(removed)
        if key not in self._values:
            start = time.perf_counter()
            with ablated(self.model, [Sublayer.at(p) for p in key]):
                entry = self.suite.run(self.model, self.tokenizer)[self.task]
            self.seconds += time.perf_counter() - start
            self.evaluations += 1 if key else 0
            self.details[key] = {k: entry[k] for k in ("acc", "acc_stderr", "chance", "n") if k in entry}
            self._values[key] = entry["acc"]
        return self._values[key]
