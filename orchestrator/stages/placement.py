"""Time-shared placement (`placement: time_shared`): the generator gives its GPUs to training.

On one node every phase uses every GPU: generation (the generator's engines on all of them),
ranking, then training, for which the generator first releases its memory (vLLM's sleep mode on
a GPU, an engine shutdown on CPU); after training it wakes straight onto the new policy: the wake
is the swap (same validation, version label and rollback), so `iter{k}.wake` replaces
`iter{k}.swap`. Both calls are idempotent on the service side, so a resumed run repeats them
freely: the release before training is redone on every resume until training is done (a
generator restarted meanwhile would hold the GPUs the trainer needs), and the wake finds a
generator released, restarted (serving the base) or already awake, and leaves it serving policy k.
"""

from __future__ import annotations

from typing import Any

from orchestrator.context import RunContext
from pairloop.contracts.generator import WakeRequest

__all__ = ["release", "wake"]


async def release(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.release: every generator replica frees its accelerator memory for training."""
    await ctx.refresh_generators()
    seconds, how, already = 0.0, set(), 0
    for client in ctx.generators:
        reply = await client.release()
        seconds = max(seconds, reply.seconds)
        how.add(reply.how)
        already += int(reply.already_released)
    return {
        "placement": "time_shared",
        "released_version": ctx.manifest.current_version,
        "release_seconds": seconds,
        "how": sorted(how),
        "replicas": len(ctx.generators),
        "already_released": already,
    }


async def wake(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.wake: every replica serves policy k, woken straight onto it (the wake is the swap)."""
    label, path = ctx.version_label(k), ctx.policy_path(k)
    await ctx.refresh_generators()
    slowest, woke = 0.0, 0
    for client in ctx.generators:
        card = await client.model_card()
        if card.state == "serving" and card.weight_version == label:
            continue
        reply = await client.wake(WakeRequest(path=str(path), version=label))
        slowest = max(slowest, reply.seconds)
        woke += int(reply.woke)
    ctx.manifest.current_version = label
    ctx.save()
    return {
        "placement": "time_shared",
        "version": label,
        "swap_seconds": slowest,
        "woke": woke,
        "replicas": len(ctx.generators),
    }
