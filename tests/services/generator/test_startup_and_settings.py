"""Start-up honesty (/ready 503 until the engine serves), admin off without a token, settings/CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError as PydanticValidationError

from pairloop.settings import load_settings
from services.generator.app import create_app
from services.generator.settings import GeneratorSettings


def test_ready_was_503_while_the_engine_loaded(generator) -> None:
    statuses = generator.ready_statuses_during_start
    assert statuses[-1] == 200
    assert 503 in statuses, "the server answered before the engine was up, and said so"
    # /health answers 200 meanwhile (the process is up) and says what the engine is doing.
    assert generator.health_while_loading == {
        "http_status": 200,
        "status": "ok",
        "engine": "loading",
        # Which process answers (pairloop.contracts.health): the one the fixture started.
        "pid": generator.process.pid,
        "instance": None,
    }
    ready = httpx.get(f"{generator.base_url}/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["weight_version"] == generator.current_version()
    assert httpx.get(f"{generator.base_url}/health", timeout=10).json()["engine"] == "ready"


def test_metrics_expose_what_operators_need(generator) -> None:
    httpx.post(
        f"{generator.base_url}/v1/completions",
        json={"prompt": "Hello", "max_tokens": 4},
        timeout=30,
    ).raise_for_status()
    m = generator.metrics()
    assert m['pairloop_generator_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert m["pairloop_generator_generation_tokens_total"] >= 4
    assert m["pairloop_generator_prompt_tokens_total"] >= 1
    assert m['pairloop_generator_request_seconds_count{route="/v1/completions"}'] >= 1
    assert m["pairloop_generator_engine_ready"] == 1
    version = generator.current_version()
    info = [k for k in m if k.startswith("pairloop_generator_weight_info{")]
    assert len(info) == 1 and f'version="{version}"' in info[0]
    for name in ("in_flight_requests", "requests_waiting_for_swap", "gate_closed"):
        assert m[f"pairloop_generator_{name}"] == 0
    assert 'pairloop_generator_swaps_total{outcome="ok"}' in m


def _settings(tmp_path: Path, **overrides: object) -> GeneratorSettings:
    return GeneratorSettings(model=str(tmp_path), model_root=tmp_path, **overrides)  # type: ignore[arg-type]  # any field


async def test_admin_routes_are_off_without_a_token_and_ready_says_loading(tmp_path: Path) -> None:
    # No lifespan here: the engine never starts, which is exactly "still loading".
    app = create_app(_settings(tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/admin/weights", json={"path": "x", "version": "v1"})
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "admin disabled: set --admin-token"
        r = await c.get("/ready")
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 503
        health = (await c.get("/health")).json()
        assert health == {"status": "ok", "engine": "loading", "pid": os.getpid(), "instance": None}


async def test_admin_auth_comes_before_engine_state(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, admin_token="0123456789"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/admin/weights", json={"path": "x", "version": "v1"})
        assert r.status_code == 401
        r = await c.post(
            "/admin/weights",
            json={"path": "x", "version": "v1"},
            headers={"Authorization": "Bearer 0123456789"},
        )
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]


def test_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIRLOOP_GENERATOR_MAX_N", "3")
    monkeypatch.setenv("PAIRLOOP_GENERATOR_SWAP_MODE", "abort")
    s = load_settings(
        GeneratorSettings,
        ["--model", str(tmp_path), "--port", "9001", "--max-n", "5", "--no-prefix-caching"],
    )
    assert (s.max_n, s.swap_mode, s.port, s.prefix_caching) == (5, "abort", 9001, False)
    assert s.model_name == str(tmp_path) and s.admin_token is None
    assert GeneratorSettings(served_model_name="m").model_name == "m"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"model": "/no/such/checkpoint"}, "not a directory"),
        ({"model_root": "/no/such/store"}, "model_root"),
        ({"admin_token": "short"}, "at least 8"),
        ({"default_max_tokens": 500, "max_tokens_limit": 100}, "must not exceed"),
        ({"swap_mode": "later"}, "swap_mode"),
    ],
)
def test_bad_settings_fail_fast(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(PydanticValidationError, match=fragment):
        GeneratorSettings(**overrides)  # type: ignore[arg-type]  # bad on purpose


def test_cli_reports_bad_flags_without_a_traceback() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "services.generator", "--max-n", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--max-n" in r.stderr and "Traceback" not in r.stderr


def test_engine_args_serve_the_checkpoint_dtype_and_the_model_context(tmp_path: Path) -> None:
    """`dtype: auto` means the checkpoint's own (vLLM's auto would downcast float32 to bfloat16);
    the context is the model's own unless --max-model-len caps it."""
    import json

    from pairloop_local.tiny_models import build_tiny_chat_model
    from services.generator.engine import engine_args

    model = build_tiny_chat_model(
        tmp_path / "m", arch="llama", seed=0, max_position_embeddings=8192
    )
    args = engine_args(GeneratorSettings(model=str(model)))
    assert (args.dtype, args.max_model_len) == ("float32", 8192)
    args = engine_args(GeneratorSettings(model=str(model), max_model_len=1024, dtype="bfloat16"))
    assert (args.dtype, args.max_model_len) == ("bfloat16", 1024)
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (model / "config.json").write_text(json.dumps(config))
    assert engine_args(GeneratorSettings(model=str(model))).dtype == "bfloat16"
