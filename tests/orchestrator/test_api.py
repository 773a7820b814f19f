"""The orchestrator API as a real process: run status and control, and best-of-n serving."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import psutil
import pytest
import schemathesis

from orchestrator.context import CANCEL_FILE
from orchestrator.demo import demo_config
from orchestrator.manifest import load_manifest
from pairloop_local.processes import ManagedProcess, free_port, wait_until

TOKEN = "api-secret"


def start_api(
    log_dir: Path, *, generator_url: str, ranker_url: str, runs_root: Path, **env_extra: str
) -> tuple[ManagedProcess, str]:
    """`pairloop api` as a real process on a free loopback port (answering /health)."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PAIRLOOP_ORCHESTRATOR_GENERATOR_URL=generator_url,
        PAIRLOOP_ORCHESTRATOR_RANKER_URL=ranker_url,
        PAIRLOOP_ORCHESTRATOR_RUNS_ROOT=str(runs_root),
        PAIRLOOP_ORCHESTRATOR_API_TOKEN=TOKEN,
        PAIRLOOP_ORCHESTRATOR_MAX_BEST_OF="8",
        **env_extra,
    )
    proc = ManagedProcess(
        "orchestrator-api",
        [sys.executable, "-m", "orchestrator", "api", "--port", str(port)],
        log_path=log_dir / "api.log",
        env=env,
    ).start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_ready(f"{url}/health", timeout=60)
    return proc, url


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_api(
        tmp_path_factory.mktemp("api"),
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        runs_root=stack.spec.store / "runs",
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
        PAIRLOOP_REDIS_URL=stack.redis_url,
    )
    try:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, timeout=60, what="ready")
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API with its generator and ranker unreachable (nothing listens on their ports)."""
    work = tmp_path_factory.mktemp("api-down")
    proc, url = start_api(
        work,
        generator_url=f"http://127.0.0.1:{free_port()}",
        ranker_url=f"http://127.0.0.1:{free_port()}",
        runs_root=work / "runs",
    )
    try:
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


def test_best_of_n_empty_user_message_is_a_400_that_says_what_to_fix(api: str) -> None:
    body = {"messages": [{"role": "user", "content": ""}], "best_of": 8, "max_tokens": 8}
    reply = httpx.post(f"{api}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages" and "user message is empty" in error["message"]


def test_best_of_n_with_services_down_is_503_with_retry_after(api_down: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "best_of": 4}
    reply = httpx.post(f"{api_down}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["Retry-After"]) > 0
    assert "generator is unreachable" in reply.json()["error"]["message"]


def test_a_run_started_through_the_api_outlives_the_api(stack, tmp_path: Path) -> None:
    runs_root = stack.spec.store / "runs"
    proc, url = start_api(
        tmp_path,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        runs_root=runs_root,
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
        PAIRLOOP_REDIS_URL=stack.redis_url,
    )
    config = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
    )
    run_dir = runs_root / "api-outlives"
    try:
        started = httpx.post(
            f"{url}/runs",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"config": config, "run_id": "api-outlives"},
            timeout=120,
        )
        assert started.status_code == 202, started.text
    finally:
        proc.kill()  # SIGKILL of the API's whole process group: the API is gone, at once

    def run_process() -> psutil.Process | None:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if str(run_dir) in (p.info["cmdline"] or []) and p.status() != "zombie":
                    return p
            except psutil.NoSuchProcess:
                continue
        return None

    survivor = run_process()
    try:
        assert survivor is not None, "the run died with the API"
        wait_until(
            lambda: load_manifest(run_dir).status == "running",
            timeout=120,
            what="the run to be running after the API died",
        )
        assert survivor.is_running()
        # It still works: a cancel (the file the API's cancel route writes) stops it properly.
        (run_dir / CANCEL_FILE).write_text("cancelled by the test\n")
        wait_until(
            lambda: load_manifest(run_dir).status == "cancelled",
            timeout=300,
            what="the orphaned run to honour its cancel",
        )
        survivor.wait(timeout=60)
    finally:
        if survivor is not None and survivor.is_running():
            survivor.kill()


# --- the API's OpenAPI schema, fuzzed (schemathesis): never a 500 --------------------------------


def _fuzz(url: str, *, examples: int) -> None:
    """Seeded, bounded schemathesis cases against every route; no answer may be a plain 500."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: list[tuple[str, int]] = []

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    @hypothesis.given(case=schema.as_strategy())
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, timeout=120)
        seen.append((case.operation.label, response.status_code))
        assert response.status_code not in (500, 504), (
            f"{case.operation.label} answered {response.status_code}: {response.text[:500]}"
        )
        if response.status_code == 503:
            assert "Retry-After" in response.headers or case.operation.path == "/ready", (
                case.operation.label
            )

    check()
    assert len({label for label, _ in seen}) >= 4, seen  # the cases reached the routes


def test_api_schema_fuzzed_with_services_up_never_answers_500(api: str) -> None:
    _fuzz(api, examples=40)


def test_api_schema_fuzzed_with_services_down_never_answers_500(api_down: str) -> None:
    _fuzz(api_down, examples=30)
