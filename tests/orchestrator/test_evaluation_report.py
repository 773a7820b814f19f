"""Evaluation figures and the report, from synthetic judgments and a synthetic manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.evaluation import length_controlled_win_rate, win_rate
from orchestrator.manifest import Manifest
from orchestrator.report import iteration_rows, write_report


def test_lc_win_rate_removes_a_pure_length_effect() -> None:
    rng = np.random.default_rng(0)
    dlen = rng.normal(0, 200, 400)
    ref = np.full(400, 1000.0)
    # The judge only likes length: P(win) rises with the length difference, 0.5 at equal length.
    probs = 1 / (1 + np.exp(-dlen / 100))
    raw = win_rate(
        list(probs), list(ref + dlen + 300), list(ref)
    )  # the policy is also longer on average
    lc, coef = length_controlled_win_rate(probs, ref + dlen, ref)
    assert coef > 0
    assert abs(lc - 0.5) < 0.05
    assert raw.win_rate == pytest.approx(float(np.mean(probs)))


def test_lc_equals_raw_when_lengths_do_not_matter() -> None:
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.6, 0.9, 300)
    lengths = rng.integers(100, 500, 300)
    figures = win_rate(list(probs), list(lengths), list(lengths[::-1]))
    assert figures.lc_win_rate == pytest.approx(figures.win_rate, abs=0.03)
    assert figures.hard_win_rate == 1.0


def test_win_rate_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        win_rate([0.5], [1, 2], [1])


def test_report_has_table_and_plots(tmp_path: Path) -> None:
    m = Manifest(run_id="r", config_fingerprint="f", iterations=2, status="completed")
    m.stage("policy0.evaluate").metrics = {"mean_length": 50.0}
    for k in (1, 2):
        m.stage(f"iter{k}.pairs").metrics = {
            "pairs": 10 * k,
            "ties_dropped": 1,
            "mean_chosen_score": 1.0,
            "mean_rejected_score": -1.0,
        }
        m.stage(f"iter{k}.train").metrics = {"dpo/train_loss": 0.6}
        m.stage(f"iter{k}.swap").metrics = {"swap_seconds": 0.02}
        m.stage(f"iter{k}.evaluate").metrics = {
            "mean_length": 40.0,
            "vs_base": {"win_rate": 0.6, "lc_win_rate": 0.55},
            "vs_previous": {"win_rate": 0.52},
        }
        m.stage(f"iter{k}.train").seconds = 3.0
    rows = iteration_rows(m)
    assert rows[2]["pairs"] == 20 and rows[1]["win_rate_vs_base"] == 0.6
    path = write_report(tmp_path, m)
    text = path.read_text()
    assert "| 2 | 20 | 1 |" in text and "0.600" in text
    for png in ("win_rates.png", "scores.png", "lengths.png", "dpo_metrics.png", "stage_times.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
