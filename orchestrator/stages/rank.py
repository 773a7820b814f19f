"""Ranking stage: every generation shard -> a ranking shard (scores, ranks, best and worst).

Empty responses are not sent (the ranker rejects empty text) and are counted instead.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.prompts import read_prompts
from orchestrator.records import GenerationRecord, RankedRecord
from orchestrator.shards import ShardStore, chunk
from pairloop.contracts.ranker import RankItem, RankRequest, RankResult

__all__ = ["rank_concurrency", "rank_shards", "run", "shard_count"]

# Requests in flight per ranker replica: one running, one queued behind it, so that a replica
# tokenizes and batches its next request while its current one runs and never waits for the
# orchestrator's round trip.
REQUESTS_PER_REPLICA = 2


def rank_concurrency(concurrency: int, replicas: int) -> int:
    """Ranking shards in flight at once (each sends its /v1/rank calls one after the other):
    `services.concurrency`, raised to keep every replica of the ranker busy."""
    return max(concurrency, REQUESTS_PER_REPLICA * replicas)


async def _rank_records(ctx: RunContext, records: list[GenerationRecord]) -> list[RankedRecord]:
    cfg = ctx.cfg
    out: list[RankedRecord] = []
    rankable: list[int] = []  # positions in `out` of the prompts with two or more answers
    for rec in records:
        kept = [r for r in rec.responses if r.strip()]
        if len(kept) >= 2:
            rankable.append(len(out))
        out.append(
            RankedRecord(
                prompt_id=rec.prompt_id,
                prompt=rec.prompt,
                candidates=kept,
                empty=len(rec.responses) - len(kept),
                error=rec.error,  # no responses: the generator could not answer it
            )
        )
    for batch in chunk(rankable, cfg.ranker.batch_prompts):
        ctx.check_cancel()
        reply = await ctx.ranker.rank(
            RankRequest(
                items=[RankItem(prompt=out[i].prompt, candidates=out[i].candidates) for i in batch],
                mode=cfg.ranker.mode,
            )
        )
        for i, res in zip(batch, reply.results, strict=True):
            out[i] = _with_verdict(out[i], res)
    return out


def _with_verdict(rec: RankedRecord, res: RankResult) -> RankedRecord:
    return RankedRecord(
        prompt_id=rec.prompt_id,
        prompt=rec.prompt,
        candidates=rec.candidates,
        empty=rec.empty,
        scores=res.scores,
        ranks=res.ranks,
        win_probs=res.win_probs,
        best_index=res.best_index,
        worst_index=res.worst_index,
        truncated=res.truncated.any,
    )


async def rank_shards(
    ctx: RunContext,
    *,
    gen: ShardStore[GenerationRecord],
    count: int,
    out_dir: Path,
    description: str,
    stage: str,
) -> ShardStore[RankedRecord]:
    """Rank the missing shards; `count` is the number of generation shards."""
    store = ShardStore(out_dir, RankedRecord)
    todo = store.missing(count)
    task = ctx.progress.add_task(description, total=count, completed=count - len(todo))
    limit = asyncio.Semaphore(rank_concurrency(ctx.cfg.services.concurrency, ctx.ranker_replicas))

    async def one(index: int) -> None:
        async with limit:
            ranked = await _rank_records(ctx, gen.read(index))
        store.write(index, ranked)
        ctx.progress.advance(task, 1)
        ctx.checkpoint_event(stage)

    async with asyncio.TaskGroup() as group:
        for index in todo:
            group.create_task(one(index))
    return store


def shard_count(ctx: RunContext, k: int) -> int:
    """How many shards iteration k's prompts make (generation and ranking use the same split)."""
    prompts = read_prompts(ctx.run_dir / "prompts" / f"iteration_{k}.jsonl")
    return len(chunk(prompts, ctx.cfg.shard_size))


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.rank: the ranker scores every answer of iteration k."""
    await rank_shards(
        ctx,
        gen=ShardStore(ctx.iter_dir(k) / "generations", GenerationRecord),
        count=shard_count(ctx, k),
        out_dir=ctx.iter_dir(k) / "rankings",
        description=f"iter {k}: rank",
        stage=f"iter{k}.rank",
    )
    return {"mode": ctx.cfg.ranker.mode}
