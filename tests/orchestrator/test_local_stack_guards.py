"""The local stack's doors and its watch, tested cheaply (no model is loaded here).

A port held by another process is refused, never talked to; a private Redis takes only its
password and is proven to be ours by its pid; `local.redis: auto` trusts only a Redis someone
named; a killed stack's temp directory goes at the next start; a dead service is restarted with
backoff, and a crash loop is given up on with the reason.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import redis

from orchestrator.config import load_run_config
from orchestrator.local import LocalStack, StackSpec
from orchestrator.local.stack import TMP_RECORD
from orchestrator.local.supervisor import Supervisor
from pairloop_local.processes import ManagedProcess, PortInUseError, wait_until
from pairloop_local.redis_server import start_redis


class _Impostor(BaseHTTPRequestHandler):
    """Another user's server: 200 with a plausible body on every path."""

    seen: list[str] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        body = json.dumps({"status": "ok", "engine": "ready"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def impostor() -> Iterator[int]:
    """A real HTTP server on a loopback port, answering 200 on /health and /ready."""
    _Impostor.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_fixed_port_held_by_another_process_is_refused_and_stale_tmp_removed(
    impostor: int, tmp_path: Path
) -> None:
    # A temp directory a killed stack of this workdir left behind (vLLM's scratch and sockets).
    stale = Path(tempfile.mkdtemp(prefix="pairloop-"))
    (stale / "generator").mkdir()
    (stale / "generator" / "leftover").write_text("x")
    workdir = tmp_path / "local"
    workdir.mkdir()
    (workdir / TMP_RECORD).write_text(json.dumps({"tmpdir": str(stale)}))

    spec = StackSpec(store=tmp_path, base_model=tmp_path, ports={"ranker": impostor})
    with pytest.raises(PortInUseError) as caught:
        LocalStack(spec, workdir).start()
    message = str(caught.value)
    assert "local.ranker.port" in message and str(impostor) in message
    assert "another process" in message
    assert _Impostor.seen == []  # never talked to
    assert not stale.exists()


def test_readiness_refuses_an_answer_that_is_not_our_childs(impostor: int, tmp_path: Path) -> None:
    # The child has not bound the port yet (a model still loading); the impostor answers 200.
    child = ManagedProcess(
        "ranker",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        log_path=tmp_path / "child.log",
        instance_env="PAIRLOOP_RANKER_INSTANCE_ID",
    ).start()
    url = f"http://127.0.0.1:{impostor}"
    try:
        with pytest.raises(PortInUseError, match="not from the process we started"):
            child.wait_ready(f"{url}/ready", timeout=30, health_url=f"{url}/health")
        assert not child.alive()  # stopped, not left behind
        assert "/ready" not in _Impostor.seen
    finally:
        child.stop()


def test_private_redis_requires_its_password_and_refuses_a_taken_port(
    redis_url: str, tmp_path: Path
) -> None:
    handle = start_redis(tmp_path / "r", password="pw-0123456789", persist=False)
    try:
        assert redis.Redis.from_url(handle.url).ping()
        bare = handle.url.replace(":pw-0123456789@", "")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(bare).ping()
        with pytest.raises(redis.exceptions.ResponseError):  # no CONFIG SET dir / MODULE LOAD
            redis.Redis.from_url(handle.url).config_get("dir")
        assert handle.process is not None
        assert "pw-0123456789" not in " ".join(psutil.Process(handle.process.pid).cmdline())
        assert (tmp_path / "r" / "redis.conf").stat().st_mode & 0o777 == 0o600
    finally:
        handle.stop()
    # A port another Redis holds: that server answers PING, but it is not the one we started.
    taken = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(PortInUseError, match="another redis-server"):
        start_redis(tmp_path / "r2", port=taken, persist=False)


def test_redis_auto_uses_only_a_named_redis(
    write_config: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_run_config(write_config(local={"redis": "auto"}))  # type: ignore[operator]  # fixture factory
    monkeypatch.delenv("PAIRLOOP_REDIS_URL", raising=False)
    assert StackSpec.from_config(cfg).redis_url is None  # a private one, not 127.0.0.1:6379
    monkeypatch.setenv("PAIRLOOP_REDIS_URL", "redis://127.0.0.1:6390/2")
    assert StackSpec.from_config(cfg).redis_url == "redis://127.0.0.1:6390/2"


def _sleeper(
    tmp_path: Path, name: str, code: str = "import time; time.sleep(60)"
) -> ManagedProcess:
    return ManagedProcess(name, [sys.executable, "-c", code], log_path=tmp_path / f"{name}.log")


class _Watched:
    """A supervised service around a real process (the stack's own `_Service` in small)."""

    def __init__(self, proc: ManagedProcess) -> None:
        self.name = proc.name
        self.proc = proc
        self.restarts = 0

    def alive(self) -> bool:
        return self.proc.alive()

    def exit_status(self) -> str:
        return f"code {self.proc.proc.poll() if self.proc.proc else None}"

    def restart(self) -> None:
        self.proc.stop()
        self.proc.start()
        self.restarts += 1


def test_supervisor_restarts_a_killed_service_and_gives_up_on_a_crash_loop(
    tmp_path: Path,
) -> None:
    events: list[str] = []
    steady = _Watched(_sleeper(tmp_path, "steady").start())
    supervisor = Supervisor([steady], poll_s=0.02, backoff_s=0.01, on_event=events.append).start()
    try:
        first = steady.proc.pid
        steady.proc.kill()
        wait_until(lambda: steady.restarts == 1 and steady.alive(), timeout=30, what="restart")
        assert steady.proc.pid != first and supervisor.wait_healthy(timeout=30)
        assert any("steady exited" in e and "restarting" in e for e in events), events
    finally:
        supervisor.stop()
        steady.proc.stop()

    events.clear()
    looping = _Watched(_sleeper(tmp_path, "looping", "raise SystemExit(3)").start())
    supervisor = Supervisor(
        [looping], poll_s=0.02, backoff_s=0.01, max_restarts=3, on_event=events.append
    ).start()
    try:
        wait_until(lambda: supervisor.failed is not None, timeout=60, what="give up")
        assert looping.restarts == 3
        assert "looping" in (supervisor.failed or "") and "3 restarts" in (supervisor.failed or "")
        assert not supervisor.wait_healthy(timeout=1)
    finally:
        supervisor.stop()
        looping.proc.stop()
