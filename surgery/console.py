"""The shared terminal: one rich console on stderr (stdout stays clean for data), and quiet HF libraries."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, highlight=False)


def offline_defaults() -> None:
    """No telemetry, ever; respect an offline machine. Called before any HF library is imported."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_transformers() -> None:
    """Silence transformers' own tqdm bars and chatty warnings: surgery shows rich progress instead."""
    offline_defaults()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
