"""The per-iteration headline table printed at the end of a run (`pairloop run`, `resume`, `demo`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.manifest import Manifest
from orchestrator.report import iteration_rows, lc_cell

__all__ = ["print_summary"]

_COLUMNS = (
    "iter",
    "pairs",
    "ties",
    "chosen",
    "rejected",
    "DPO loss (mean)",
    "swap s",
    "win vs base",
    "LC win vs base",
    "win vs prev",
    "mean len",
)


def _fmt(value: object, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def print_summary(run_dir: Path, manifest: Manifest, *, console: Console) -> None:
    """Print the run's per-iteration figures, and where its report is."""
    table = Table(title=f"run {manifest.run_id}: {manifest.status}")
    for col in _COLUMNS:
        table.add_column(col, justify="right")
    for r in iteration_rows(manifest):
        table.add_row(
            str(r["iteration"]),
            _fmt(r.get("pairs"), "{}"),
            _fmt(r.get("ties_dropped"), "{}"),
            _fmt(r.get("mean_chosen_score")),
            _fmt(r.get("mean_rejected_score")),
            _fmt(r.get("train_loss"), "{:.4f}"),
            _fmt(r.get("swap_seconds")),
            _fmt(r.get("win_rate_vs_base")),
            lc_cell(r.get("lc_win_rate_vs_base"), r.get("lc_glm")),  # with its GLM's name
            _fmt(r.get("win_rate_vs_previous")),
            _fmt(r.get("mean_length"), "{:.1f}"),
        )
    # Rich assumes 80 columns when output is not a terminal (CI logs, `| tee`), too few for this.
    out = console if console.is_terminal else Console(width=max(console.width, 120))
    out.print(table)
    report = run_dir / "report" / "report.md"
    if report.exists():
        console.print(f"report: {report}")
