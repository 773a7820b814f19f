"""The run report: a Markdown page with a table per topic and matplotlib PNGs, from the manifest.

    pairloop report RUN_DIR      # RUN_DIR/report/report.md, RUN_DIR/report/*.png

Everything is read from the manifest, so a report can be rebuilt at any time, also mid-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.admission import admission_summary
from orchestrator.manifest import Manifest, StageRecord
from pairloop.atomic import atomic_write_text

__all__ = ["iteration_rows", "write_report"]

STAGES = ("generate", "rank", "pairs", "train", "swap", "evaluate")


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def iteration_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One dict of headline figures per iteration (0 = base), from the manifest."""
    rows: list[dict[str, Any]] = []
    base = manifest.stages.get("policy0.evaluate")
    rows.append({"iteration": 0, "mean_length": base.metrics.get("mean_length") if base else None})
    for k in range(1, manifest.iterations + 1):
        st = manifest.iteration_stages(k)

        def m(stage: str, key: str, st: dict[str, StageRecord] = st) -> Any:
            return st[stage].metrics.get(key) if stage in st else None

        vs_base = m("evaluate", "vs_base") or {}
        vs_prev = m("evaluate", "vs_previous") or {}
        rows.append(
            {
                "iteration": k,
                "pairs": m("pairs", "pairs"),
                "ties_dropped": m("pairs", "ties_dropped"),
                "mean_chosen_score": m("pairs", "mean_chosen_score"),
                "mean_rejected_score": m("pairs", "mean_rejected_score"),
                "train_loss": m("train", "dpo/train_loss"),
                "reward_margin": m("train", "dpo/rewards/margins"),
                "reward_accuracy": m("train", "dpo/rewards/accuracies"),
                "swap_seconds": m("swap", "swap_seconds"),
                "win_rate_vs_base": vs_base.get("win_rate"),
                "lc_win_rate_vs_base": vs_base.get("lc_win_rate"),
                "win_rate_vs_previous": vs_prev.get("win_rate"),
                "mean_length": m("evaluate", "mean_length"),
                "stage_seconds": {s: st[s].seconds for s in STAGES if s in st},
            }
        )
    return rows


def _plots(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r for r in rows if r["iteration"] > 0]
    xs = [r["iteration"] for r in its]
    made: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    def series(key: str, rs: list[dict[str, Any]] = its) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rs]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, series("win_rate_vs_base"), "o-", label="win rate vs base")
    ax.plot(xs, series("lc_win_rate_vs_base"), "s--", label="length-controlled vs base")
    ax.plot(xs, series("win_rate_vs_previous"), "^-", label="win rate vs previous")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(xlabel="iteration", ylabel="win rate (ranker-judged)", ylim=(0, 1), xticks=xs)
    ax.legend(fontsize=8)
    save(fig, "win_rates.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, series("mean_chosen_score"), "o-", label="chosen")
    ax.plot(xs, series("mean_rejected_score"), "o-", label="rejected")
    ax.set(xlabel="iteration", ylabel="mean ranker score", xticks=xs)
    ax.legend(fontsize=8)
    save(fig, "scores.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iteration"] for r in rows], series("mean_length", rows), "o-")
    ax.set(xlabel="policy (0 = base)", ylabel="mean answer length (chars)")
    save(fig, "lengths.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, series("train_loss"), "o-", label="DPO loss")
    ax.plot(xs, series("reward_margin"), "s-", label="reward margin")
    ax.plot(xs, series("reward_accuracy"), "^-", label="reward accuracy")
    ax.set(xlabel="iteration", xticks=xs)
    ax.legend(fontsize=8)
    save(fig, "dpo_metrics.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(its)
    for stage in STAGES:
        vals = [r["stage_seconds"].get(stage, 0.0) for r in its]
        ax.bar(xs, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(xlabel="iteration", ylabel="seconds", xticks=xs)
    ax.legend(fontsize=8)
    save(fig, "stage_times.png")
    return made


def _prompt_lines(manifest: Manifest) -> list[str]:
    """Prompt admission at run creation, and prompts the generator could not answer."""
    setup = manifest.stages.get("setup")
    admission = setup.metrics.get("prompts") if setup else None
    if not admission:
        return []
    lines = ["## Prompts", "", f"Admission: {admission_summary(admission)}.", ""]
    for example in admission.get("skipped_examples", []):
        lines.append(
            f"- {example['action']} {example['prompt']}: {example['tokens']} tokens "
            f"> {example['limit']}"
        )
    failed = {
        name: st.metrics["failed_prompts"]
        for name, st in manifest.stages.items()
        if st.metrics.get("failed_prompts")
    }
    if failed:
        lines.append(
            "Prompts the generator answered with an error (kept out of pairs and scored as empty "
            "answers in evaluation): "
            + ", ".join(f"{name} {count}" for name, count in failed.items())
        )
    return [*lines, ""]


def write_report(run_dir: str | Path, manifest: Manifest) -> Path:
    """Write RUN_DIR/report/report.md and its PNGs; return the Markdown path."""
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = iteration_rows(manifest)
    pngs = _plots(out, rows)
    lines = [
        f"# pairloop run `{manifest.run_id}`",
        "",
        f"Status: **{manifest.status}**. Iterations: {manifest.iterations}. "
        "Win rates are judged by the run's ranker on held-out prompts (probability the policy's answer "
        "beats the reference's, averaged); the length-controlled figure regresses out the length "
        "difference (AlpacaEval 2.0 LC in spirit). Model outputs for AlpacaEval proper: "
        "`eval/policy{k}/alpaca_eval_outputs.json`. Datasets: `dataset/` "
        '(`datasets.load_dataset("dataset", split="train_iteration_1")`).',
        "",
        *_prompt_lines(manifest),
        "| iteration | pairs | ties dropped | chosen score | rejected score | DPO loss | reward margin "
        "| reward acc. | swap s | win vs base | LC win vs base | win vs prev. | mean length |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["iteration"]),
                    _num(r.get("pairs"), "{}"),
                    _num(r.get("ties_dropped"), "{}"),
                    _num(r.get("mean_chosen_score")),
                    _num(r.get("mean_rejected_score")),
                    _num(r.get("train_loss"), "{:.4f}"),
                    _num(r.get("reward_margin"), "{:.4f}"),
                    _num(r.get("reward_accuracy"), "{:.2f}"),
                    _num(r.get("swap_seconds"), "{:.3f}"),
                    _num(r.get("win_rate_vs_base")),
                    _num(r.get("lc_win_rate_vs_base")),
                    _num(r.get("win_rate_vs_previous")),
                    _num(r.get("mean_length"), "{:.1f}"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "## Stage times (seconds)",
        "",
        "| iteration | " + " | ".join(STAGES) + " |",
        "|---" * (len(STAGES) + 1) + "|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['iteration']} | "
            + " | ".join(_num(r["stage_seconds"].get(s), "{:.1f}") for s in STAGES)
            + " |"
        )
    lines += ["", *[f"![{p[:-4]}]({p})" for p in pngs], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
