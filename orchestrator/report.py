"""The run report: a Markdown page with a table per topic and matplotlib PNGs, from the manifest.

    pairloop report RUN_DIR      # RUN_DIR/report/report.md, RUN_DIR/report/*.png

Figures are read from the manifest (the answer-length distributions from each policy's
`alpaca_eval_outputs.json`), so a report can be rebuilt at any time, also mid-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.admission import admission_summary
from orchestrator.manifest import Manifest, StageRecord
from pairloop.atomic import atomic_write_text

__all__ = ["best_of_rows", "iteration_rows", "judge_line", "write_report"]

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
                "lc_glm": vs_base.get("lc_glm"),
                "win_rate_vs_previous": vs_prev.get("win_rate"),
                "mean_length": m("evaluate", "mean_length"),
                "stage_seconds": {s: st[s].seconds for s in STAGES if s in st},
            }
        )
    return rows


def _eval_records(manifest: Manifest) -> list[tuple[int, dict[str, Any]]]:
    """(policy, metrics) of every finished evaluation stage, base first."""
    found = []
    for k in range(manifest.iterations + 1):
        st = manifest.stages.get("policy0.evaluate" if k == 0 else f"iter{k}.evaluate")
        if st is not None and st.state == "done":
            found.append((k, st.metrics))
    return found


def best_of_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per (policy, n) of the best-of-n evaluation, n = 1 included, judged vs the base."""
    rows: list[dict[str, Any]] = []
    for k, metrics in _eval_records(manifest):
        plain = metrics.get("vs_base") or {}
        rows.append(
            {
                "policy": k,
                "n": 1,
                "win_rate_vs_base": plain.get("win_rate", 0.5 if k == 0 else None),
                "lc_win_rate_vs_base": plain.get("lc_win_rate"),
                "mean_length": metrics.get("mean_length"),
            }
        )
        for n, row in sorted((metrics.get("best_of") or {}).items(), key=lambda i: int(i[0])):
            vs_base = row.get("vs_base") or {}
            rows.append(
                {
                    "policy": k,
                    "n": int(n),
                    "win_rate_vs_base": vs_base.get("win_rate"),
                    "lc_win_rate_vs_base": vs_base.get("lc_win_rate"),
                    "mean_length": row.get("mean_length"),
                }
            )
    return rows


def judge_line(manifest: Manifest) -> str:
    """Who judged the evaluations: the run's own ranker, or a separate ranker service."""
    for _, metrics in _eval_records(manifest):
        if "judge" in metrics:
            if metrics.get("judge_is_run_ranker", True):
                return f"the run's own ranker ({metrics['judge']}), which also made the pairs"
            return (
                f"a separate ranker service at {metrics['judge']} (not the one that made the pairs)"
            )
    return "no evaluation has finished yet"


def _lengths(run_dir: Path, k: int) -> list[int]:
    path = run_dir / "eval" / f"policy{k}" / "alpaca_eval_outputs.json"
    if not path.is_file():
        return []
    return [len(r["output"]) for r in json.loads(path.read_text())]


def _plots(
    out: Path,
    rows: list[dict[str, Any]],
    bests: list[dict[str, Any]],
    lengths: dict[int, list[int]],
) -> list[str]:
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

    # The seed's length concern: did the win rate rise with the answers' length?
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in sorted({b["n"] for b in bests}):
        pts = [b for b in bests if b["n"] == n and b["win_rate_vs_base"] is not None]
        ax.plot(
            [float(b["mean_length"]) for b in pts],
            [float(b["win_rate_vs_base"]) for b in pts],
            "o-" if n == 1 else "s--",
            label="plain answers" if n == 1 else f"best-of-{n}",
        )
        for b in pts:
            ax.annotate(str(b["policy"]), (float(b["mean_length"]), float(b["win_rate_vs_base"])))
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(xlabel="mean answer length (chars); labels: policy", ylabel="win rate vs base")
    ax.legend(fontsize=8)
    save(fig, "win_rate_vs_length.png")

    if lengths:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        policies = sorted(lengths)
        ax.boxplot([lengths[k] for k in policies], tick_labels=[str(k) for k in policies])
        ax.set(xlabel="policy (0 = base)", ylabel="answer length (chars)")
        save(fig, "length_distribution.png")

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


def loss_settings(manifest: Manifest) -> dict[str, Any]:
    """The run's training loss and its knobs, as its train stages recorded them ({} before any)."""
    for k in range(1, manifest.iterations + 1):
        record = manifest.stages.get(f"iter{k}.train")
        if record is not None and isinstance(record.metrics.get("loss"), dict):
            return dict(record.metrics["loss"])
    return {}


def loss_label(settings: dict[str, Any]) -> str:
    """`sppo (beta 0.001)`: a loss and its knobs in one line."""
    if not settings:
        return "-"
    knobs = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "loss_type")
    return f"{settings['loss_type']} ({knobs})" if knobs else str(settings["loss_type"])


def _loss_lines(manifest: Manifest) -> list[str]:
    settings = loss_settings(manifest)
    return [f"Training loss: `{loss_label(settings)}`.", ""] if settings else []


def write_report(run_dir: str | Path, manifest: Manifest) -> Path:
    """Write RUN_DIR/report/report.md and its PNGs; return the Markdown path."""
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = iteration_rows(manifest)
    bests = best_of_rows(manifest)
    lengths = {k: ls for k, _ in _eval_records(manifest) if (ls := _lengths(Path(run_dir), k))}
    pngs = _plots(out, rows, bests, lengths)
    setup = manifest.stages.get("setup")
    source = setup.metrics.get("eval_source", "held-out prompts") if setup else "held-out prompts"
    glms = sorted({r["lc_glm"] for r in rows if r.get("lc_glm")})
    lines = [
        f"# pairloop run `{manifest.run_id}`",
        "",
        f"Status: **{manifest.status}**. Iterations: {manifest.iterations}. "
        f"Evaluation instructions: {source}. Judge: {judge_line(manifest)}. "
        "Win rates are the probability that the policy's answer beats the reference's, averaged; "
        "the length-controlled (LC) figure is AlpacaEval's own GLM "
        f"({', '.join(glms) or 'none fitted'}; `alpaca_eval.metrics.glm_winrate`) on the same "
        "judgments. Model outputs for AlpacaEval proper: "
        "`eval/policy{k}/alpaca_eval_outputs.json` (best-of-n: `eval/policy{k}/best_of_{n}/`). "
        "Datasets: `dataset/` "
        '(`datasets.load_dataset("dataset", split="train_iteration_1")`).',
        "",
        *_prompt_lines(manifest),
        *_loss_lines(manifest),
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
    if any(b["n"] > 1 for b in bests):
        lines += [
            "",
            "## Best-of-n (n samples, the run's ranker picks; judged against the base's answers)",
            "",
            "| policy | n | win vs base | LC win vs base | mean length |",
            "|---" * 5 + "|",
        ]
        for b in bests:
            lines.append(
                f"| {b['policy']} | {b['n']} | {_num(b['win_rate_vs_base'])} | "
                f"{_num(b['lc_win_rate_vs_base'])} | {_num(b['mean_length'], '{:.1f}')} |"
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
