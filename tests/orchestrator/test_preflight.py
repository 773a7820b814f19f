"""Before any work, the generator must serve the context and dtype the run was admitted for:
through the real stack's generator (vLLM on CPU, serving the tiny model's 2048 tokens in float32).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.clients import GeneratorClient
from orchestrator.config import load_run_config
from orchestrator.demo import demo_config
from orchestrator.manifest import load_manifest
from orchestrator.preflight import GeneratorMismatchError, check_generators

pytestmark = pytest.mark.timeout(900)


def write_run_config(stack: Any, tmp: Path, name: str, **changes: Any) -> Path:
    cfg = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
    )
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pairloop(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN": stack.admin_token,
        "PAIRLOOP_REDIS_URL": stack.redis_url,
        "COLUMNS": "200",
    }
    env.pop("PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def _check(stack, config: Path) -> None:
    async def go() -> None:
        client = GeneratorClient(stack.generator_url, retries=0)
        try:
            await check_generators(load_run_config(config), [client])
        finally:
            await client.aclose()

    asyncio.run(go())


def test_a_generator_with_a_shorter_context_stops_the_run_before_any_work(
    stack, tmp_path: Path
) -> None:
    # The run's base model says 4096 tokens; the generator was started on 2048 (its model's).
    longer = stack.spec.store / "models" / "long-context"
    shutil.copytree(stack.spec.base_model, longer, dirs_exist_ok=True)
    cfg = json.loads((longer / "config.json").read_text())
    (longer / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    config = write_run_config(stack, tmp_path, "ctx", base_model=str(longer))

    done = pairloop(stack, "run", str(config), "--run-id", "preflight-ctx")
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"generator at {stack.generator_url} serves a context of 2048 tokens" in line
    assert "admitted for 4096 (the base model's)" in line and "--max-model-len 4096" in line
    manifest = load_manifest(stack.spec.store / "runs" / "preflight-ctx")
    assert manifest.status == "failed"
    assert [name for name, st in manifest.stages.items() if st.attempts] == [], "no stage ran"

    # The same run with the generator's context named in its config passes the check.
    _check(
        stack,
        write_run_config(
            stack, tmp_path, "ctx-ok", base_model=str(longer), sampling={"max_model_len": 2048}
        ),
    )


def test_a_generator_serving_another_dtype_is_refused_with_both_names(
    stack, tmp_path: Path
) -> None:
    _check(stack, write_run_config(stack, tmp_path, "auto"))  # auto: the checkpoint's float32
    config = write_run_config(stack, tmp_path, "bf16", sampling={"dtype": "bfloat16"})
    with pytest.raises(GeneratorMismatchError) as err:
        _check(stack, config)
    assert "serves the policy in float32, but the run expects bfloat16" in err.value.message
