"""What happens when vLLM itself fails to load a checkpoint (in-process app, real engine).

Validation refuses every bad checkpoint we know how to make, so these tests drive the swapper's
reload step directly with a checkpoint vLLM rejects (an unknown tensor name: vLLM raises half-way
and leaves the model half-loaded). First the rollback works: the old weights serve again,
verified against transformers. Then the rollback target has vanished from disk: the engine is
declared dead and /ready turns 503, without restarting anything. Runs last in this module: it
kills the module's engine on purpose.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from pairloop.errors import EngineDeadError, ValidationError
from services.generator.app import create_app
from services.generator.settings import GeneratorSettings

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "rollback-admin-token"
CHAT = [{"role": "user", "content": "Explain how a rainbow forms."}]


def _with_unknown_tensor(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.9.extra.weight"] = torch.zeros(4, 4)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def inproc(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("inproc-store")
    scratch = tmp_path_factory.mktemp("inproc-scratch")
    shutil.copytree(model_store / "seed0", root / "current")
    rejected = _with_unknown_tensor(model_store / "seed1", root / "unknown-tensor")
    settings = GeneratorSettings(
        model=str(root / "current"),
        model_root=root,
        admin_token=TOKEN,
        dtype="float32",
        kv_cache_bytes=64 << 20,
        max_model_len=512,
    )
    app = create_app(settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("VLLM_CACHE_ROOT", str(scratch))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://inproc", timeout=60
            ) as client,
        ):
            deadline = time.monotonic() + 240
            while (await client.get("/ready")).status_code != 200:
                assert app.state.load_error is None, app.state.load_error
                assert time.monotonic() < deadline, "in-process engine did not start"
                await asyncio.sleep(0.1)
            yield {"app": app, "client": client, "root": root, "rejected": rejected}


async def greedy(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post(
        "/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "max_tokens": 16}
    )
    assert r.status_code == 200, r.text
    return {
        "version": r.json()["weight_version"],
        "text": r.json()["choices"][0]["message"]["content"],
    }


async def test_reload_rejected_by_vllm_rolls_back_to_the_serving_weights(inproc, hf) -> None:
    client, runtime = inproc["client"], inproc["app"].state.runtime
    expected = hf.greedy_chat(inproc["root"] / "current", CHAT, max_new=16)
    before = await greedy(client)
    assert before == {"version": "base", "text": before["text"]}
    assert hf.settled(before["text"]) == expected

    async with runtime.gate.exclusive(abort=None, drain_timeout=10):
        with pytest.raises(ValidationError) as err:
            await runtime.swapper.reload_or_roll_back(inproc["rejected"], "broken")
    message = err.value.message
    assert "vLLM could not load" in message and "layers.9" in message
    assert "rolled back, still serving version 'base'" in message

    after = await greedy(client)
    assert after["version"] == "base" and hf.settled(after["text"]) == expected
    assert (await client.get("/ready")).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'pairloop_generator_swaps_total{outcome="rolled_back"} 1.0' in metrics


async def test_failed_rollback_marks_the_engine_dead_without_a_restart(inproc) -> None:
    client, runtime = inproc["client"], inproc["app"].state.runtime
    # The weights being served vanish from disk: nothing is left to roll back to.
    (inproc["root"] / "current" / "model.safetensors").unlink()
    async with runtime.gate.exclusive(abort=None, drain_timeout=10):
        with pytest.raises(EngineDeadError) as err:
            await runtime.swapper.reload_or_roll_back(inproc["rejected"], "broken")
    assert "restart the service" in err.value.message

    ready = await client.get("/ready")
    assert ready.status_code == 503 and "engine dead" in ready.json()["error"]["message"]
    assert ready.json()["error"]["type"] == "engine_dead"
    health = await client.get("/health")
    assert health.status_code == 200 and health.json()["engine"] == "dead"
    r = await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})
    assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
    r = await client.post(
        "/admin/weights",
        json={"path": "unknown-tensor", "version": "v9"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 503
    metrics = (await client.get("/metrics")).text
    assert "pairloop_generator_engine_ready 0.0" in metrics
    assert 'pairloop_generator_swaps_total{outcome="engine_dead"} 1.0' in metrics
