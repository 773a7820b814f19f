"""Report stage: report.md and its plots from the manifest (rewritten once the run completes)."""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.context import RunContext
from orchestrator.publish import push_to_hub, write_model_card
from orchestrator.report import write_report

__all__ = ["run"]


async def run(ctx: RunContext) -> dict[str, Any]:
    """report: write RUN_DIR/report/report.md and the plots, the final policy's model card, and
    (push_to_hub) upload the policy and the datasets."""
    path = write_report(ctx.run_dir, ctx.manifest)
    card = write_model_card(ctx.run_dir, ctx.cfg, ctx.manifest)
    pushed = await asyncio.to_thread(push_to_hub, ctx.run_dir, ctx.cfg)
    return {"report": str(path), "model_card": str(card) if card else None, "pushed": pushed}
