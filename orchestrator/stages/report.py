"""Report stage: report.md and its plots from the manifest (rewritten once the run completes)."""

from __future__ import annotations

from typing import Any

from orchestrator.context import RunContext
from orchestrator.report import write_report

__all__ = ["run"]


async def run(ctx: RunContext) -> dict[str, Any]:
    """report: write RUN_DIR/report/report.md and the plots."""
    path = write_report(ctx.run_dir, ctx.manifest)
    return {"report": str(path)}
