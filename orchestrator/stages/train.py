"""Training stage: the iteration's pairs -> a Celery `train_dpo` job -> new policy weights.

Sent by task name with the shared job schema; the job id is stable per (run, iteration), so a
resumed run that submits again gets the finished result back instead of a second training.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.context import RunContext
from pairloop.jobs import TrainJob, TrainProgress, TrainResult, describe_world

__all__ = ["build_job", "run", "run_training_job"]


def build_job(ctx: RunContext, k: int) -> TrainJob:
    cfg = ctx.cfg
    reference = ctx.policy_path(0) if cfg.reference == "base" else ctx.policy_path(k - 1)
    pairs = ctx.manifest.stages.get(f"iter{k}.pairs")
    held_out = bool(pairs and pairs.metrics.get("test_pairs"))
    return TrainJob(
        run_id=ctx.run_id,
        iteration=k,
        policy_path=str(ctx.policy_path(k - 1)),
        reference_path=str(reference),
        dataset_path=str(ctx.dataset_dir),
        output_path=str(ctx.policy_path(k)),
        # TRL's evaluate on the iteration's held-out pairs (written only when there are some).
        eval_split=f"test_iteration_{k}" if held_out else None,
        logging_dir=str(ctx.run_dir / "tensorboard" / f"iter{k}"),
        hyperparameters=cfg.dpo,
        lora=cfg.lora,
    )


async def run_training_job(ctx: RunContext, k: int) -> TrainResult:
    """Submit iteration k's job (or find it finished) and follow it to its result."""
    job = build_job(ctx, k)
    task = ctx.progress.add_task(f"iter {k}: DPO training", total=None)

    last_step = [-1]

    def on_progress(p: TrainProgress) -> None:
        if p.step != last_step[0]:  # one event per new training step seen, not per poll
            last_step[0] = p.step
            # `pairloop status` reads the step from the manifest (the stage's final metrics
            # replace this record when it finishes).
            ctx.manifest.stage(f"iter{k}.train").metrics["progress"] = {
                "phase": p.phase,
                "step": p.step,
                "total_steps": p.total_steps,
                "loss": p.loss,
                "machines": p.machines,
                "world_size": p.world_size,
            }
            ctx.save()
            ctx.checkpoint_event(f"iter{k}.train")
        ctx.progress.update(
            task,
            completed=p.step,
            total=p.total_steps or None,
            description=f"iter {k}: DPO {p.phase} on {describe_world(p.machines, p.world_size)} "
            f"loss={p.loss if p.loss is not None else '-'}",
        )

    def stopping() -> bool:
        return ctx.stopping.is_set() or (ctx.run_dir / "CANCEL").exists()

    # In a thread: through a Redis outage the send is retried for minutes, and the event loop
    # must stay free to take a Ctrl-C.
    await asyncio.to_thread(ctx.trainer.submit, job, should_stop=stopping)
    result = await asyncio.to_thread(
        ctx.trainer.wait,
        job.job_id,
        timeout=ctx.cfg.services.train_timeout_s,
        on_progress=on_progress,
        should_stop=stopping,
        resubmit=lambda: ctx.trainer.submit(job, should_stop=stopping),
    )
    ctx.progress.update(task, completed=result.steps, total=result.steps)
    return result


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.train: DPO on iteration k's pairs -> checkpoints/policy{k}."""
    result = await run_training_job(ctx, k)
    return {
        "checkpoint": result.checkpoint_path,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "task_started_at": result.started_at,
        "resumed_from_step": result.resumed_from_step,
        "reused": result.reused,
        # How the batch was made, as the trainer ran it: the global batch stays the recipe's
        # on any GPU count because the accumulation is derived from the ranks.
        "strategy": result.strategy,
        "world_size": result.world_size,
        "per_device_train_batch_size": result.per_device_train_batch_size,
        "gradient_accumulation_steps": result.gradient_accumulation_steps,
        "global_batch_size": result.global_batch_size,
        "peak_rss_bytes_per_rank": [r.peak_rss_bytes for r in result.ranks],
        "peak_device_bytes_per_rank": [r.peak_device_bytes for r in result.ranks],
        **{f"dpo/{key}": value for key, value in result.metrics.items()},
        # Which loss made these figures (pairloop compare, the report): loss_type, beta, ...
        "loss": ctx.cfg.dpo.loss_settings(),
    }
