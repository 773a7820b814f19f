"""The run report: a Markdown page with a table per topic and matplotlib PNGs, from the manifest.

    pairloop report RUN_DIR      # RUN_DIR/report/report.md, RUN_DIR/report/*.png

Figures are read from the manifest (the answer-length distributions from each policy's
`alpaca_eval_outputs.json`), so a report can be rebuilt at any time, also mid-run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from orchestrator.admission import admission_summary
from orchestrator.manifest import Manifest, StageRecord
from pairloop.atomic import atomic_write_text

__all__ = ["best_of_rows", "iteration_rows", "judge_line", "lc_cell", "write_report"]

STAGES = ("generate", "rank", "pairs", "release", "train", "swap", "wake", "evaluate")


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def lc_cell(value: Any, glm: Any) -> str:
    """An LC figure with its GLM's name beside it: two GLMs' figures never read as one."""
    if not isinstance(value, (int, float)):
        return "-"
    name = str(glm or "?").removeprefix("length_controlled_")
    return f"{value:.3f} ({name})"


def _score(value: Any, bubble_pairs: Any, rank: str) -> str:
    """A mean ranker score; in bubble mode the ranker gives ranks only (best / worst), never a
    score, and the cell says so rather than print a number nobody measured."""
    if not isinstance(value, (int, float)) and bubble_pairs:
        return f"{rank} (bubble ranks)"
    return _num(value)


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
                "bubble_pairs": m("pairs", "bubble_pairs"),
                "mean_chosen_score": m("pairs", "mean_chosen_score"),
                "mean_rejected_score": m("pairs", "mean_rejected_score"),
                # DPO figures: train_loss is the mean over the job's steps (transformers'), the
                # others are of its last logged step; mean_* over every step; eval_* are TRL's
                # evaluate on test_iteration_k after training.
                "train_loss": m("train", "dpo/train_loss"),
                "reward_margin": m("train", "dpo/rewards/margins"),
                "reward_accuracy": m("train", "dpo/rewards/accuracies"),
                "last_loss": m("train", "dpo/loss"),
                "mean_reward_margin": m("train", "dpo/mean/rewards/margins"),
                "mean_reward_accuracy": m("train", "dpo/mean/rewards/accuracies"),
                "eval_loss": m("train", "dpo/eval_loss"),
                "eval_reward_margin": m("train", "dpo/eval_rewards/margins"),
                "eval_reward_accuracy": m("train", "dpo/eval_rewards/accuracies"),
                "train_steps": m("train", "steps"),
                "test_pairs": m("pairs", "test_pairs"),
                "win_rate_n": vs_base.get("n"),
                "lc_standard_error": vs_base.get("lc_standard_error"),
                # Time-shared placement: the wake is the swap.
                "swap_seconds": m("wake" if "wake" in st else "swap", "swap_seconds"),
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
        # The base's plain answers are the reference: no comparison, so no figure (not 0.5).
        plain = metrics.get("vs_base") or {}
        rows.append(
            {
                "policy": k,
                "n": 1,
                "win_rate_vs_base": plain.get("win_rate"),
                "lc_win_rate_vs_base": plain.get("lc_win_rate"),
                "lc_glm": plain.get("lc_glm"),
                "mean_length": metrics.get("mean_length"),
                "self_judged": False,
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
                    "lc_glm": vs_base.get("lc_glm"),
                    "mean_length": row.get("mean_length"),
                    # Older manifests lack the flag: their judge defaulted to the picker.
                    "self_judged": row.get("self_judged", metrics.get("judge_is_run_ranker")),
                }
            )
    return rows


def judge_line(manifest: Manifest) -> str:
    """Who judged the evaluations, by kind and model (`scorer plain_prose`): the run's own
    ranker (flagged: it also made the training pairs) or a separate ranker service."""
    for _, metrics in _eval_records(manifest):
        if "judge" in metrics:
            if metrics.get("judge_is_run_ranker", True):
                return (
                    f"{metrics['judge']}, the run's own ranker: it also made the training pairs, "
                    "so these win rates are self-judged"
                )
            return (
                f"{metrics['judge']}, a separate ranker service (not the one that made the pairs)"
            )
    return "no evaluation has finished yet"


def _lengths(run_dir: Path, k: int) -> list[int]:
    path = run_dir / "eval" / f"policy{k}" / "alpaca_eval_outputs.json"
    if not path.is_file():
        return []
    return [len(r["output"]) for r in json.loads(path.read_text())]


def win_rate_interval(run_dir: Path, k: int, name: str) -> tuple[float, int] | None:
    """(half-width of the 95% interval, n) of policy k's win rate `name` (vs_base, vs_previous).

    From the judgments themselves (`annotations_{name}.json`): the mean judge probability's
    normal interval, 1.96 x sd / sqrt(n). None when the file is missing.
    """
    path = run_dir / "eval" / f"policy{k}" / f"annotations_{name}.json"
    if not path.is_file():
        return None
    probs = [float(a["preference"]) - 1.0 for a in json.loads(path.read_text())]
    n = len(probs)
    if n < 2:
        return (0.0, n)
    return (1.96 * statistics.stdev(probs) / math.sqrt(n), n)


def _stage_seconds(manifest: Manifest) -> list[tuple[str, dict[str, float]]]:
    """The whole run's wall time as bars: setup and the base evaluation, each iteration, report."""
    bars: list[tuple[str, dict[str, float]]] = []
    first = {
        name: manifest.stages[stage].seconds
        for name, stage in (("setup", "setup"), ("evaluate", "policy0.evaluate"))
        if stage in manifest.stages
    }
    bars.append(("setup +\nbase eval", first))
    for k in range(1, manifest.iterations + 1):
        st = manifest.iteration_stages(k)
        bars.append((f"iter {k}", {s: st[s].seconds for s in STAGES if s in st}))
    if "report" in manifest.stages:
        bars.append(("report", {"report": manifest.stages["report"].seconds}))
    return bars


