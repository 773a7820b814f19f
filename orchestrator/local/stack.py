"""The local stack: Redis, generator, ranker and a Celery trainer worker as processes on this machine.

    with LocalStack(StackSpec.from_config(cfg), RUN_DIR / "local") as stack:
        stack.generator_url, stack.ranker_url, stack.redis_url, stack.admin_token

Each service is the real one (`python -m services.generator`, `python -m services.ranker`,
`python -m services.trainer`; with `local.judge`, a second `services.ranker` as the evaluations'
judge, `stack.judge_url`) on a loopback port, its log under `workdir/logs/`, its GPUs set by
CUDA_VISIBLE_DEVICES, passed `--host 127.0.0.1` whatever the inherited environment says. Redis is
the one a URL names explicitly (the config's `local.redis`, or PAIRLOOP_REDIS_URL with `auto`) if
it answers, else a private redis-server with a password, its data in `workdir/redis`. Each
service's readiness is proven by the nonce and pid its `/health` echoes (`pairloop.contracts.health`)
and the private Redis's by its password and process id, so a port held by another process is
reported, never talked to.

After start-up a `Supervisor` watches every service and restarts a dead one with backoff (the
generator is swapped back onto the run's current weights, `generator_weights`). Everything started
here is stopped on exit, in order (worker, ranker, generator, then Redis), whatever happened; and if
this process dies without a word (`kill -9`), a `GroupReaper` kills every service's process group
within a second. Temporary files (vLLM's IPC sockets and scratch) live in one directory per stack,
recorded in `workdir/tmp.json` and removed at the next start if a killed stack left it behind.
"""

from __future__ import annotations

import json
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

import httpx

from orchestrator.local.supervisor import Supervisor
from pairloop.redact import redact_url
from pairloop_local.processes import (
    GroupReaper,
    ManagedProcess,
    ProcessFailedError,
    check_port_free,
    free_port,
)
from pairloop_local.redis_server import RedisHandle, ensure_redis, wait_for_redis

if TYPE_CHECKING:
    from orchestrator.config import LocalRankerConfig, LocalServiceConfig, RunConfig

__all__ = ["TMP_RECORD", "LocalStack", "StackSpec", "wait_for_worker"]

TMP_RECORD = "tmp.json"
_TMP_PREFIX = "pairloop-"


