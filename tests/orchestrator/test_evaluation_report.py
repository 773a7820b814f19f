"""Evaluation figures and the report, from synthetic judgments and a synthetic manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.evaluation import alpaca_annotations, win_rate
from orchestrator.manifest import Manifest
from orchestrator.report import best_of_rows, iteration_rows, judge_line, write_report


def test_win_rate_is_the_mean_probability_and_needs_annotations() -> None:
    ann = alpaca_annotations(
        prompts=[{"prompt": "a", "index": "3"}, {"prompt": "b", "index": "7"}],
        outputs=["long answer", "x"],
        reference_outputs=["short", "y"],
        probs=[0.9, 0.5],
        generator="p1",
        reference_generator="p0",
        judge="j",
    )
    assert ann[0]["preference"] == 1.9 and ann[1]["index"] == 7
    figures = win_rate(ann, glm="length_controlled_minimal")
    assert figures.win_rate == pytest.approx(0.7) and figures.hard_win_rate == 0.75
    assert figures.lc_win_rate is None  # too few annotations for the GLM's 5-fold fit
    with pytest.raises(ValueError):
        win_rate([], glm="length_controlled_minimal")


def _manifest(judge_is_run_ranker: bool) -> Manifest:
    m = Manifest(run_id="r", config_fingerprint="f", iterations=2, status="completed")
    m.stage("setup").state = "done"
    m.stage("setup").metrics = {"eval_source": "alpaca.json"}
    best = {
        "4": {
            "mean_length": 60.0,
            "vs_base": {
                "win_rate": 0.7,
                "lc_win_rate": 0.65,
                "lc_glm": "length_controlled_minimal",
            },
        }
    }
    m.stage("policy0.evaluate").state = "done"
    m.stage("policy0.evaluate").metrics = {
        "mean_length": 50.0,
        "judge": "PairRM llm-blender/PairRM",
        "judge_is_run_ranker": judge_is_run_ranker,
        "best_of": best,
    }
    for k in (1, 2):
        m.stage(f"iter{k}.pairs").metrics = {
            "pairs": 10 * k,
            "ties_dropped": 1,
            "mean_chosen_score": 1.0,
            "mean_rejected_score": -1.0,
        }
        m.stage(f"iter{k}.train").metrics = {"dpo/train_loss": 0.6}
        m.stage(f"iter{k}.swap").metrics = {"swap_seconds": 0.02}
        m.stage(f"iter{k}.evaluate").state = "done"
        m.stage(f"iter{k}.evaluate").metrics = {
            "mean_length": 40.0 + k,
            "judge": "PairRM llm-blender/PairRM",
            "judge_is_run_ranker": judge_is_run_ranker,
            "vs_base": {
                "win_rate": 0.6,
                "lc_win_rate": 0.55,
                "lc_glm": "length_controlled_minimal",
            },
            "vs_previous": {"win_rate": 0.52},
            "best_of": best,
        }
        m.stage(f"iter{k}.train").seconds = 3.0
    return m


def test_report_has_tables_best_of_rows_judge_and_plots(tmp_path: Path) -> None:
    m = _manifest(judge_is_run_ranker=False)
    for k in (0, 1, 2):
        out = tmp_path / "eval" / f"policy{k}" / "alpaca_eval_outputs.json"
        out.parent.mkdir(parents=True)
        out.write_text(
            json.dumps([{"instruction": "i", "output": "o" * (10 * j + k)} for j in range(9)])
        )
    rows = iteration_rows(m)
    assert rows[2]["pairs"] == 20 and rows[1]["win_rate_vs_base"] == 0.6
    bests = best_of_rows(m)
    assert [(b["policy"], b["n"]) for b in bests] == [
        (0, 1),
        (0, 4),
        (1, 1),
        (1, 4),
        (2, 1),
        (2, 4),
    ]
    # The base's plain answers are the reference: no figure is made up for them.
    assert bests[0]["win_rate_vs_base"] is None and bests[1]["win_rate_vs_base"] == 0.7
    path = write_report(tmp_path, m)
    text = path.read_text()
    assert "| 2 | 20 | 1 |" in text and "0.600" in text
    assert "| 1 | 4 | 0.700 | 0.650 (minimal) | 60.0 | no |" in text
    assert "PairRM llm-blender/PairRM, a separate ranker service" in text
    assert "length_controlled_minimal" in text and "alpaca.json" in text
    for png in (
        "win_rates.png",
        "scores.png",
        "lengths.png",
        "win_rate_vs_length.png",
        "length_distribution.png",
        "dpo_metrics.png",
        "stage_times.png",
    ):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    own = judge_line(_manifest(judge_is_run_ranker=True))
    assert (
        own.startswith("PairRM llm-blender/PairRM, the run's own ranker") and "self-judged" in own
    )


def test_report_marks_bubble_ranks_self_judged_rows_glm_fallbacks_and_failures(
    tmp_path: Path,
) -> None:
    m = _manifest(judge_is_run_ranker=True)
    m.stage("setup").metrics["eval_admission"] = {
        "instructions": 805,
        "admitted": 803,
        "too_long_skipped": 2,
        "too_long_truncated": 0,
        "prompt_token_limit": 30720,
    }
    # Bubble mode: the ranker knows best and worst only; the pairs stage records no scores.
    m.stage("iter1.pairs").metrics.update(
        bubble_pairs=10, mean_chosen_score=None, mean_rejected_score=None
    )
    final = m.stage("iter2.evaluate").metrics
    final["failed_prompts"] = 3
    final["vs_base"].update(
        judge_truncated=4,
        n=802,
        lc_note="length_controlled_v1 needs df_gamed.csv (offline); fell back",
    )
    final["best_of"] = {
        "4": {**final["best_of"]["4"], "self_judged": True, "judge": "http://127.0.0.1:9"}
    }
    text = write_report(tmp_path, m).read_text()
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 | 10 |"))
    assert "best (bubble ranks) | worst (bubble ranks)" in row1 and "1.000" not in row1
    assert "| 2 | 20 | 1 | 1.000 | -1.000 |" in text  # scores where the ranker gave scores
    assert "Evaluation instructions admitted: 803 of 805 (2 longer than 30720" in text
    assert "policy 2: 3 instructions the generator could not answer" in text
    assert "the judge cut 4 of 802 comparisons" in text
    assert "policy 2 best-of-4: self-judged" in text and "| 2 | 4 | 0.700 |" in text
    assert "| 2 | 4 | 0.700 | 0.650 (minimal) | 60.0 | yes |" in text
    assert "- LC (length_controlled_minimal): length_controlled_v1 needs df_gamed.csv" in text
