"""The orchestrator API as a real process: run status and control, and best-of-n serving."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import httpx
import pytest

from orchestrator.demo import demo_config
from pairloop_local.processes import ManagedProcess, free_port, wait_until

TOKEN = "api-secret"


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        PAIRLOOP_ORCHESTRATOR_GENERATOR_URL=stack.generator_url,
        PAIRLOOP_ORCHESTRATOR_RANKER_URL=stack.ranker_url,
        PAIRLOOP_ORCHESTRATOR_RUNS_ROOT=str(stack.spec.store / "runs"),
        PAIRLOOP_ORCHESTRATOR_API_TOKEN=TOKEN,
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
        PAIRLOOP_REDIS_URL=stack.redis_url,
    )
    env["PAIRLOOP_ORCHESTRATOR_MAX_BEST_OF"] = "8"
    proc = ManagedProcess(
        "orchestrator-api",
        [sys.executable, "-m", "orchestrator", "api", "--port", str(port)],
        log_path=tmp_path_factory.mktemp("api") / "api.log",
        env=env,
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(f"{url}/ready", timeout=60)
        yield url
    finally:
        proc.stop()


def test_best_of_n_returns_the_rankers_best_sample(stack, api: str) -> None:
    messages = [{"role": "user", "content": "Write a haiku about rivers."}]
    sampling = {"temperature": 1.0, "max_tokens": 24, "seed": 11}
    reply = httpx.post(
        f"{api}/v1/chat/completions",
        json={"messages": messages, "best_of": 6, **sampling},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["choices"]) == 1 and body["best_of"] == 6
    assert reply.headers["X-Model-Version"] == body["weight_version"]
    # The same draw straight from the generator, ranked straight by the ranker.
    drawn = httpx.post(
        f"{stack.generator_url}/v1/chat/completions",
        json={"messages": messages, "n": 6, **sampling},
        timeout=120,
    ).json()
    texts = [c["message"]["content"] for c in drawn["choices"]]
    kept = [t for t in texts if t.strip()]
    ranked = httpx.post(
        f"{stack.ranker_url}/v1/rank",
        json={"items": [{"prompt": messages[0]["content"], "candidates": kept}]},
        timeout=60,
    ).json()["results"][0]
    assert body["choices"][0]["message"]["content"] == kept[ranked["best_index"]]


@pytest.mark.parametrize(
    ("extra", "param"), [({"best_of": 9}, "best_of"), ({"n": 2}, "n"), ({"stream": True}, "stream")]
)
def test_best_of_n_bad_requests(api: str, extra: dict, param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    reply = httpx.post(f"{api}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_start_list_show_and_cancel_a_run(stack, api: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    config = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
    )
    # Control is authenticated; a bad config is refused before anything is created.
    assert httpx.post(f"{api}/runs", json={"config": config}, timeout=30).status_code == 401
    refused = httpx.post(
        f"{api}/runs", headers=auth, json={"config": {**config, "iterations": 0}}, timeout=30
    )
    assert refused.status_code == 400 and "iterations" in refused.json()["error"]["message"]
    assert not (stack.spec.store / "runs" / "api-bad").exists()

    started = httpx.post(
        f"{api}/runs", headers=auth, json={"config": config, "run_id": "api-run"}, timeout=60
    )
    assert started.status_code == 202, started.text
    assert httpx.post(f"{api}/runs/api-run/cancel", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{api}/runs/api-run/cancel", headers=wrong, timeout=30).status_code == 403
    assert httpx.post(f"{api}/runs/api-run/cancel", headers=auth, timeout=30).status_code == 202

    def detail_now() -> dict:
        return httpx.get(f"{api}/runs/api-run", timeout=30).json()

    wait_until(
        lambda: detail_now()["status"] not in ("created", "running"),
        timeout=120,
        what="the cancelled run to stop",
    )
    detail = detail_now()
    assert detail["status"] == "cancelled", detail
    assert "cancelled" in (detail["error"] or "")
    assert "api-run" in {r["run_id"] for r in httpx.get(f"{api}/runs", timeout=30).json()}
    again = httpx.post(f"{api}/runs/api-run/cancel", headers=auth, timeout=30)
    assert again.status_code == 409
    assert (
        httpx.post(
            f"{api}/runs", headers=auth, json={"config": config, "run_id": "api-run"}, timeout=30
        ).status_code
        == 409
    )
    assert httpx.get(f"{api}/runs/nope", timeout=30).status_code == 404
    assert httpx.get(f"{api}/runs/..%2F..%2Fetc", timeout=30).status_code in (403, 404)
