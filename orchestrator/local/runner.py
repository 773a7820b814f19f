"""Execute a run on the local stack: start what its config needs, run (or resume) it, stop it all.

    manifest = run_local(run_dir, console=console)       # `pairloop run CONFIG --local`
                                                          # `pairloop resume RUN_DIR --local`

The stack lives in RUN_DIR/local/ (service logs, a private Redis's data, caches, `stack.json`
with its addresses and process ids, and `secrets.json`), so a resume finds the admin token the
killed run's generator used and the Redis data it left. The run's lock is taken before any service
starts: a second `resume --local` of the same run fails at once instead of starting a second stack.

While the run executes, the stack's supervisor restarts a service that dies (the generator back on
the run's current weights). A run step that failed because of it (a request that outlived its
retries, a training wait cut short) is resumed once the stack is healthy again: every stage is
resumable, so the finished work is kept and the artifacts are those of an undisturbed run. A service
that keeps dying (the supervisor's restart cap) stops the run with one line naming it.

SIGINT and SIGTERM cancel the run (recorded as interrupted), then the stack stops in order.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr
from rich.console import Console

from orchestrator.config import RunConfig, ServicesConfig
from orchestrator.local.secrets import load_or_create_admin_token, load_or_create_secret
from orchestrator.local.stack import LocalStack, StackSpec
from orchestrator.manifest import Manifest, load_manifest
from orchestrator.settings import OrchestratorSettings
from pairloop.atomic import atomic_write_json
from pairloop.jobs import TRAIN_QUEUE
from pairloop_local.processes import ProcessFailedError

__all__ = ["LOCAL_DIR", "STACK_FILE", "run_local", "run_until_signal", "sigterm_interrupts"]

LOCAL_DIR = "local"
STACK_FILE = "stack.json"

T = TypeVar("T")


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt as Ctrl-C does: `finally` blocks run."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_until_signal(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)`, with SIGTERM cancelling it the way Ctrl-C does.

    Raises KeyboardInterrupt (Ctrl-C) or asyncio.CancelledError (SIGTERM) once `coro` has
    handled its cancellation (the loop records the run as interrupted).
    """

    async def main() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    with sigterm_interrupts():
        try:
            return asyncio.run(main())
        finally:
            # asyncio restores SIG_DFL on removal; SIGTERM must keep interrupting until we return.
            signal.signal(signal.SIGTERM, _raise_interrupt)


def current_weights(run_dir: Path, cfg: RunConfig) -> tuple[str, str] | None:
    """(checkpoint path, version label) the run's generator serves now, per its manifest."""
    label = load_manifest(run_dir).current_version
    if not label or ".policy" not in label:
        return None
    k = label.rsplit(".policy", 1)[1]
    if not k.isdigit():
        return None
    path = Path(cfg.base_model) if int(k) == 0 else run_dir / "checkpoints" / f"policy{k}"
    return str(path), label


def _write_stack_file(local_dir: Path, stack: LocalStack) -> None:
    atomic_write_json(
        local_dir / STACK_FILE,
        {
            "generator_url": stack.generator_url,
            "ranker_url": stack.ranker_url,
            "judge_url": stack.judge_url,
            "redis_url": stack.redis_url_redacted,  # the password stays in secrets.json
            "process_groups": stack.pids(),
            "services": stack.service_pids(),
            "reaper_pid": stack.reaper.pid if stack.reaper else None,
        },
    )


def run_local(
    run_dir: Path,
    *,
    console: Console,
    settings: OrchestratorSettings | None = None,
    on_started: Callable[[LocalStack], None] | None = None,
) -> Manifest:
    """Start the stack RUN_DIR's config needs, execute the run to its end, stop the stack."""
    from orchestrator.runs import load_run, run_lock

    run_dir = run_dir.resolve()
    cfg, _ = load_run(run_dir)
    local_dir = run_dir / LOCAL_DIR
    token = load_or_create_admin_token(local_dir)
    redis_password = load_or_create_secret(local_dir, "redis_password")
    base = settings or OrchestratorSettings()
    settings = base.model_copy(update={"generator_admin_token": SecretStr(token)})
    with sigterm_interrupts(), run_lock(run_dir):
        console.print(
            f"starting the local stack: redis, generator, ranker, "
            f"{'judge, ' if cfg.local.judge is not None else ''}trainer worker "
            f"(logs: {local_dir / 'logs'})"
        )
        # A queue of this run's own: on a shared Redis no other run's worker takes its jobs, and
        # a job left there by a killed stack is only ever run by this run's next stack.
        queue = f"{TRAIN_QUEUE}.{cfg.run_id}"
        spec = StackSpec.from_config(cfg, train_queue=queue)
        with LocalStack(
            spec,
            local_dir,
            admin_token=token,
            redis_password=redis_password,
            generator_weights=lambda: current_weights(run_dir, cfg),
            on_event=lambda msg: console.print(f"local stack: {msg}", highlight=False),
        ) as stack:
            redis_kind = (
                "a private redis-server"
                if stack.redis is not None and stack.redis.started_here
                else "the Redis"
            )
            judge = f"judge {stack.judge_url}, " if stack.judge_url else ""
            console.print(
                f"stack up: generator {stack.generator_url}, ranker {stack.ranker_url}, "
                f"{judge}{redis_kind} at {stack.redis_url_redacted}"
            )
            _write_stack_file(local_dir, stack)
            stack.on_restart = lambda s: _write_stack_file(local_dir, s)
            if on_started is not None:
                on_started(stack)
            services = cfg.services.model_copy(
                update={
                    "generator_urls": [stack.generator_url],
                    "generator_dns": None,
                    "ranker_url": stack.ranker_url,
                    "redis_url": stack.redis_url,
                    "train_queue": queue,
                }
            )
            return _execute_supervised(
                run_dir, stack, console=console, settings=settings, services=services
            )


def _execute_supervised(
    run_dir: Path,
    stack: LocalStack,
    *,
    console: Console,
    settings: OrchestratorSettings,
    services: ServicesConfig,
) -> Manifest:
    """Execute the run; resume it after a failure that a service restart caused."""
    from orchestrator.loop import execute_run

    supervisor = stack.supervisor

    async def attempt() -> Manifest:
        # A service the supervisor gave up on stops the run at once, even one blocked in a wait.
        if supervisor is not None:
            loop, task = asyncio.get_running_loop(), asyncio.current_task()
            if task is not None:

                def give_up(_message: str) -> None:
                    loop.call_soon_threadsafe(task.cancel)

                supervisor.on_give_up = give_up
        try:
            return await execute_run(
                run_dir,
                console=console,
                settings=settings,
                services=services,
                judge_url=stack.judge_url,
                lock=False,
            )
        finally:
            if supervisor is not None:
                supervisor.on_give_up = None

    while True:
        deaths = supervisor.deaths if supervisor is not None else 0
        try:
            return run_until_signal(attempt())
        except (Exception, asyncio.CancelledError) as exc:
            if supervisor is not None and supervisor.failed is not None:
                raise ProcessFailedError(supervisor.failed) from None
            if supervisor is None or isinstance(exc, asyncio.CancelledError):
                raise
            if supervisor.deaths == deaths:
                raise  # not ours to retry: no service died during this attempt
            console.print(
                f"local stack: the run stopped while a service was down "
                f"({type(exc).__name__}); resuming it once the stack is healthy again",
                highlight=False,
            )
            timeout = stack.spec.startup_timeout * 2
            if not supervisor.wait_healthy(timeout=timeout):
                raise ProcessFailedError(
                    supervisor.failed
                    or f"the local stack was not healthy again within {timeout:.0f}s"
                ) from None
