"""The iterative DPO loop's driver: runs the stages in order, records them, resumes after any crash.

    run_dir = create_run("configs/demo.yaml")      # orchestrator.runs: validates before any work
    asyncio.run(execute_run(run_dir))              # also what `pairloop resume RUN_DIR` calls

Stages, in order; each is skipped when the manifest says it is done, so `kill -9` at any point
followed by a resume redoes only the unfinished stage (and, inside generation and ranking, only the
unfinished shards):

    setup                        prompts sliced and frozen, config frozen
    policy0.evaluate             base model answers on held-out prompts
    iter{k}.generate             policy k-1 answers n times per prompt   (swaps to k-1 first if needed)
    iter{k}.rank                 ranker scores every answer
    iter{k}.pairs                chosen/rejected -> dataset splits train_iteration_k / test_iteration_k
    iter{k}.train                Celery DPO job -> checkpoints/policy{k}
    iter{k}.swap                 generator swaps to policy k in place
    iter{k}.evaluate             win rates vs base and vs policy k-1, lengths, LC win rate
    report                       report.md + plots

Each stage's body is `orchestrator.stages.<name>.run`; this module decides only the order, what the
manifest records, what is skipped on resume, and how a failure or a cancel ends the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.clients import GeneratorClient, RankerClient, TrainerClient
from orchestrator.config import ServicesConfig
from orchestrator.context import RunCancelledError, RunContext, make_progress
from orchestrator.manifest import Manifest
from orchestrator.report import write_report
from orchestrator.runs import RunLockedError, create_run, load_run, run_lock
from orchestrator.settings import OrchestratorSettings
from orchestrator.stages import evaluate, generate, pairs, rank, report, swap, train
from pairloop.settings import redis_url_for

# create_run and RunLockedError are re-exported: `from orchestrator.loop import create_run` stays.
__all__ = ["RunLockedError", "create_run", "execute_run", "run_lock"]


def _first_error(exc: BaseException) -> BaseException:
    """TaskGroup wraps failures in ExceptionGroups; report the first real one."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _stage(
    ctx: RunContext,
    name: str,
    coro_fn: Callable[..., Awaitable[dict[str, Any]]],
    *args: Any,
) -> dict[str, Any]:
    """Run a stage unless done; record wall time, service time and metrics in the manifest."""
    if ctx.manifest.is_done(name):
        return ctx.manifest.stages[name].metrics
    ctx.check_cancel()
    before = ctx.service_seconds()
    with ctx.manifest.running(name, ctx.run_dir) as record:
        metrics = await coro_fn(ctx, *args)
        record.metrics = metrics or {}
        record.service_seconds = ctx.service_seconds() - before
    return record.metrics


async def _run_stages(ctx: RunContext) -> None:
    evaluating = ctx.cfg.evaluation.enabled
    if evaluating:
        await _stage(ctx, "policy0.evaluate", evaluate.run_base)
    for k in range(1, ctx.cfg.iterations + 1):
        await _stage(ctx, f"iter{k}.generate", generate.run, k)
        await _stage(ctx, f"iter{k}.rank", rank.run, k)
        await _stage(ctx, f"iter{k}.pairs", pairs.run, k)
        await _stage(ctx, f"iter{k}.train", train.run, k)
        await _stage(ctx, f"iter{k}.swap", swap.run, k)
        if evaluating:
            await _stage(ctx, f"iter{k}.evaluate", evaluate.run, k)
    await _stage(ctx, "report", report.run)


async def _preflight(ctx: RunContext) -> None:
    """Every service answers before any stage runs (each call retried with backoff)."""
    for client in [*ctx.generators, ctx.ranker, *([ctx.judge_client] if ctx.judge_client else [])]:
        await client.request("GET", "/ready")
    await asyncio.to_thread(
        ctx.trainer.ping_broker, should_stop=ctx.stopping.is_set
    )  # Redis: waited for up to services.broker_outage_s


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))


async def execute_run(
    run_dir: str | Path,
    *,
    console: Console | None = None,
    settings: OrchestratorSettings | None = None,
    services: ServicesConfig | None = None,
    lock: bool = True,
) -> Manifest:
    """Execute (or resume) the run in `run_dir` to completion; return its final manifest.

    Failures are recorded in the manifest (status failed, the stage's error) and re-raised;
    a cancellation of this coroutine (Ctrl-C, SIGTERM) is recorded as status interrupted.
    `services` replaces the frozen config's service addresses (the local stack's, which change
    at every start); `lock=False` when the caller already holds `run_lock(run_dir)`.
    """
    run_path = Path(run_dir).resolve()
    console = console or Console()
    settings = settings or OrchestratorSettings()
    cfg, manifest = load_run(run_path)
    if services is not None:
        cfg = cfg.model_copy(update={"services": services})
    services = cfg.services
    token = (
        settings.generator_admin_token.get_secret_value()
        if settings.generator_admin_token
        else None
    )
    timeout, retries = services.request_timeout_s, services.retries

    def make_generator(url: str) -> GeneratorClient:
        return GeneratorClient(url, admin_token=token, timeout=timeout, retries=retries)

    # With generator_dns the replicas are resolved inside the run (and again before each swap).
    generators = (
        [] if services.generator_dns else [make_generator(u) for u in services.generator_urls]
    )
    ranker = RankerClient(services.ranker_url, timeout=timeout, retries=retries)
    judge_url = cfg.evaluation.judge
    judge = (
        RankerClient(judge_url, timeout=timeout, retries=retries)
        if judge_url and judge_url != ranker.base_url
        else None
    )
    trainer = TrainerClient(
        redis_url_for(services.redis_url),
        outage_s=services.broker_outage_s,
        queue=services.train_queue,
    )
    held = run_lock(run_path) if lock else contextlib.nullcontext()
    with held, make_progress(console) as progress:
        ctx = RunContext(
            run_dir=run_path,
            cfg=cfg,
            manifest=manifest,
            generators=generators,
            ranker=ranker,
            trainer=trainer,
            console=console,
            progress=progress,
            fault_kill_after=settings.fault_kill_after,
            make_generator=make_generator,
            judge_client=judge,
        )
        manifest.status, manifest.error = "running", None
        ctx.save()
        try:
            await ctx.refresh_generators()
            await _preflight(ctx)
            await _run_stages(ctx)
        except BaseException as raw:
            ctx.stopping.set()  # a training wait in its thread returns now
            exc = _first_error(raw)
            if _interrupted(exc):
                manifest.status = "interrupted"
                manifest.error = f"interrupted; `pairloop resume {run_path}` continues it"
            else:
                cancelled = isinstance(exc, (RunCancelledError, InterruptedError))
                manifest.status = "cancelled" if cancelled else "failed"
                manifest.error = f"{type(exc).__name__}: {exc}"
            ctx.save()
            if exc is not raw and isinstance(exc, Exception):
                raise exc from None
            raise
        finally:
            for g in ctx.generators:
                await g.aclose()
            await ranker.aclose()
            if judge is not None:
                await judge.aclose()
            trainer.close()
        manifest.status = "completed"
        ctx.save()
        write_report(run_path, manifest)  # again, now that the header can say "completed"
    return manifest
