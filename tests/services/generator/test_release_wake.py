"""Release and wake (time-shared placement) on a generator process of its own, real vLLM on CPU.

On CPU vLLM has no sleep mode, so a release shuts the engine down (its process ends, its memory
goes back) and a wake builds a new engine straight on the new weights. The module's server is
its own (a release stops the engine; the session's `generator` stays untouched), started once;
the tests run in order: release, wake onto seed1, failed wakes rolled back, idempotent wake.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pairloop_local.processes import wait_until
from tests.services.generator.conftest import GeneratorService, launch_generator

CHAT = [{"role": "user", "content": "Explain how a rainbow forms, in two sentences."}]
MAX_NEW = 16


@pytest.fixture(scope="module")
def own_generator(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GeneratorService]:
    # A store of its own: the session's store stays as other tests expect it.
    store = tmp_path_factory.mktemp("release-store")
    for name in ("seed0", "seed1"):
        shutil.copytree(model_store / name, store / name)
    service = launch_generator(store, tmp_path_factory.mktemp("release-generator"))
    try:
        yield service
    finally:
        service.process.stop()


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def engine_processes(service: GeneratorService) -> list[psutil.Process]:
    """vLLM's engine core process(es) under the service (not multiprocessing's resource tracker)."""
    return [p for p in tree(service.process.pid)[1:] if p.name().startswith("VLLM::")]


def running(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def tree_rss(pid: int) -> int:
    total = 0
    for proc in tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def admin(
    service: GeneratorService, route: str, body: dict[str, Any] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{service.base_url}/admin/{route}",
        json=body,
        headers=service.admin_headers(),
        timeout=300,
    )


def greedy(service: GeneratorService) -> tuple[str, str]:
    r = httpx.post(
        f"{service.base_url}/v1/chat/completions",
        json={"messages": CHAT, "temperature": 0, "max_tokens": MAX_NEW},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body["weight_version"], body["choices"][0]["message"]["content"]


def model_card(service: GeneratorService) -> dict[str, Any]:
    r = httpx.get(f"{service.base_url}/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["data"][0])


def test_release_frees_the_engine_memory_and_requests_get_503_with_retry_after(
    own_generator: GeneratorService, hf
) -> None:
    service = own_generator
    version, text = greedy(service)
    assert version == "base"
    assert hf.settled(text) == hf.greedy_chat(service.seed_dirs[0], CHAT, max_new=MAX_NEW)
    engine_procs = engine_processes(service)
    assert engine_procs, "vLLM's engine core runs in a child process"
    rss_before = tree_rss(service.process.pid)

    r = admin(service, "release")
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["state"] == "released" and reply["version"] == "base"
    assert reply["how"] == "shutdown" and not reply["already_released"]

    # The engine's processes are gone and their memory with them.
    wait_until(
        lambda: not any(running(p) for p in engine_procs), timeout=30, what="engine process ends"
    )
    rss_after = tree_rss(service.process.pid)
    assert rss_before - rss_after > 200 << 20, (rss_before, rss_after)
    assert rss_after < 0.7 * rss_before, (rss_before, rss_after)

    # Requests get 503 with Retry-After, never an answer.
    for path, body in (
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
        ("/v1/batch/chat", {"conversations": [CHAT], "max_tokens": 4}),
    ):
        r = httpx.post(f"{service.base_url}{path}", json=body, timeout=30)
        assert r.status_code == 503, (path, r.text)
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["type"] == "engine_released"
    ready = httpx.get(f"{service.base_url}/ready", timeout=10)
    assert ready.status_code == 503 and "state: released" in ready.json()["error"]["message"]
    assert "Retry-After" in ready.headers
    assert httpx.get(f"{service.base_url}/health", timeout=10).json()["engine"] == "released"
    card = model_card(service)
    assert card["state"] == "released" and card["weight_version"] == "base"
    # A swap cannot run on a released engine: the wake is the swap.
    r = admin(service, "weights", {"path": "seed1", "version": "nope"})
    assert r.status_code == 503 and "/admin/wake" in r.json()["error"]["message"]

    # Releasing again changes nothing (the orchestrator repeats it after a crash).
    again = admin(service, "release")
    assert again.status_code == 200 and again.json()["already_released"] is True
    metrics = service.metrics()
    assert metrics["pairloop_generator_released"] == 1.0
    assert metrics['pairloop_generator_releases_total{outcome="ok"}'] == 1.0
    assert metrics['pairloop_generator_releases_total{outcome="noop"}'] == 1.0


def test_wake_serves_the_new_policy_greedy_equal_to_transformers(
    own_generator: GeneratorService, hf
) -> None:
    service = own_generator
    assert model_card(service)["state"] == "released"  # left so by the test above
    r = admin(service, "wake", {"path": "seed1", "version": "policy1"})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["woke"] is True and reply["previous_version"] == "base"
    assert reply["version"] == "policy1" and reply["path"].endswith("seed1")

    version, text = greedy(service)
    assert version == "policy1"
    expected = hf.greedy_chat(service.seed_dirs[1], CHAT, max_new=MAX_NEW)
    assert hf.settled(text) == expected
    # The two seeds answer differently, so the equality proves the new weights serve.
    assert expected != hf.greedy_chat(service.seed_dirs[0], CHAT, max_new=MAX_NEW)
    assert httpx.get(f"{service.base_url}/ready", timeout=10).status_code == 200
    card = model_card(service)
    assert card["state"] == "serving" and card["weight_version"] == "policy1"
    assert any(running(p) for p in engine_processes(service)), "a new engine process serves"
    assert service.metrics()['pairloop_generator_wakes_total{outcome="ok"}'] == 1.0


def _corrupt(src: Path, dst: Path) -> Path:
    """A copy of `src` whose weights file is cut short (a crash while writing it)."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


def _refused_by_vllm(src: Path, dst: Path) -> Path:
    """Valid weights whose config.json vLLM refuses: a context shorter than the served one."""
    import json

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("make", [_corrupt, _refused_by_vllm], ids=["corrupt", "vllm-refuses"])
def test_failed_wake_rolls_back_to_the_old_weights(
    own_generator: GeneratorService, hf, make
) -> None:
    service = own_generator
    bad = make(service.seed_dirs[0], service.model_root / f"bad-{make.__name__}")
    served = service.seed_dirs[1]
    assert model_card(service)["weight_version"] == "policy1"
    assert admin(service, "release").status_code == 200

    r = admin(service, "wake", {"path": bad.name, "version": "policy2"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert bad.name in message
    assert "woke onto the previous weights instead: serving version 'policy1'" in message

    version, text = greedy(service)
    assert version == "policy1"
    assert hf.settled(text) == hf.greedy_chat(served, CHAT, max_new=MAX_NEW)
    assert model_card(service)["state"] == "serving"


def test_wake_of_a_serving_engine_is_a_swap_and_repeating_it_is_a_no_op(
    own_generator: GeneratorService,
) -> None:
    """What the orchestrator meets after a crash: a generator that woke already, or restarted."""
    service = own_generator
    assert model_card(service) | {"created": 0} == model_card(service) | {
        "created": 0,
        "state": "serving",
        "weight_version": "policy1",
    }
    same = admin(service, "wake", {"path": "seed1", "version": "policy1"})
    assert same.status_code == 200, same.text
    assert same.json()["woke"] is False and same.json()["paused_seconds"] == 0.0
    swapped = admin(service, "wake", {"path": "seed0", "version": "policy0-again"})
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["woke"] is False and swapped.json()["previous_version"] == "policy1"
    assert greedy(service)[0] == "policy0-again"
