"""Fixtures for orchestrator tests: a model store holding the tiny base model, and a config file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml


@pytest.fixture()
def store(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    root = tmp_path / "store"
    shutil.copytree(tiny_models["llama"], root / "models" / "base")
    return root


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": f"Question number {i}?"}) + "\n"
            for i in range(50)
        )
    )
    return path


@pytest.fixture()
def write_config(tmp_path: Path, store: Path, prompts_file: Path):
    def write(**overrides: object) -> Path:
        cfg: dict = {
            "base_model": "models/base",
            "model_store": str(store),
            "iterations": 2,
            "shard_size": 4,
            "prompts": {"source": str(prompts_file), "per_iteration": 10, "eval_prompts": 6},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]):
    """The embedded stack (real generator, ranker with the demo's scorer, Celery worker), once.

    It gets a Redis of its own: its worker must not consume the training jobs other tests queue
    (and theirs must not consume the loop's) on the session's shared Redis.
    """
    from orchestrator.demo import DEMO_RANKER_ARGS
    from orchestrator.local import LocalStack, StackSpec

    work = tmp_path_factory.mktemp("stack")
    store = work / "store"
    shutil.copytree(tiny_models["llama"], store / "models" / "base")
    spec = StackSpec(
        store=store,
        base_model=store / "models" / "base",
        ranker_args=DEMO_RANKER_ARGS,
        redis_url=None,
        extra_env={"HF_DATASETS_CACHE": str(work / "hf-datasets")},
    )
    with LocalStack(spec, work) as running:
        yield running
