"""The report explains itself: DPO figures say mean or last step (and eval on test_iteration_k),
every plot has a title, labelled axes, integer policy ticks, win rates with n and a 95% interval,
and the time plot covers the whole run with a legend outside the bars."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from PIL import Image

from orchestrator.manifest import Manifest
from orchestrator.report import win_rate_interval, write_report

JUDGE = "scorer plain_prose"


def _run(tmp_path: Path) -> Manifest:
    """A finished 3-iteration run: manifest figures as the stages record them, judgments on disk."""
    m = Manifest(run_id="r", config_fingerprint="f", iterations=3, status="completed")
    m.stage("setup").state = "done"
    m.stage("setup").seconds = 4.0
    base = m.stage("policy0.evaluate")
    base.state, base.seconds = "done", 6.0
    base.metrics = {"mean_length": 40.0, "judge": JUDGE, "judge_is_run_ranker": True}
    for k in (1, 2, 3):
        probs = [0.5 + 0.1 * k * ((i % 3) - 0.5) for i in range(12)]
        folder = tmp_path / "eval" / f"policy{k}"
        folder.mkdir(parents=True)
        for name in ("vs_base", "vs_previous"):
            (folder / f"annotations_{name}.json").write_text(
                json.dumps([{"preference": 1.0 + p} for p in probs])
            )
        (folder / "alpaca_eval_outputs.json").write_text(
            json.dumps([{"instruction": "i", "output": "o" * (10 * k + j)} for j in range(12)])
        )
        m.stage(f"iter{k}.pairs").metrics = {
            "pairs": 9,
            "test_pairs": 3,
            "mean_chosen_score": 0.8,
            "mean_rejected_score": 0.2,
        }
        m.stage(f"iter{k}.train").metrics = {
            "steps": 4,
            "dpo/train_loss": 0.65,
            "dpo/loss": 0.6,
            "dpo/mean/rewards/margins": 0.02,
            "dpo/rewards/margins": 0.05,
            "dpo/mean/rewards/accuracies": 0.55,
            "dpo/rewards/accuracies": 1.0,
            "dpo/eval_loss": 0.68,
            "dpo/eval_rewards/margins": 0.01,
            "dpo/eval_rewards/accuracies": 0.67,
        }
        evaluate = m.stage(f"iter{k}.evaluate")
        evaluate.metrics = {
            "mean_length": 40.0 + 10 * k,
            "judge": JUDGE,
            "judge_is_run_ranker": True,
            "vs_base": {
                "win_rate": statistics.mean(probs),
                "n": 12,
                "lc_win_rate": 0.5,
                "lc_standard_error": 0.05,
            },
            "vs_previous": {"win_rate": statistics.mean(probs), "n": 12},
        }
        for stage in ("generate", "rank", "pairs", "train", "swap", "evaluate"):
            m.stage(f"iter{k}.{stage}").state = "done"
            m.stages[f"iter{k}.{stage}"].seconds = 1.0 + k
    m.stage("report").seconds = 2.0
    return m


def _panels(path: Path) -> list[dict[str, Any]]:
    with Image.open(path) as image:
        return json.loads(image.text["Description"])


def test_dpo_figures_say_mean_last_or_eval(tmp_path: Path) -> None:
    text = write_report(tmp_path, _run(tmp_path)).read_text()
    assert "DPO loss (mean of steps)" in text and "reward acc. (last step)" in text
    assert (
        "| 1 | 4 | 0.6500 | 0.6000 | 0.0200 | 0.0500 | 0.55 | 1.00 | 3 | 0.6800 | 0.0100 | 0.67 |"
        in text
    )
    assert "scorer plain_prose, the run's own ranker" in text and "self-judged" in text


def test_every_plot_has_a_title_labelled_axes_and_integer_policy_ticks(tmp_path: Path) -> None:
    write_report(tmp_path, _run(tmp_path))
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert len(pngs) == 7
    for png in pngs:
        for panel in _panels(png):
            assert panel["title"] and panel["ylabel"], (png.name, panel)
            assert panel["xlabel"] or png.name == "stage_times.png", (png.name, panel)
    (lengths,) = _panels(tmp_path / "report" / "lengths.png")
    assert lengths["xticks"] == ["0", "1", "2", "3"]
    dpo = _panels(tmp_path / "report" / "dpo_metrics.png")
    assert [p["title"] for p in dpo] == ["DPO loss", "Reward accuracy", "Reward margin"]
    assert all(
        p["legend"] == ["train, mean over steps", "train, last step", "eval on test_iteration_k"]
        for p in dpo
    )


def test_win_rates_carry_n_and_a_95_percent_interval(tmp_path: Path) -> None:
    m = _run(tmp_path)
    write_report(tmp_path, m)
    (panel,) = _panels(tmp_path / "report" / "win_rates.png")
    assert "n = 12" in panel["title"] and JUDGE in panel["title"]
    assert any("95% interval" in label for label in panel["legend"])
    half, n = win_rate_interval(tmp_path, 2, "vs_base") or (0.0, 0)
    probs = [0.5 + 0.2 * ((i % 3) - 0.5) for i in range(12)]
    assert n == 12
    assert math.isclose(half, 1.96 * statistics.stdev(probs) / math.sqrt(12)) and half > 0


def test_the_time_plot_covers_the_whole_run_and_its_legend_hides_nothing(tmp_path: Path) -> None:
    write_report(tmp_path, _run(tmp_path))
    (panel,) = _panels(tmp_path / "report" / "stage_times.png")
    assert panel["xticks"] == ["setup +\nbase eval", "iter 1", "iter 2", "iter 3", "report"]
    assert panel["legend"] == [
        "setup",
        "generate",
        "rank",
        "pairs",
        "train",
        "swap",
        "evaluate",
        "report",
    ]
    # whole run: 4 + 6 + 3 iterations x 6 stages x (1 + k) s + 2 = 66 s
    assert "whole run: 66 s" in panel["title"]
