"""Swap stage: every generator replica serves policy k, swapped in place (never a restart).

The swap is idempotent: a replica that already reports policy k's weight version is left alone,
so a resumed run, or a stage that needs policy k, calls `ensure_version` freely. A replica found
released (time-shared placement, a run resumed between release and wake) is woken onto policy k.
"""

from __future__ import annotations

from typing import Any

from orchestrator.context import RunContext
from pairloop.contracts.generator import WakeRequest, WeightSwapRequest

__all__ = ["ensure_version", "run"]


async def ensure_version(ctx: RunContext, k: int) -> float:
    """Make every generator replica serve policy k; return the slowest swap's seconds (0: none)."""
    label, path = ctx.version_label(k), ctx.policy_path(k)
    await ctx.refresh_generators()
    slowest = 0.0
    for client in ctx.generators:
        card = await client.model_card()
        if card.state != "serving":
            woken = await client.wake(WakeRequest(path=str(path), version=label))
            slowest = max(slowest, woken.seconds)
            continue
        if card.weight_version == label:
            continue
        reply = await client.swap_weights(WeightSwapRequest(path=str(path), version=label))
        slowest = max(slowest, reply.seconds)
    ctx.manifest.current_version = label
    ctx.save()
    return slowest


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.swap: the generator serves the newly trained policy k."""
    seconds = await ensure_version(ctx, k)
    return {"version": ctx.version_label(k), "swap_seconds": seconds}