@dataclass
class StackSpec:
    """What the local stack starts; `from_config` builds it from a run config's `local:` section."""

    store: Path
    base_model: Path
    ranker_args: list[str] = field(default_factory=lambda: ["--model", "llm-blender/PairRM"])
    # A second ranker process, the evaluations' judge (`local.judge`); None: none is started.
    judge_args: list[str] | None = None
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
    # Per service (generator, ranker, judge, trainer): environment on top of extra_env, and a
    # fixed port.
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
            # Only a Redis someone named: the run config's, or PAIRLOOP_REDIS_URL set explicitly.
            # Whatever happens to answer on 127.0.0.1:6379 may be anyone's (and has no password).
            redis_env = RedisSettings()
            named = cfg.services.redis_url or (
                redis_env.redis_url if "redis_url" in redis_env.model_fields_set else None
            )
            redis_url, fallback = named, True
        else:
            redis_url, fallback = local.redis, False
        service_env: dict[str, dict[str, str]] = {}
        ports: dict[str, int] = {}
        services: list[tuple[str, LocalServiceConfig]] = [
            ("generator", local.generator),
            ("ranker", local.ranker),
            ("trainer", local.trainer),
        ]
        if local.judge is not None:
            services.append(("judge", local.judge))
        for name, svc in services:
            env = dict(svc.env)
            if svc.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in svc.gpus)
            service_env[name] = env
            if svc.port is not None:
                ports[name] = svc.port
        return cls(
            store=Path(cfg.model_store),
            base_model=Path(cfg.base_model),
            ranker_args=_ranker_args(local.ranker, replicas=True),
            judge_args=_ranker_args(local.judge) if local.judge is not None else None,
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


def _ranker_args(ranker: LocalRankerConfig, *, replicas: bool = False) -> list[str]:
    """The ranker service's flags. The run's ranker on `cuda` keeps a replica on every GPU it
    sees (`gpus`, else all), as the GPU deployments do; the judge stays on one device."""
    device = (
        ["--devices", "cuda:all"]
        if replicas and ranker.device == "cuda"
        else [
            "--device",
            ranker.device,
        ]
    )
    return ["--backend", ranker.backend, "--model", ranker.model, *device, *ranker.args]


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


class _Service:
    """One supervised service: how to start it and how to know the new process is ready."""

    def __init__(
        self,
        stack: LocalStack,
        process: ManagedProcess,
        ready: Callable[[ManagedProcess], None],
        after_restart: Callable[[], None] | None = None,
    ) -> None:
        self.name = process.name
        self.stack = stack
        self.process = process
        self.ready = ready
        self.after_restart = after_restart

    def alive(self) -> bool:
        return self.process.alive()

    def exit_status(self) -> str:
        proc = self.process.proc
        code = proc.poll() if proc is not None else None
        if code is None:
            return "running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def restart(self) -> None:
        self.process.stop()  # the rest of the old group (vLLM's engine core, pool children)
        self.stack.clean_tmp(self.name.removesuffix("-worker"))
        self.process.start()
        self.ready(self.process)
        if self.after_restart is not None:
            self.after_restart()
        if self.stack.on_restart is not None:
            self.stack.on_restart(self.stack)


class LocalStack:
    """Start the whole stack on loopback; stop everything started here on exit.

    `generator_weights()` returns the run's current (checkpoint path, version label), or None
    for the base model: a restarted generator is swapped back onto them before it counts as up.
    `on_restart(stack)` is called after every restart (the runner rewrites `stack.json`).
    """

    def __init__(
        self,
        spec: StackSpec,
        workdir: str | Path,
        *,
        admin_token: str | None = None,
        redis_password: str | None = None,
        generator_weights: Callable[[], tuple[str, str] | None] | None = None,
        supervise: bool = True,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self.redis_password = redis_password or secrets.token_urlsafe(24)
        self.generator_weights = generator_weights
        self.on_event = on_event
        self.on_restart: Callable[[LocalStack], None] | None = None
        self.redis: RedisHandle | None = None
        self.processes: list[ManagedProcess] = []
        self.services: list[_Service] = []
        self.supervisor: Supervisor | None = None
        self._supervise = supervise
        self.reaper: GroupReaper | None = None
        self.generator_url = ""
        self.ranker_url = ""
        self.judge_url: str | None = None  # only with spec.judge_args
        self._tmpdir: Path | None = None

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise ProcessFailedError("stack not started")
        return self.redis.url

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL without its password: for consoles, logs and `stack.json`."""
        return redact_url(self.redis_url)

    def pids(self) -> list[int]:
        """Process-group leaders started here (each service's group has its id)."""
        out = [p.pid for p in self.processes if p.proc is not None]
        if self.redis is not None and self.redis.process is not None:
            out.append(self.redis.process.pid)
        return out

    def service_pids(self) -> dict[str, int]:
        """Each service's current process-group leader, by name."""
        return {s.name: s.process.pid for s in self.services if s.process.proc is not None}

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
            # Each service's own scratch (vLLM's IPC sockets and temp files), emptied on a
            # restart; the config's own TMPDIR for a service wins.
            env["TMPDIR"] = str(self._tmp(service))
            env.update(self.spec.service_env.get(service, {}))
        env.update(extra)
        return env

    def _start(
        self, name: str, argv: list[str], env: dict[str, str], *, instance_env: str | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(
            name,
            argv,
            log_path=self.workdir / "logs" / f"{name}.log",
            env=env,
            reaper=self.reaper,
            instance_env=instance_env,
        )
        self.processes.append(proc.start())
        return proc

    def start(self) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._claim_tmp()
        self.reaper = GroupReaper().start()
        try:
            self._start_services()
        except BaseException:
            self.stop()
            raise
        if self._supervise:
            self.supervisor = Supervisor(self.services, on_event=self.on_event).start()
        return self

    def _start_services(self) -> None:
        spec = self.spec
        # A fixed port someone else holds is refused before anything starts (the readiness
        # checks below would catch it too, after a service's start-up).
        for name in ("generator", "ranker", "judge"):
            if name in spec.ports:
                check_port_free(spec.ports[name], what=f"local.{name}.port")
        if spec.redis_url is not None and not spec.redis_fallback:
            self.redis = RedisHandle(url=spec.redis_url)
        else:
            self.redis = ensure_redis(
                spec.redis_url,
                self.workdir / "redis",
                reaper=self.reaper,
                password=self.redis_password,
            )
        gport = spec.ports.get("generator") or free_port()
        rport = spec.ports.get("ranker") or free_port()
        cache = self.workdir / "cache"
        # `--host` explicitly: an inherited PAIRLOOP_*_HOST=0.0.0.0 must not expose them.
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
                "--host",
                "127.0.0.1",
                "--port",
                str(gport),
                *spec.generator_args,
            ],
            # The token goes through the environment: argv is world-readable in /proc.
            self._env(
                "generator",
                PAIRLOOP_GENERATOR_ADMIN_TOKEN=self.admin_token,
                VLLM_CACHE_ROOT=str(cache / "vllm"),
            ),
            instance_env="PAIRLOOP_GENERATOR_INSTANCE_ID",
        )
        ranker = self._start_ranker("ranker", rport, spec.ranker_args)
        judge = None
        if spec.judge_args is not None:
            jport = spec.ports.get("judge") or free_port()
            judge = self._start_ranker("judge", jport, spec.judge_args)
            self.judge_url = f"http://127.0.0.1:{jport}"
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

        def http_ready(url: str) -> Callable[[ManagedProcess], None]:
            def ready(proc: ManagedProcess) -> None:
                proc.wait_ready(
                    f"{url}/ready", timeout=spec.startup_timeout, health_url=f"{url}/health"
                )

            return ready

        def worker_ready(proc: ManagedProcess) -> None:
            try:
                wait_for_worker(
                    self.redis_url, timeout=spec.startup_timeout, alive=proc.alive, destination=node
                )
            except ProcessFailedError as exc:
                raise ProcessFailedError(
                    f"{exc}\n--- {proc.log_path} ---\n{proc.log_tail()}"
                ) from None

        services = [_Service(self, ranker, http_ready(self.ranker_url))]
        if judge is not None and self.judge_url is not None:
            services.append(_Service(self, judge, http_ready(self.judge_url)))
        services += [
            _Service(self, generator, http_ready(self.generator_url), self._reswap_generator),
            _Service(self, worker, worker_ready),
        ]
        for service in services:
            service.ready(service.process)
        if self.redis.process is not None:
            redis_proc, url = self.redis.process, self.redis.url
            services.insert(
                0,
                _Service(
                    self,
                    redis_proc,
                    lambda p: wait_for_redis(url, p, timeout=spec.startup_timeout),
                ),
            )
        self.services = services

    def _start_ranker(self, name: str, port: int, args: list[str]) -> ManagedProcess:
        """`python -m services.ranker` as `name` (the ranker, or the judge) on loopback `port`."""
        argv = [sys.executable, "-m", "services.ranker", "--host", "127.0.0.1", "--port", str(port)]
        return self._start(
            name, [*argv, *args], self._env(name), instance_env="PAIRLOOP_RANKER_INSTANCE_ID"
        )

    def _reswap_generator(self) -> None:
        """Put a restarted generator back on the run's current weights (it starts on the base)."""
        current = self.generator_weights() if self.generator_weights is not None else None
        if current is None:
            return
        path, version = current
        with httpx.Client(base_url=self.generator_url, timeout=600.0) as client:
            reply = client.post(
                "/admin/weights",
                json={"path": path, "version": version},
                headers={"Authorization": f"Bearer {self.admin_token}"},
            )
        if reply.status_code != 200:
            raise ProcessFailedError(
                f"the restarted generator could not be swapped to {version} ({path}): "
                f"HTTP {reply.status_code} {reply.text[:300]}"
            )

    # --- temporary files --------------------------------------------------------------------
    def _claim_tmp(self) -> None:
        """Remove the temp directory a killed stack of this workdir left, and make ours.

        In the system's temp directory, not under workdir: vLLM puts its ZeroMQ IPC sockets
        there, and a socket path may not exceed 107 bytes (a run directory easily does).
        """
        record = self.workdir / TMP_RECORD
        try:
            stale = Path(json.loads(record.read_text())["tmpdir"])
        except (OSError, ValueError, KeyError, TypeError):
            stale = None
        # Only a directory of ours: named by us, directly in the system's temp directory.
        if (
            stale is not None
            and stale.name.startswith(_TMP_PREFIX)
            and stale.parent == Path(tempfile.gettempdir())
        ):
            shutil.rmtree(stale, ignore_errors=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        from pairloop.atomic import atomic_write_json

        atomic_write_json(record, {"tmpdir": str(self._tmpdir)})

    def _tmp(self, service: str) -> Path:
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        path = self._tmpdir / service
        path.mkdir(exist_ok=True)
        return path

    def clean_tmp(self, service: str) -> None:
        """Empty `service`'s temp directory (what its killed process left there)."""
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir / service, ignore_errors=True)
            (self._tmpdir / service).mkdir(exist_ok=True)

    def stop(self) -> None:
        """Stop the worker, the judge, ranker and generator (in that order), then a Redis started
        here."""
        if self.supervisor is not None:
            self.supervisor.stop()  # first: a service stopped on purpose is not restarted
            self.supervisor = None
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
            (self.workdir / TMP_RECORD).unlink(missing_ok=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
