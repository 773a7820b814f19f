"""The embedded stack: Redis, generator, ranker and a Celery trainer worker as local processes.

    with LocalStack(StackSpec(store=..., base_model=..., ranker=...), workdir) as stack:
        stack.generator_url, stack.ranker_url, stack.redis_url

Each service is the real one (`python -m services.generator`, `python -m services.ranker`,
`celery -A services.trainer.celery_app worker`) on a free loopback port, its log under
`workdir/logs/`. Redis is the machine's if one answers at the configured URL, else a private
redis-server. Everything started here is stopped on exit, whatever happened.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pairloop_local.processes import ManagedProcess, ProcessFailedError, free_port
from pairloop_local.redis_server import RedisHandle, ensure_redis

__all__ = ["LocalStack", "StackSpec", "wait_for_worker"]


@dataclass
class StackSpec:
    store: Path
    base_model: Path
    ranker_args: list[str] = field(default_factory=lambda: ["--model", "llm-blender/PairRM"])
    redis_url: str | None = None
    generator_args: list[str] = field(default_factory=list)
    cpu_threads: int = 1
    startup_timeout: float = 300.0
    extra_env: dict[str, str] = field(default_factory=dict)


def wait_for_worker(
    redis_url: str, *, timeout: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Wait until a Celery worker on `redis_url` answers a control ping."""
    from pairloop.train_client import make_train_client

    app = make_train_client(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not alive():
                raise ProcessFailedError("trainer worker exited during start-up")
            if app.control.ping(timeout=0.5):
                return
        raise ProcessFailedError(f"no trainer worker answered within {timeout:.0f}s")
    finally:
        app.close()


class LocalStack:
    """Start the whole stack on loopback; stop everything started here on exit."""

    def __init__(self, spec: StackSpec, workdir: str | Path) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.admin_token = secrets.token_urlsafe(24)
        self.redis: RedisHandle | None = None
        self.processes: list[ManagedProcess] = []
        self.generator_url = ""
        self.ranker_url = ""

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise ProcessFailedError("stack not started")
        return self.redis.url

    def _env(self, **extra: str) -> dict[str, str]:
        import os

        env = dict(os.environ)
        threads = str(self.spec.cpu_threads)
        env.update(
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
            PYTHONUNBUFFERED="1",
            PAIRLOOP_REDIS_URL=self.redis_url,
        )
        env.update(self.spec.extra_env)
        env.update(extra)
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, log_path=self.workdir / "logs" / f"{name}.log", env=env)
        self.processes.append(proc.start())
        return proc

    def start(self) -> LocalStack:
        spec = self.spec
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis = ensure_redis(spec.redis_url, self.workdir / "redis")
        gport, rport = free_port(), free_port()
        cache = self.workdir / "cache"
        generator = self._start(
            "generator",
            [
                sys.executable,
                "-m",
                "services.generator",
                "--model",
                str(spec.base_model),
                "--model-root",
                str(spec.store),
                "--port",
                str(gport),
                "--admin-token",
                self.admin_token,
                *spec.generator_args,
            ],
            self._env(VLLM_CACHE_ROOT=str(cache / "vllm"), TMPDIR=str(self._tmp())),
        )
        ranker = self._start(
            "ranker",
            [sys.executable, "-m", "services.ranker", "--port", str(rport), *spec.ranker_args],
            self._env(),
        )
        worker = self._start(
            "trainer-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "services.trainer.celery_app",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                "1",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"pairloop-embedded-{gport}@%h",
            ],
            self._env(
                PAIRLOOP_TRAINER_MODEL_STORE_ROOT=str(spec.store),
                PAIRLOOP_TRAINER_CPU_THREADS=str(spec.cpu_threads),
                HF_DATASETS_CACHE=str(cache / "datasets"),
            ),
        )
        self.generator_url = f"http://127.0.0.1:{gport}"
        self.ranker_url = f"http://127.0.0.1:{rport}"
        try:
            ranker.wait_ready(f"{self.ranker_url}/ready", timeout=spec.startup_timeout)
            generator.wait_ready(f"{self.generator_url}/ready", timeout=spec.startup_timeout)
            try:
                wait_for_worker(self.redis_url, timeout=spec.startup_timeout, alive=worker.alive)
            except ProcessFailedError as exc:
                raise ProcessFailedError(
                    f"{exc}\n--- {worker.log_path} ---\n{worker.log_tail()}"
                ) from None
        except BaseException:
            self.stop()
            raise
        return self

    def _tmp(self) -> Path:
        path = self.workdir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