def _plots(
    out: Path,
    rows: list[dict[str, Any]],
    bests: list[dict[str, Any]],
    lengths: dict[int, list[int]],
    *,
    run_dir: Path,
    manifest: Manifest,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r for r in rows if r["iteration"] > 0]
    xs = [r["iteration"] for r in its]
    policies = [r["iteration"] for r in rows]
    judge = judge_line(manifest).split(",")[0]
    made: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.canvas.draw()  # tick labels get their text when drawn
        # What each panel shows, also as PNG text (image viewers show it; tests read it).
        panels = [
            {
                "title": ax.get_title(),
                "xlabel": ax.get_xlabel(),
                "ylabel": ax.get_ylabel(),
                "xticks": [t.get_text() for t in ax.get_xticklabels()],
                "legend": [t.get_text() for t in legend.get_texts()]
                if (legend := ax.get_legend())
                else [],
            }
            for ax in fig.axes
        ]
        fig.savefig(
            out / name,
            dpi=110,
            metadata={
                "Title": " / ".join(p["title"] for p in panels),
                "Description": json.dumps(panels),
            },
        )
        plt.close(fig)
        made.append(name)

    def series(key: str, rs: list[dict[str, Any]] = its) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rs]

    fig, ax = plt.subplots(figsize=(7, 4))
    ns: set[int] = set()
    for key, name, fmt, label in (
        ("win_rate_vs_base", "vs_base", "o-", "vs the base"),
        ("win_rate_vs_previous", "vs_previous", "^-", "vs the previous policy"),
    ):
        intervals = [win_rate_interval(run_dir, k, name) for k in xs]
        ns.update(i[1] for i in intervals if i)
        ax.errorbar(
            xs,
            series(key),
            yerr=[i[0] if i else float("nan") for i in intervals],
            fmt=fmt,
            capsize=4,
            label=f"{label} (95% interval)",
        )
    # AlpacaEval's GLM gives the LC win rate's standard error.
    lc_err = [1.96 * r["lc_standard_error"] if r.get("lc_standard_error") else 0.0 for r in its]
    ax.errorbar(
        xs,
        series("lc_win_rate_vs_base"),
        yerr=lc_err,
        fmt="s--",
        capsize=4,
        label="length-controlled vs the base",
    )
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="0.5: no better than the reference")
    n_text = ", ".join(str(n) for n in sorted(ns)) or "-"
    ax.set(
        title=f"Win rate per policy (judge: {judge}; n = {n_text} instructions)",
        xlabel="policy (after iteration k)",
        ylabel="win rate (mean judge probability)",
        ylim=(0, 1),
        xticks=xs,
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="best")
    save(fig, "win_rates.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, series("mean_chosen_score"), "o-", label="chosen (best of the samples)")
    ax.plot(xs, series("mean_rejected_score"), "o-", label="rejected (worst of the samples)")
    ax.set(
        title="Ranker scores of the training pairs (mean per iteration)",
        xlabel="iteration",
        ylabel="ranker score (the ranker's own scale)",
        xticks=xs,
    )
    ax.legend(fontsize=8)
    save(fig, "scores.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(policies, series("mean_length", rows), "o-")
    ax.set(
        title="Mean answer length on the evaluation instructions",
        xlabel="policy (0 = base)",
        ylabel="mean answer length (characters)",
        xticks=policies,
    )
    save(fig, "lengths.png")

    # The recipe's known weakness: did the win rate rise with the answers' length?
    fig, ax = plt.subplots(figsize=(7, 4))
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
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(
        title="Win rate vs the base against answer length (point labels: policy)",
        xlabel="mean answer length (characters)",
        ylabel="win rate vs the base",
    )
    if bests:  # a run with no evaluation yet has no line to name
        ax.legend(fontsize=8)
    save(fig, "win_rate_vs_length.png")

    if lengths:
        fig, ax = plt.subplots(figsize=(7, 4))
        ks = sorted(lengths)
        ax.boxplot([lengths[k] for k in ks], tick_labels=[str(k) for k in ks])
        ax.set(
            title=f"Answer lengths per policy (n = {len(lengths[ks[0]])} answers each)",
            xlabel="policy (0 = base)",
            ylabel="answer length (characters)",
        )
        save(fig, "length_distribution.png")

    # One panel per figure: loss, accuracy and margin have different units and scales.
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = (
        ("DPO loss", "loss (nats)", "train_loss", "last_loss", "eval_loss"),
        (
            "Reward accuracy",
            "fraction of pairs chosen > rejected",
            "mean_reward_accuracy",
            "reward_accuracy",
            "eval_reward_accuracy",
        ),
        (
            "Reward margin",
            "chosen - rejected implicit reward",
            "mean_reward_margin",
            "reward_margin",
            "eval_reward_margin",
        ),
    )
    for ax, (title, unit, mean_key, last_key, eval_key) in zip(axes, panels, strict=True):
        ax.plot(xs, series(mean_key), "o-", label="train, mean over steps")
        ax.plot(xs, series(last_key), "s--", label="train, last step")
        ax.plot(xs, series(eval_key), "^-", label="eval on test_iteration_k")
        ax.set(title=title, xlabel="iteration", ylabel=unit, xticks=xs)
        ax.legend(fontsize=7)
    save(fig, "dpo_metrics.png")

    bars = _stage_seconds(manifest)
    kinds = ["setup", *STAGES, "report"]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [label for label, _ in bars]
    bottom = [0.0] * len(bars)
    for kind in kinds:
        vals = [seconds.get(kind, 0.0) for _, seconds in bars]
        if not any(vals):
            continue
        ax.bar(labels, vals, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(
        title=f"Wall time per stage (whole run: {sum(bottom):.0f} s)",
        ylabel="seconds (wall time)",
    )
    # Outside the axes: a legend inside would cover the bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="stage")
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
            "Prompts the generator answered with an error (kept out of pairs, and out of "
            "evaluation outputs and comparisons): "
            + ", ".join(f"{name} {count}" for name, count in failed.items())
        )
    return [*lines, ""]


def _evaluation_lines(manifest: Manifest) -> list[str]:
    """What the evaluation figures rest on: instructions admitted, failures, judge truncation,
    best-of-n rows judged by their own picker, and any LC GLM fallback (each on its own line)."""
    setup = manifest.stages.get("setup")
    lines = []
    ea = setup.metrics.get("eval_admission") if setup else None
    if ea:
        lines.append(
            f"- Evaluation instructions admitted: {ea['admitted']} of {ea['instructions']} "
            f"({ea['too_long_skipped']} longer than {ea['prompt_token_limit']} prompt tokens left "
            f"out, {ea['too_long_truncated']} truncated)."
        )
    notes: set[str] = set()
    for k, metrics in _eval_records(manifest):
        figures = [(f"policy {k}", metrics)] + [
            (f"policy {k} best-of-{n}", row) for n, row in (metrics.get("best_of") or {}).items()
        ]
        for name, fig in figures:
            if fig.get("failed_prompts"):
                lines.append(
                    f"- {name}: {fig['failed_prompts']} instructions the generator could not "
                    "answer (left out of its outputs and comparisons)."
                )
            for side in ("vs_base", "vs_previous"):
                cmp = fig.get(side) or {}
                if cmp.get("judge_truncated"):
                    lines.append(
                        f"- {name} {side.replace('_', ' ')}: the judge cut {cmp['judge_truncated']}"
                        f" of {cmp.get('n', '?')} comparisons to its input limits."
                    )
                if cmp.get("lc_note"):
                    notes.add(f"- LC ({cmp.get('lc_glm')}): {cmp['lc_note']}.")
            if fig.get("self_judged"):
                lines.append(
                    f"- {name}: self-judged (the ranker that picked the samples also judged "
                    "them: inflated by construction; set evaluation.judge to a judge that did not "
                    "pick)."
                )
    lines += sorted(notes)
    return ["## Evaluation notes", "", *lines, ""] if lines else []


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
    pngs = _plots(out, rows, bests, lengths, run_dir=Path(run_dir), manifest=manifest)
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
        *_evaluation_lines(manifest),
        *_loss_lines(manifest),
        "| iteration | pairs | ties dropped | chosen score | rejected score | DPO loss (mean of "
        "steps) | reward margin (last step) | reward acc. (last step) | swap s | win vs base | LC win vs base | win vs prev. | mean length |",
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
                    _score(r.get("mean_chosen_score"), r.get("bubble_pairs"), "best"),
                    _score(r.get("mean_rejected_score"), r.get("bubble_pairs"), "worst"),
                    _num(r.get("train_loss"), "{:.4f}"),
                    _num(r.get("reward_margin"), "{:.4f}"),
                    _num(r.get("reward_accuracy"), "{:.2f}"),
                    _num(r.get("swap_seconds"), "{:.3f}"),
                    _num(r.get("win_rate_vs_base")),
                    lc_cell(r.get("lc_win_rate_vs_base"), r.get("lc_glm")),
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
            "| policy | n | win vs base | LC win vs base | mean length | self-judged |",
            "|---" * 6 + "|",
        ]
        for b in bests:
            lines.append(
                f"| {b['policy']} | {b['n']} | {_num(b['win_rate_vs_base'])} | "
                f"{lc_cell(b['lc_win_rate_vs_base'], b['lc_glm'])} | "
                f"{_num(b['mean_length'], '{:.1f}')} | {'yes' if b['self_judged'] else 'no'} |"
            )
    lines += [
        "",
        "## DPO training (per iteration)",
        "",
        "Mean: over every logged step of the job; last: its last logged step; eval: TRL's "
        "evaluate on the iteration's held-out pairs (`test_iteration_k`) after training.",
        "",
        "| iteration | steps | loss mean | loss last | margin mean | margin last | acc. mean "
        "| acc. last | eval pairs | eval loss | eval margin | eval acc. |",
        "|---" * 12 + "|",
    ]
    for r in rows[1:]:
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["iteration"]),
                    _num(r.get("train_steps"), "{}"),
                    _num(r.get("train_loss"), "{:.4f}"),
                    _num(r.get("last_loss"), "{:.4f}"),
                    _num(r.get("mean_reward_margin"), "{:.4f}"),
                    _num(r.get("reward_margin"), "{:.4f}"),
                    _num(r.get("mean_reward_accuracy"), "{:.2f}"),
                    _num(r.get("reward_accuracy"), "{:.2f}"),
                    _num(r.get("test_pairs"), "{}"),
                    _num(r.get("eval_loss"), "{:.4f}"),
                    _num(r.get("eval_reward_margin"), "{:.4f}"),
                    _num(r.get("eval_reward_accuracy"), "{:.2f}"),
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
