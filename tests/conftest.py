"""Session-wide fixtures: tiny models built once, a private Redis, offline hub settings.

Integration tests start real processes on free loopback ports through `pairloop_local.processes` and
stop them in fixture teardown, whatever the outcome.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# No hub is reachable here or in CI: fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests only where no CUDA device exists; everything else always runs."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`pairloop tiny-models` output (arch -> model dir), built once per session, seed 0."""
    from pairloop_local.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_reward_model(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny Llama reward model (one-label sequence classification), built once per session."""
    from pairloop_local.tiny_models import build_tiny_reward_model

    return build_tiny_reward_model(
        tiny_models["llama"], tmp_path_factory.mktemp("tiny-reward-model") / "model"
    )


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private, real redis-server on a free loopback port, for this test session only."""
    from pairloop_local.redis_server import start_redis

    handle = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield handle.url
    finally:
        handle.stop()
