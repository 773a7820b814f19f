"""Best-of-n answers for evaluation: n samples per instruction, the run's ranker picks one.

This is how the recipe served its best figure (PairRM best-of-16: 34.86 on AlpacaEval 2.0). Both
halves are resumable shards, like generation and ranking: the samples come from the generator's
batch route through `generate_shards` (one call per shard, never one per prompt), and the picks
from `/v1/select` in batches of `ranker.batch_prompts`, written per sample shard.

    eval/policy{k}/best_of_{n}/samples/shard-*.jsonl   n samples per instruction
    eval/policy{k}/best_of_{n}/picks/shard-*.jsonl     the pick: output, index among the samples, score
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.prompts import PromptRecord
from orchestrator.records import BestOfPick, GenerationRecord
from orchestrator.shards import ShardStore, chunk
from orchestrator.stages.generate import check_failures, generate_shards
from pairloop.contracts.ranker import RankItem, SelectRequest

__all__ = ["best_of_dir", "best_of_outputs", "generate_best_of"]


def best_of_dir(ctx: RunContext, k: int, n: int) -> Path:
    """Where policy k's best-of-n samples and picks live."""
    return ctx.run_dir / "eval" / f"policy{k}" / f"best_of_{n}"


async def _pick(ctx: RunContext, records: list[GenerationRecord]) -> list[BestOfPick]:
    """The ranker's best non-empty sample per record (the ranker rejects empty text)."""
    chosen: list[tuple[int, float | None]] = []
    pending: list[tuple[int, GenerationRecord, list[int]]] = []
    for i, rec in enumerate(records):
        kept = [j for j, r in enumerate(rec.responses) if r.strip()]
        chosen.append((kept[0] if kept else 0, None))
        if len(kept) >= 2:
            pending.append((i, rec, kept))
    for batch in chunk(pending, ctx.cfg.ranker.batch_prompts):
        ctx.check_cancel()
        request = SelectRequest(
            items=[
                RankItem(prompt=rec.prompt, candidates=[rec.responses[j] for j in kept])
                for _, rec, kept in batch
            ],
            pick="best",
            mode=ctx.cfg.ranker.mode,
        )
        reply = await ctx.ranker.select(request)
        for (i, _, kept), res in zip(batch, reply.results, strict=True):
            chosen[i] = (kept[res.index], res.score)
    return [
        BestOfPick(
            prompt_id=rec.prompt_id,
            prompt=rec.prompt,
            output=rec.responses[index] if rec.responses else "",
            index=index,
            score=score,
            samples=len(rec.responses),
        )
        for rec, (index, score) in zip(records, chosen, strict=True)
    ]


async def generate_best_of(
    ctx: RunContext, k: int, n: int, prompts: list[PromptRecord]
) -> tuple[list[dict[str, Any]], int]:
    """Policy k's best-of-n answers to `prompts` (generated and picked where not done yet), and
    how many prompts the generator could not answer (left out of the answers)."""
    ev = ctx.cfg.evaluation
    root = best_of_dir(ctx, k, n)
    samples = await generate_shards(
        ctx,
        prompts=prompts,
        out_dir=root / "samples",
        policy=k,
        n=n,
        temperature=ev.best_of_temperature,
        max_tokens=ev.max_tokens,
        seed_key=f"eval.best_of_{n}",
        description=f"policy {k}: best-of-{n} samples",
        stage=f"policy{k}.best_of_{n}.generate",
    )
    failed = check_failures(
        samples,
        prompts,
        shard_size=ctx.cfg.shard_size,
        max_share=ctx.cfg.sampling.max_failed_share,
        stage=f"policy{k}.best_of_{n}",
    )
    picks = ShardStore(root / "picks", BestOfPick)
    count = len(chunk(prompts, ctx.cfg.shard_size))
    todo = picks.missing(count)
    task = ctx.progress.add_task(
        f"policy {k}: best-of-{n} picks", total=count, completed=count - len(todo)
    )
    for index in todo:
        picks.write(index, await _pick(ctx, samples.read(index)))
        ctx.progress.advance(task, 1)
        ctx.checkpoint_event(f"policy{k}.best_of_{n}.select")
    return best_of_outputs(ctx, k, n, prompts), failed


def best_of_outputs(
    ctx: RunContext, k: int, n: int, prompts: list[PromptRecord]
) -> list[dict[str, Any]]:
    """The picks of the prompts the generator answered, in prompt order: the instruction's record
    (`prompt_id`, `prompt`, `index`, `dataset`) plus `output`, `index` among the samples as
    `sample_index`, `score`, `samples`."""
    store = ShardStore(best_of_dir(ctx, k, n) / "picks", BestOfPick)
    by_id = {p["prompt_id"]: p for p in prompts}
    out = []
    for pick in store.read_all(len(chunk(prompts, ctx.cfg.shard_size))):
        if pick.samples == 0:  # the generator could not answer it: counted, not an answer
            continue
        row = pick.model_dump()
        row["sample_index"] = row.pop("index")
        out.append({**row, **by_id[pick.prompt_id]})
    return out
