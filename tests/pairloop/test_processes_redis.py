"""Local process management and the embedded Redis: real processes, real redis-server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from pairloop_local.processes import ManagedProcess, ProcessFailedError, free_port
from pairloop_local.redis_server import ensure_redis, redis_answers


def test_private_redis_session_fixture_answers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("pairloop-test", "1")
    assert client.get("pairloop-test") == b"1"


def test_ensure_redis_reuses_a_live_server(redis_url: str, tmp_path: Path) -> None:
    handle = ensure_redis(redis_url, tmp_path)
    assert handle.url == redis_url and not handle.started_here


def test_ensure_redis_starts_one_when_none_answers(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    handle = ensure_redis(dead, tmp_path / "r")
    try:
        assert handle.started_here and handle.url != dead
        assert redis_answers(handle.url)
    finally:
        handle.stop()
    assert not redis_answers(handle.url)


def test_http_server_process_ready_and_stopped(tmp_path: Path) -> None:
    port = free_port()
    proc = ManagedProcess(
        "http",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        log_path=tmp_path / "http.log",
    )
    with proc:
        proc.wait_ready(f"http://127.0.0.1:{port}/", timeout=30)
        assert proc.alive()
    assert not proc.alive()


def test_process_that_dies_reports_its_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "doomed",
        [sys.executable, "-c", "import sys; print('boom happened'); sys.exit(3)"],
        log_path=tmp_path / "doomed.log",
    ).start()
    with pytest.raises(ProcessFailedError, match="boom happened"):
        proc.wait_ready(f"http://127.0.0.1:{free_port()}/", timeout=30)
