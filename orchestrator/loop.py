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
    iter{k}.release              (placement time_shared) the generator frees its GPUs for training
    iter{k}.train                Celery DPO job -> checkpoints/policy{k}
    iter{k}.swap                 generator swaps to policy k in place
      or iter{k}.wake            (time_shared) the generator wakes straight onto policy k
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
from orchestrator.preflight import check_generators
from orchestrator.report import write_report
from orchestrator.run_state import resume_command
from orchestrator.runs import RunLockedError, create_run, load_run, run_lock
from orchestrator.settings import OrchestratorSettings
from orchestrator.stages import evaluate, generate, pairs, placement, rank, report, swap, train
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
    redo: bool = False,
) -> dict[str, Any]:
    """Run a stage unless done (or `redo`: an idempotent stage that must hold again now); record
    wall time, service time and metrics in the manifest."""
    if ctx.manifest.is_done(name) and not redo:
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
    time_shared = ctx.cfg.placement == "time_shared"
    if evaluating:
        await _stage(ctx, "policy0.evaluate", evaluate.run_base)
    for k in range(1, ctx.cfg.iterations + 1):
        await _stage(ctx, f"iter{k}.generate", generate.run, k)
        await _stage(ctx, f"iter{k}.rank", rank.run, k)
        await _stage(ctx, f"iter{k}.pairs", pairs.run, k)
        if time_shared:
            # Redone on every resume until training is done: a generator restarted meanwhile
            # would hold the GPUs the trainer's ranks need.
            trained = ctx.manifest.is_done(f"iter{k}.train")
            await _stage(ctx, f"iter{k}.release", placement.release, k, redo=not trained)
        await _stage(ctx, f"iter{k}.train", train.run, k)
        if time_shared:
            await _stage(ctx, f"iter{k}.wake", placement.wake, k)
        else:
            await _stage(ctx, f"iter{k}.swap", swap.run, k)
        if evaluating:
            await _stage(ctx, f"iter{k}.evaluate", evaluate.run, k)
    await _stage(ctx, "report", report.run)


async def _preflight(ctx: RunContext) -> None:
    """Every service answers before any stage runs (each call retried with backoff)."""
    for generator in ctx.generators:
        # /v1/models, not /ready: a generator released by an interrupted time-shared run answers
        # it (state released) and the run's next stage wakes it.
        await generator.model_card()
    for ranker in [ctx.ranker, *([ctx.judge_client] if ctx.judge_client else [])]:
        ready = (await ranker.request("GET", "/ready")).json()
        ctx.ranker_labels[ranker.base_url] = ranker_label(ready)
        if ranker is ctx.ranker:
            ctx.ranker_replicas = ranker_replicas(ready)
    await check_generators(ctx.cfg, ctx.generators)  # the context and dtype admission assumed
    await asyncio.to_thread(
        ctx.trainer.ping_broker, should_stop=ctx.stopping.is_set
    )  # Redis: waited for up to services.broker_outage_s


def ranker_label(ready: object) -> str:
    """`PairRM llm-blender/PairRM`, `scorer plain_prose`: a ranker's /ready reply as a name."""
    if not isinstance(ready, dict) or not ready.get("backend"):
        return "ranker (kind not reported)"
    backend, model = str(ready["backend"]), str(ready.get("model", ""))
    kind = {"pairrm": "PairRM", "reward-model": "reward model"}.get(backend, backend)
    if backend == "scorer":
        model = model.rsplit(":", 1)[-1]  # package.module:function -> the function's name
    return f"{kind} {model}".strip()


def ranker_replicas(ready: object) -> int:
    """How many model replicas a ranker's /ready reply reports (1 when it does not say)."""
    count = ready.get("replicas") if isinstance(ready, dict) else None
    return count if isinstance(count, int) and count >= 1 else 1


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))


async def execute_run(
    run_dir: str | Path,
    *,
    console: Console | None = None,
    settings: OrchestratorSettings | None = None,
    services: ServicesConfig | None = None,
    judge_url: str | None = None,
    lock: bool = True,
) -> Manifest:
    """Execute (or resume) the run in `run_dir` to completion; return its final manifest.

    Failures are recorded in the manifest (status failed, the stage's error) and re-raised;
    a cancellation of this coroutine (Ctrl-C, SIGTERM) is recorded as status interrupted.
    `services` replaces the frozen config's service addresses (the local stack's, which change
    at every start); `judge_url` replaces `evaluation.judge` (the local stack's judge, likewise);
    `lock=False` when the caller already holds `run_lock(run_dir)`.
    """
    run_path = Path(run_dir).resolve()
    console = console or Console()
    settings = settings or OrchestratorSettings()
    cfg, manifest = load_run(run_path)
    if services is not None:
        cfg = cfg.model_copy(update={"services": services})
    services = cfg.services
    if judge_url is not None:
        cfg = cfg.model_copy(
            update={"evaluation": cfg.evaluation.model_copy(update={"judge": judge_url})}
        )
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
        worker_absent_s=services.worker_absent_s,
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
        before = manifest.status, manifest.error
        manifest.status, manifest.error = "running", None
        ctx.save()
        checked = False
        try:
            await ctx.refresh_generators()
            await _preflight(ctx)
            checked = True
            await _run_stages(ctx)
        except BaseException as raw:
            ctx.stopping.set()  # a training wait in its thread returns now
            exc = _first_error(raw)
            if not checked and before[0] not in ("created", "running"):
                # Nothing ran: a resume that could not reach the services leaves the run's record
                # as it was (a finished stage list must not turn into "failed" for a dead address).
                manifest.status, manifest.error = before
            elif _interrupted(exc):
                manifest.status = "interrupted"
                manifest.error = f"interrupted; `{resume_command(run_path)}` continues it"
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
