"""The local stack: Redis, generator, ranker and a Celery trainer worker as processes on this machine.

    with LocalStack(StackSpec.from_config(cfg), RUN_DIR / "local") as stack:
        stack.generator_url, stack.ranker_url, stack.redis_url, stack.admin_token

Each service is the real one (`python -m services.generator`, `python -m services.ranker`,
`python -m services.trainer`) on a loopback port, its log under `workdir/logs/`, its GPUs set by
CUDA_VISIBLE_DEVICES. Redis is the machine's if one answers (or the URL the config names), else a
private redis-server with its data in `workdir/redis`. Everything started here is stopped on exit,
in order (worker, ranker, generator, then Redis), whatever happened; and if this process dies
without a word (`kill -9`), a `GroupReaper` kills every service's process group within a second.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pairloop_local.processes import GroupReaper, ManagedProcess, ProcessFailedError, free_port
from pairloop_local.redis_server import RedisHandle, ensure_redis

if TYPE_CHECKING:
    from orchestrator.config import RunConfig

__all__ = ["LocalStack", "StackSpec", "wait_for_worker"]


@dataclass
class StackSpec:
    """What the local stack starts; `from_config` builds it from a run config's `local:` section."""

    store: Path
    base_model: Path
    ranker_args: list[str] = field(default_factory=lambda: ["--model", "llm-blender/PairRM"])
    # None: a private redis-server. A URL: that Redis if it answers, else (with redis_fallback)
    # a private one.
    redis_url: str | None = None
    redis_fallback: bool = True
    generator_args: list[str] = field(default_factory=list)
    trainer_args: list[str] = field(default_factory=list)
    # The Celery queue the worker consumes (None: the trainer's default).
    train_queue: str | None = None
    cpu_threads: int = 1
    startup_timeout: float = 300.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Per service (generator, ranker, trainer): environment on top of extra_env, and a fixed port.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: RunConfig, *, train_queue: str | None = None) -> StackSpec:
        """The stack `cfg` needs: its base model, the ranker and devices its `local:` names."""
        from pairloop.settings import RedisSettings

        local = cfg.local
        if local.redis == "private":
            redis_url, fallback = None, True
        elif local.redis == "auto":
            redis_url, fallback = RedisSettings().redis_url, True
        else:
            redis_url, fallback = local.redis, False
        service_env: dict[str, dict[str, str]] = {}
        ports: dict[str, int] = {}
        for name, svc in (
            ("generator", local.generator),
            ("ranker", local.ranker),
            ("trainer", local.trainer),
        ):
            env = dict(svc.env)
            if svc.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in svc.gpus)
            service_env[name] = env
            if svc.port is not None:
                ports[name] = svc.port
        ranker = local.ranker
        return cls(
            store=Path(cfg.model_store),
            base_model=Path(cfg.base_model),
            ranker_args=[
                "--backend",
                ranker.backend,
                "--model",
                ranker.model,
                "--device",
                ranker.device,
                *ranker.args,
            ],
            redis_url=redis_url,
            redis_fallback=fallback,
            generator_args=list(local.generator.args),
            trainer_args=["--device", local.trainer.device, *local.trainer.args],
            train_queue=train_queue,
            cpu_threads=local.cpu_threads,
            startup_timeout=local.startup_timeout_s,
            service_env=service_env,
            ports=ports,
        )


def wait_for_worker(
    redis_url: str,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    destination: str | None = None,
) -> None:
    """Wait until a Celery worker on `redis_url` (the one named `destination`) answers a ping."""
    from pairloop.train_client import make_train_client

    app = make_train_client(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not alive():
                raise ProcessFailedError("trainer worker exited during start-up")
            dest = [destination] if destination else None
            if app.control.ping(timeout=0.5, destination=dest):
                return
        raise ProcessFailedError(f"no trainer worker answered within {timeout:.0f}s")
    finally:
        app.close()


class LocalStack:
    """Start the whole stack on loopback; stop everything started here on exit."""

    def __init__(
        self, spec: StackSpec, workdir: str | Path, *, admin_token: str | None = None
    ) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self.redis: RedisHandle | None = None
        self.processes: list[ManagedProcess] = []
        self.reaper: GroupReaper | None = None
        self.generator_url = ""
        self.ranker_url = ""
        self._tmpdir: Path | None = None

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise ProcessFailedError("stack not started")
        return self.redis.url

    def pids(self) -> list[int]:
        """Process-group leaders started here (each service's group has its id)."""
        out = [p.pid for p in self.processes]
        if self.redis is not None and self.redis.process is not None:
            out.append(self.redis.process.pid)
        return out

    def _env(self, service: str | None = None, **extra: str) -> dict[str, str]:
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
        if service is not None:
            env.update(self.spec.service_env.get(service, {}))
        env.update(extra)
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess(
            name, argv, log_path=self.workdir / "logs" / f"{name}.log", env=env, reaper=self.reaper
        )
        self.processes.append(proc.start())
        return proc

    def start(self) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reaper = GroupReaper().start()
        try:
            self._start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_services(self) -> None:
        spec = self.spec
        if spec.redis_url is not None and not spec.redis_fallback:
            self.redis = RedisHandle(url=spec.redis_url)
        else:
            self.redis = ensure_redis(spec.redis_url, self.workdir / "redis", reaper=self.reaper)
        gport = spec.ports.get("generator") or free_port()
        rport = spec.ports.get("ranker") or free_port()
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
                *spec.generator_args,
            ],
            # The token goes through the environment: argv is world-readable in /proc.
            self._env(
                "generator",
                PAIRLOOP_GENERATOR_ADMIN_TOKEN=self.admin_token,
                VLLM_CACHE_ROOT=str(cache / "vllm"),
                TMPDIR=str(self._tmp()),
            ),
        )
        ranker = self._start(
            "ranker",
            [sys.executable, "-m", "services.ranker", "--port", str(rport), *spec.ranker_args],
            self._env("ranker"),
        )
        node = f"pairloop-local-{gport}@127.0.0.1"
        worker = self._start(
            "trainer-worker",
            [
                sys.executable,
                "-m",
                "services.trainer",
                "--model-store-root",
                str(spec.store),
                "--cpu-threads",
                str(spec.cpu_threads),
                "--hostname",
                node,
                *(["--queue", spec.train_queue] if spec.train_queue else []),
                *spec.trainer_args,
            ],
            self._env("trainer", HF_DATASETS_CACHE=str(cache / "datasets")),
        )
        self.generator_url = f"http://127.0.0.1:{gport}"
        self.ranker_url = f"http://127.0.0.1:{rport}"
        ranker.wait_ready(f"{self.ranker_url}/ready", timeout=spec.startup_timeout)
        generator.wait_ready(f"{self.generator_url}/ready", timeout=spec.startup_timeout)
        try:
            wait_for_worker(
                self.redis_url,
                timeout=spec.startup_timeout,
                alive=worker.alive,
                destination=node,
            )
        except ProcessFailedError as exc:
            raise ProcessFailedError(
                f"{exc}\n--- {worker.log_path} ---\n{worker.log_tail()}"
            ) from None

    def _tmp(self) -> Path:
        # In the system's temp directory, not under workdir: vLLM puts its ZeroMQ IPC sockets
        # here, and a socket path may not exceed 107 bytes (a run directory easily does).
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="pairloop-"))
        return self._tmpdir

    def stop(self) -> None:
        """Stop the worker, ranker and generator (in that order), then a Redis started here."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
