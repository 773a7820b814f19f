"""`pairloop compare RUN_DIR...`: several runs side by side, from their manifests.

    pairloop compare demo/store/runs/demo-dpo demo/store/runs/demo-simpo --out compare/

One table (a row per run and iteration: the loss and its knobs, win rate and length-controlled
win rate against the run's base, mean answer length, and the training loss), written as
`compare.md` and printed, and one plot, `win_rate_vs_length.png`: each run's win rate against its
mean answer length, iteration by iteration, the trade-off the seed's length bias is about. Win
rates are each run's own judge's (the report says which), so runs compare fairly when they share
base model, evaluation prompts and judge; the table names each run's loss so that is visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.manifest import Manifest, load_manifest
from orchestrator.report import iteration_rows, loss_label, loss_settings
from pairloop.atomic import atomic_write_text

__all__ = [
    "CompareError",
    "RunRows",
    "compare_runs",
    "load_run_rows",
    "markdown_table",
    "table_rows",
    "win_rate_length_figure",
]

PLOT_NAME = "win_rate_vs_length.png"
TABLE_NAME = "compare.md"
HEADER = (
    "run",
    "loss",
    "iteration",
    "win vs base",
    "LC win vs base",
    "mean length",
    "length vs base",
    "train loss",
)


class CompareError(ValueError):
    """A run directory that cannot be compared (not a run, or no iteration evaluated)."""


@dataclass(frozen=True)
class RunRows:
    """One run's name, loss and per-iteration figures (iteration 0 = the base)."""

    name: str
    loss: dict[str, Any]
    rows: list[dict[str, Any]]


def _frozen_loss(run_dir: Path) -> dict[str, Any]:
    """The loss from the run's frozen config: for runs whose training has not recorded it yet."""
    from orchestrator.config import load_run_config
    from orchestrator.runs import FROZEN_CONFIG

    try:
        return load_run_config(run_dir / FROZEN_CONFIG).dpo.loss_settings()
    except (OSError, ValueError):
        return {}


def load_run_rows(run_dir: Path) -> RunRows:
    """The figures of one run directory; CompareError if it is none."""
    try:
        manifest: Manifest = load_manifest(run_dir)
    except FileNotFoundError:
        raise CompareError(f"{run_dir} is not a run directory (no manifest.json)") from None
    loss = loss_settings(manifest) or _frozen_loss(run_dir)
    return RunRows(name=manifest.run_id, loss=loss, rows=iteration_rows(manifest))


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def table_rows(runs: Sequence[RunRows]) -> list[list[str]]:
    """The comparison table's cells, a row per run and iteration (the base included)."""
    out = []
    for run in runs:
        base_length = run.rows[0].get("mean_length") if run.rows else None
        for r in run.rows:
            length = r.get("mean_length")
            growth = (
                length / base_length
                if isinstance(length, (int, float)) and isinstance(base_length, (int, float))
                and base_length > 0
                else None
            )  # fmt: skip
            out.append(
                [
                    run.name,
                    loss_label(run.loss),
                    str(r["iteration"]),
                    _num(r.get("win_rate_vs_base"), "{:.3f}"),
                    _num(r.get("lc_win_rate_vs_base"), "{:.3f}"),
                    _num(length, "{:.1f}"),
                    _num(growth, "x{:.2f}"),
                    _num(r.get("train_loss"), "{:.4f}"),
                ]
            )
    return out


def markdown_table(runs: Sequence[RunRows]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(runs)]
    return "\n".join(lines)


def win_rate_length_figure(runs: Sequence[RunRows]) -> Any:
    """The matplotlib figure: per run, win rate against mean length, iteration by iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        pts = [
            r
            for r in run.rows
            if r["iteration"] > 0
            and r.get("win_rate_vs_base") is not None
            and r.get("mean_length") is not None
        ]
        if not pts:
            continue
        xs = [float(r["mean_length"]) for r in pts]
        ys = [float(r["win_rate_vs_base"]) for r in pts]
        (line,) = ax.plot(xs, ys, "o-", label=f"{run.name}: {loss_label(run.loss)}")
        for r, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(str(r["iteration"]), (x, y), textcoords="offset points", xytext=(4, 4))
        base = run.rows[0].get("mean_length")
        if base is not None:  # where the run started: the base's length, at a coin flip
            ax.plot([float(base)], [0.5], "x", color=line.get_color())
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(
        title="Win rate against mean answer length, per iteration",
        xlabel="mean answer length (characters)",
        ylabel="win rate vs base (judge)",
        ylim=(0, 1),
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot(runs: Sequence[RunRows], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = win_rate_length_figure(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(run_dirs: Sequence[Path], out: Path) -> tuple[list[RunRows], Path, Path]:
    """Write `out`/compare.md and `out`/win_rate_vs_length.png for `run_dirs`."""
    if not run_dirs:
        raise CompareError("give one or more run directories")
    runs = [load_run_rows(Path(d)) for d in run_dirs]
    if not any(r["iteration"] > 0 for run in runs for r in run.rows):
        raise CompareError("none of these runs has finished an iteration yet: nothing to compare")
    out.mkdir(parents=True, exist_ok=True)
    table = out / TABLE_NAME
    atomic_write_text(
        table,
        "# pairloop runs compared\n\n"
        "Win rates against each run's own base, judged as its report says; length growth is the "
        "mean answer length over the base's.\n\n"
        + markdown_table(runs)
        + f"\n\n![win rate against length]({PLOT_NAME})\n",
    )
    plot = out / PLOT_NAME
    _plot(runs, plot)
    return runs, table, plot
