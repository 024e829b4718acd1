"""The shared terminal: one rich console on stderr (stdout stays clean for data), and quiet HF libraries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def offline_defaults() -> None:
    """No telemetry, ever; respect an offline machine. Called before any HF library is imported."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_progress() -> None:
    """Turn off every tqdm bar in this process (tqdm reads this when imported): the libraries'
    bars would fight with surgery's rich progress. Only the CLI calls it."""
    os.environ.setdefault("TQDM_DISABLE", "1")


_active: list[Any] = []  # the live display of this process, if any (one at a time)


@contextmanager
def progress_bar() -> Iterator[Any]:
    """The process's rich progress display: the one already live, or a new transient one."""
    if _active:
        yield _active[-1]
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        _active.append(bar)
        try:
            yield bar
        finally:
            _active.remove(bar)


class Task:
    """One line of the progress display."""

    def __init__(self, bar: Any, task_id: Any) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, steps: float = 1) -> None:
        self._bar.advance(self._id, steps)

    def update(self, **fields: Any) -> None:
        self._bar.update(self._id, **fields)


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Task]:
    """A progress line for the block, on the live display (or a new one); removed when the block ends."""
    with progress_bar() as bar:
        task_id = bar.add_task(description, total=total)
        try:
            yield Task(bar, task_id)
        finally:
            bar.remove_task(task_id)


def quiet_transformers() -> None:
    """Silence transformers' own tqdm bars and chatty warnings: surgery shows rich progress instead."""
    offline_defaults()
    import logging
    import warnings

    # bitsandbytes' CPU backend logs that it found no Hub kernels package whenever peft imports it,
    # 4-bit or not; it then uses its own kernels (docs/pruning.md, Healing).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # ... and, where the `kernels` package is installed (transformers 5.25 requires it), the Hub check
    # it skips offline before bitsandbytes falls back to those kernels
    logging.getLogger("kernels").setLevel(logging.ERROR)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_TELEMETRY = True  # libraries imported before our environment defaults were set
