"""`placement: time_shared` through the real stack (vLLM generator, ranker, Celery worker, Redis)
and the `pairloop` CLI as a real process: one iteration, killed with SIGKILL while it trains,
then resumed.

The phases must be in order: generation and ranking, then the generator releases its memory,
then training (with the generator released: on a GPU node the trainer has every GPU), then the
generator wakes straight onto the new policy (no separate swap stage). A crash between release
and wake leaves the generator released; the resumed run releases again (a no-op) before
training and wakes it onto the right policy.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from orchestrator.demo import demo_config
from orchestrator.manifest import load_manifest

pytestmark = pytest.mark.timeout(900)


def pairloop(stack, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
        PAIRLOOP_REDIS_URL=stack.redis_url,
        COLUMNS="200",
    )
    env.pop("PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER", None)
    if fault:
        env["PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER"] = fault
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def model_card(stack) -> dict:
    r = httpx.get(f"{stack.generator_url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["data"][0])


def test_time_shared_run_releases_before_training_and_wakes_onto_the_new_policy(
    stack, tmp_path: Path
) -> None:
    cfg = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
    )
    cfg["prompts"].update(per_iteration=16, eval_prompts=4)
    cfg["shard_size"] = 8
    cfg["evaluation"] = {"enabled": False}
    cfg["placement"] = "time_shared"
    config = tmp_path / "time-shared.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = stack.spec.store / "runs" / "time-shared"

    # Killed at its first training progress report: after the release, before the wake.
    first = pairloop(stack, "run", str(config), "--run-id", "time-shared", fault="iter1.train:1")
    assert first.returncode == -9, first.stdout + first.stderr
    m = load_manifest(run_dir)
    assert m.stages["iter1.release"].state == "done"
    assert m.stages["iter1.train"].state == "running"
    card = model_card(stack)
    assert card["state"] == "released" and card["weight_version"] == "time-shared.policy0"
    ready = httpx.get(f"{stack.generator_url}/ready", timeout=30)
    assert ready.status_code == 503 and "Retry-After" in ready.headers

    last = pairloop(stack, "resume", str(run_dir))
    assert last.returncode == 0, last.stdout + last.stderr
    m = load_manifest(run_dir)
    assert m.status == "completed"
    st = m.stages
    assert "iter1.swap" not in st  # the wake is the swap
    order = ["iter1.generate", "iter1.rank", "iter1.release", "iter1.train", "iter1.wake"]
    for before, after in itertools.pairwise(order):
        assert st[before].finished_at <= st[after].started_at, (before, after)
    # The resume released again (a no-op: it was released) before training went on.
    assert st["iter1.release"].attempts == 2
    assert st["iter1.release"].metrics["already_released"] == 1
    assert st["iter1.release"].metrics["released_version"] == "time-shared.policy0"
    assert st["iter1.wake"].metrics == st["iter1.wake"].metrics | {
        "placement": "time_shared",
        "version": "time-shared.policy1",
        "woke": 1,
    }
    assert m.current_version == "time-shared.policy1"

    card = model_card(stack)
    assert card["state"] == "serving" and card["weight_version"] == "time-shared.policy1"
    reply = httpx.post(
        f"{stack.generator_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "awake?"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["weight_version"] == "time-shared.policy1"
    metrics = httpx.get(f"{stack.generator_url}/metrics", timeout=30).text
    assert 'pairloop_generator_wakes_total{outcome="ok"} 1.0' in metrics
    assert "pairloop_generator_released 0.0" in metrics
