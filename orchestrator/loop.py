"""The iterative DPO loop: create a run from a config, execute it, resume it after any crash.

    run_dir = create_run("configs/demo.yaml")      # validates everything before any work
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
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from orchestrator.clients import GeneratorClient, RankerClient, TrainerClient
from orchestrator.config import ConfigError, RunConfig, check_paths, load_run_config
from orchestrator.context import RunCancelledError, RunContext, make_progress
from orchestrator.manifest import MANIFEST_NAME, Manifest, load_manifest
from orchestrator.pairs import build_pairs
from orchestrator.prompts import load_prompt_source, read_prompts, slice_prompts, write_prompts
from orchestrator.report import write_report
from orchestrator.settings import OrchestratorSettings
from orchestrator.shards import ShardStore, chunk
from orchestrator.stages.evaluate import evaluate_policy, generate_eval_outputs
from orchestrator.stages.generate import ensure_version, generate_shards
from orchestrator.stages.rank import rank_shards
from orchestrator.stages.train import train_policy
from pairloop.atomic import atomic_write_text
from pairloop.errors import PairloopError
from pairloop.preference_data import write_preference_split
from pairloop.settings import RedisSettings

__all__ = ["RunLockedError", "create_run", "execute_run", "run_lock"]

FROZEN_CONFIG = "config.yaml"


class RunLockedError(RuntimeError):
    """Another orchestrator process is executing this run."""


def create_run(config_path: str | Path, *, run_id: str | None = None) -> Path:
    """Validate the config and its inputs, then create the run directory (no service is touched).

    Raises ConfigError for anything wrong with the config, before a single file is written.
    """
    cfg = load_run_config(config_path)
    if run_id is not None:
        cfg = RunConfig.model_validate({**cfg.model_dump(), "run_id": run_id})
    check_paths(cfg)
    slices = slice_prompts(load_prompt_source(cfg.prompts), cfg.prompts, cfg.iterations)
    rid = cfg.run_id or f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = cfg.model_copy(update={"run_id": rid})
    run_dir = Path(cfg.model_store) / "runs" / rid
    if (run_dir / MANIFEST_NAME).exists():
        raise ConfigError(f"run {rid} already exists at {run_dir}; use `pairloop resume {run_dir}`")
    for name, prompts in slices.items():
        write_prompts(run_dir / "prompts" / f"{name}.jsonl", prompts)
    atomic_write_text(
        run_dir / FROZEN_CONFIG, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )
    manifest = Manifest(run_id=rid, config_fingerprint=cfg.fingerprint(), iterations=cfg.iterations)
    manifest.stage("setup").state = "done"
    manifest.stage("setup").metrics = {name: len(p) for name, p in slices.items()}
    manifest.save(run_dir)
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on RUN_DIR/.lock; the kernel drops it if the process dies."""
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"run {run_dir} is being executed by another process") from None
        yield


def _load_run(run_dir: Path) -> tuple[RunConfig, Manifest]:
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / FROZEN_CONFIG).read_text()))
    manifest = load_manifest(run_dir)
    if manifest.config_fingerprint != cfg.fingerprint():
        raise ConfigError(
            f"{run_dir / FROZEN_CONFIG} was edited after the run started (fingerprint differs); "
            "results would mix two configs. Start a new run instead."
        )
    return cfg, manifest


