"""Pairs stage: ranked answers -> chosen/rejected pairs -> dataset splits of iteration k.

The rule (best vs worst, ties dropped, test fraction) is `orchestrator.pairs.build_pairs`; this
stage reads the ranking shards and writes `train_iteration_{k}` / `test_iteration_{k}`.
"""

from __future__ import annotations

from typing import Any

from orchestrator.context import RunContext
from orchestrator.pairs import PairStats, build_pairs
from orchestrator.records import RankedRecord
from orchestrator.shards import ShardStore
from orchestrator.stages.rank import shard_count
from pairloop.errors import PairloopError
from pairloop.preference_data import write_preference_split

__all__ = ["no_pairs_advice", "run"]


def no_pairs_advice(stats: PairStats) -> str:
    """What to change, for the cause that cost the most pairs (a longer max_tokens never helps:
    it only shrinks the room left for the prompt)."""
    causes = {
        "errors": stats.generation_errors,
        "ties": stats.ties_dropped,
        "empty": stats.too_few_responses,
    }
    worst = max(causes, key=lambda c: causes[c])
    if worst == "errors":
        return (
            "read the generate stage's warnings for the generator's errors (a generator serving "
            "a shorter context than sampling.max_model_len fails long prompts)"
        )
    if worst == "ties":
        return "raise sampling.temperature so that the answers differ, or use more prompts"
    return (
        "the answers came back empty: check the base model's chat template and stop tokens, "
        "or use more prompts"
    )


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.pairs: build and write iteration k's preference dataset splits."""
    rankings = ShardStore(ctx.iter_dir(k) / "rankings", RankedRecord)
    ranked = rankings.read_all(shard_count(ctx, k))
    train, test, stats = build_pairs(ranked, ctx.cfg.pairs)
    if not train:
        raise PairloopError(
            f"iteration {k}: no training pairs ({stats.ties_dropped} ties, "
            f"{stats.too_few_responses} prompts with <2 non-empty responses, "
            f"{stats.generation_errors} the generator could not answer); {no_pairs_advice(stats)}"
        )
    write_preference_split(ctx.dataset_dir, f"train_iteration_{k}", train)
    if test:
        write_preference_split(ctx.dataset_dir, f"test_iteration_{k}", test)
    return {**stats.summary(), "train_pairs": len(train), "test_pairs": len(test)}
