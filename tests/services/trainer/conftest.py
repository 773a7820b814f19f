"""Fixtures for the trainer tests: a model store with a tiny model and pairs, a module's worker.

Workers run on the session's private Redis (`redis_url`) and are always stopped.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pairloop.preference_data import write_preference_split

from .helpers import Worker, preference_rows, start_worker


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A model store root holding the tiny Llama as `base` and a 32-pair dataset `data/pairs`."""
    root = tmp_path_factory.mktemp("model-store")
    shutil.copytree(tiny_models["llama"], root / "base")
    write_preference_split(root / "data" / "pairs", "train_iteration_1", preference_rows(32))
    return root


@pytest.fixture(scope="module")
def worker(
    redis_url: str, model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """One trainer worker for a whole test module."""
    logs = tmp_path_factory.mktemp("worker-logs")
    w = start_worker(redis_url=redis_url, store=model_store, log_path=logs / "worker.log")
    try:
        yield w
    finally:
        w.process.stop()
        w.client.close()