def _first_error(exc: BaseException) -> BaseException:
    """TaskGroup wraps failures in ExceptionGroups; report the first real one."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _stage(ctx: RunContext, name: str, coro_fn, *args: Any) -> Any:  # type: ignore[no-untyped-def]
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


# --- stage bodies ---------------------------------------------------------------------------------


async def _evaluate_base(ctx: RunContext) -> dict[str, Any]:
    await ensure_version(ctx, 0)
    outputs = await generate_eval_outputs(ctx, 0)
    lengths = [len(o["output"]) for o in outputs]
    return {"mean_length": sum(lengths) / len(lengths), "eval_prompts": len(outputs)}


async def _generate(ctx: RunContext, k: int) -> dict[str, Any]:
    swap_seconds = await ensure_version(ctx, k - 1)
    prompts = read_prompts(ctx.run_dir / "prompts" / f"iteration_{k}.jsonl")
    await generate_shards(
        ctx,
        prompts=prompts,
        out_dir=ctx.iter_dir(k) / "generations",
        policy=k - 1,
        n=ctx.cfg.samples_per_prompt,
        temperature=ctx.cfg.sampling.temperature,
        max_tokens=ctx.cfg.sampling.max_tokens,
        seed_key=f"iter{k}",
        description=f"iter {k}: generate",
        stage=f"iter{k}.generate",
    )
    return {
        "prompts": len(prompts),
        "version": ctx.version_label(k - 1),
        "preswap_seconds": swap_seconds,
    }


def _shard_count(ctx: RunContext, k: int) -> int:
    prompts = read_prompts(ctx.run_dir / "prompts" / f"iteration_{k}.jsonl")
    return len(chunk(prompts, ctx.cfg.shard_size))


async def _rank(ctx: RunContext, k: int) -> dict[str, Any]:
    gen = ShardStore(ctx.iter_dir(k) / "generations")
    await rank_shards(
        ctx,
        gen=gen,
        count=_shard_count(ctx, k),
        out_dir=ctx.iter_dir(k) / "rankings",
        description=f"iter {k}: rank",
        stage=f"iter{k}.rank",
    )
    return {"mode": ctx.cfg.ranker.mode}


async def _pairs(ctx: RunContext, k: int) -> dict[str, Any]:
    ranked = ShardStore(ctx.iter_dir(k) / "rankings").read_all(_shard_count(ctx, k))
    train, test, stats = build_pairs(ranked, ctx.cfg.pairs)
    if not train:
        raise PairloopError(
            f"iteration {k}: no training pairs ({stats.ties_dropped} ties, "
            f"{stats.too_few_responses} prompts with <2 non-empty responses); raise sampling.temperature "
            "or max_tokens, or use more prompts"
        )
    write_preference_split(ctx.dataset_dir, f"train_iteration_{k}", train)
    if test:
        write_preference_split(ctx.dataset_dir, f"test_iteration_{k}", test)
    return {**stats.summary(), "train_pairs": len(train), "test_pairs": len(test)}


async def _train(ctx: RunContext, k: int) -> dict[str, Any]:
    result = await train_policy(ctx, k)
    return {
        "checkpoint": result.checkpoint_path,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "task_started_at": result.started_at,
        "resumed_from_step": result.resumed_from_step,
        "reused": result.reused,
        **{f"dpo/{key}": value for key, value in result.metrics.items()},
    }


async def _swap(ctx: RunContext, k: int) -> dict[str, Any]:
    seconds = await ensure_version(ctx, k)
    return {"version": ctx.version_label(k), "swap_seconds": seconds}


async def _evaluate(ctx: RunContext, k: int) -> dict[str, Any]:
    await ensure_version(ctx, k)
    return await evaluate_policy(ctx, k)


async def _report(ctx: RunContext) -> dict[str, Any]:
    path = write_report(ctx.run_dir, ctx.manifest)
    return {"report": str(path)}


# --- driver ---------------------------------------------------------------------------------------


async def _run_stages(ctx: RunContext) -> None:
    evaluating = ctx.cfg.evaluation.enabled
    if evaluating:
        await _stage(ctx, "policy0.evaluate", _evaluate_base)
    for k in range(1, ctx.cfg.iterations + 1):
        await _stage(ctx, f"iter{k}.generate", _generate, k)
        await _stage(ctx, f"iter{k}.rank", _rank, k)
        await _stage(ctx, f"iter{k}.pairs", _pairs, k)
        await _stage(ctx, f"iter{k}.train", _train, k)
        await _stage(ctx, f"iter{k}.swap", _swap, k)
        if evaluating:
            await _stage(ctx, f"iter{k}.evaluate", _evaluate, k)
    await _stage(ctx, "report", _report)


async def _preflight(ctx: RunContext) -> None:
    """Every service answers before any stage runs (each call retried with backoff)."""
    for client in [*ctx.generators, ctx.ranker]:
        await client.request("GET", "/ready")


async def execute_run(
    run_dir: str | Path,
    *,
    console: Console | None = None,
    settings: OrchestratorSettings | None = None,
) -> Manifest:
    """Execute (or resume) the run in `run_dir` to completion; return its final manifest.

    Failures are recorded in the manifest (status failed, the stage's error) and re-raised.
    """
    run_path = Path(run_dir).resolve()
    console = console or Console()
    settings = settings or OrchestratorSettings()
    cfg, manifest = _load_run(run_path)
    services = cfg.services
    token = (
        settings.generator_admin_token.get_secret_value()
        if settings.generator_admin_token
        else None
    )
    common = {"timeout": services.request_timeout_s, "retries": services.retries}

    def make_generator(url: str) -> GeneratorClient:
        return GeneratorClient(url, admin_token=token, **common)

    # With generator_dns the replicas are resolved inside the run (and again before each swap).
    generators = (
        [] if services.generator_dns else [make_generator(u) for u in services.generator_urls]
    )
    ranker = RankerClient(services.ranker_url, **common)
    trainer = TrainerClient(services.redis_url or RedisSettings().redis_url)
    with run_lock(run_path), make_progress(console) as progress:
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
        )
        manifest.status, manifest.error = "running", None
        ctx.save()
        try:
            await ctx.refresh_generators()
            await _preflight(ctx)
            await _run_stages(ctx)
        except BaseException as raw:
            exc = _first_error(raw)
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
            trainer.close()
        manifest.status = "completed"
        ctx.save()
        write_report(run_path, manifest)  # again, now that the header can say "completed"
    return manifest
