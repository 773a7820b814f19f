"""Local process management and the embedded Redis: real processes, real redis-server."""

from __future__ import annotations

import contextlib
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


_PARENT = """
import sys, time
from pairloop_local.processes import GroupReaper, ManagedProcess
reaper = GroupReaper().start() if sys.argv[2] == "reaper" else None
# The child starts a grandchild in its own process group, as vLLM and Celery's pool do.
child = ManagedProcess(
    "child",
    [sys.executable, "-c", "import subprocess, sys, time; "
     "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
     "print(g.pid, flush=True); time.sleep(600)"],
    log_path=sys.argv[1],
    reaper=reaper,
).start()
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _sigkilled_parent(tmp_path: Path, mode: str) -> tuple[int, int]:
    """Start a parent that starts a managed child (with a grandchild); SIGKILL the parent."""
    import signal
    import subprocess

    from pairloop_local.processes import wait_until

    log = tmp_path / "child.log"
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(log), mode], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    wait_until(
        lambda: log.is_file() and log.read_text().strip() != "", timeout=30, what="grandchild"
    )
    grandchild = int(log.read_text().split()[0])
    assert _alive(child) and _alive(grandchild)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return child, grandchild


def test_a_sigkilled_parents_children_and_grandchildren_die_with_a_reaper(tmp_path: Path) -> None:
    from pairloop_local.processes import wait_until

    child, grandchild = _sigkilled_parent(tmp_path, "reaper")
    wait_until(
        lambda: not _alive(child) and not _alive(grandchild), timeout=10, what="orphans gone"
    )


def test_the_parent_death_signal_alone_ends_the_direct_child(tmp_path: Path) -> None:
    import os
    import signal

    from pairloop_local.processes import wait_until

    child, grandchild = _sigkilled_parent(tmp_path, "none")
    try:
        wait_until(lambda: not _alive(child), timeout=10, what="child gone")
    finally:
        # Without the reaper the grandchild is not reached: that is what the reaper is for.
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
