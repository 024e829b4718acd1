"""Test setup: offline, no telemetry, one torch thread per worker, shared fixtures.

The environment is set before any Hugging Face library is imported, so nothing here (or in the
code under test) can reach the network.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HF_HOME = Path(tempfile.gettempdir()) / f"surgery-tests-hf-{os.getuid()}"
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    DO_NOT_TRACK="1",
    TOKENIZERS_PARALLELISM="false",
    HF_HOME=os.environ.get("SURGERY_TEST_HF_HOME", str(_HF_HOME)),
)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SURGERY_DATA_DIR", REPO.parent / "shared" / "datasets")).resolve()


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from surgery.console import quiet_transformers

    quiet_transformers()


# The slowest files, longest first (a --junitxml run on one worker, 2026-12-04: the SmolLM2 prune
# about a third of the suite's time, then the interruptions, the torchrun tests and the other two
# SmolLM2 files, 70 s or more each; no other file took 50 s). `make test` runs
# `--dist loadfile --no-loadscope-reorder`, so the two workers start on these; xdist's default order
# (files with the most tests first) left the 380 s file for last, with one worker idle meanwhile.
LONGEST_FIRST = ("test_e2e_prune_smollm2.py", "test_interruptions.py", "test_distributed.py", "test_e2e_eval_smollm2.py",
                 "test_e2e_cut_smollm2.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tokenizer():
    from surgery.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared evaluation data (read-only); its absence is a failure, not a skip."""
    if not (SHARED_DATA / "c4_validation_2k.jsonl.gz").is_file():
        pytest.fail(f"shared datasets not found at {SHARED_DATA}: set SURGERY_DATA_DIR")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the user's cache."""
    from surgery.source import resolve

    return resolve("smollm2-135m").path


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """Save a tiny model of a family to a folder; returns (folder, model)."""

    def make(model_type: str = "llama", num_layers: int = 4, **overrides):
        from surgery.tiny import tiny_model

        model = tiny_model(model_type, num_layers, **overrides)
        folder = tmp_path / f"{model_type}-src"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder, model

    return make
