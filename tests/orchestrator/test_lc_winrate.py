"""AlpacaEval's length-controlled win rate, against the `alpaca-eval` package's own entry point.

The package's `get_length_controlled_winrate` downloads AlpacaEval's `df_gamed.csv` from the hub
before fitting (for every GLM, even those that never read it). The hub is out of reach here, so
its download function is pointed at a local file of that layout; everything else is the package.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from orchestrator.evaluation import alpaca_annotations, win_rate
from orchestrator.lc_winrate import (
    ALPACA_EVAL_REFERENCE,
    choose_glm,
    length_controlled,
)


def fixed_annotations(n: int, *, seed: int, length_effect: float) -> list[dict[str, Any]]:
    """A judge that prefers longer answers by `length_effect` logits per 100 characters, plus a
    skill gap of +0.4 logits for the policy; lengths drawn at random."""
    rng = np.random.default_rng(seed)
    ref_len = rng.integers(50, 500, n)
    new_len = rng.integers(50, 900, n)
    logit = 0.4 + length_effect * (new_len - ref_len) / 100
    prob = 1 / (1 + np.exp(-logit))
    return alpaca_annotations(
        prompts=[{"prompt": f"instruction {i}"} for i in range(n)],
        outputs=["y" * int(x) for x in new_len],
        reference_outputs=["x" * int(x) for x in ref_len],
        probs=[float(p) for p in prob],
        generator="policy",
        reference_generator="base",
        judge="test-judge",
    )


@pytest.fixture()
def package_glm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import alpaca_eval.metrics.glm_winrate as glm

    gamed = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": "none", "index": range(1000), "instruction_difficulty": 0.0}).to_csv(
        gamed, index=False
    )
    monkeypatch.setattr(glm, "hf_hub_download", lambda **_: str(gamed))
    return glm


@pytest.mark.parametrize(("seed", "effect"), [(0, 0.5), (1, 0.0), (2, 1.5)])
def test_minimal_glm_equals_the_package(package_glm: Any, seed: int, effect: float) -> None:
    ann = fixed_annotations(120, seed=seed, length_effect=effect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = package_glm.get_length_controlled_winrate(
            ann, glm_name="length_controlled_minimal", save_weights_dir=None
        )
    ours = length_controlled(ann, glm="length_controlled_minimal")
    assert ours.glm == "length_controlled_minimal" and ours.note is None
    assert ours.win_rate == pytest.approx(theirs["length_controlled_winrate"] / 100, abs=1e-12)
    # One prediction for every instruction: the package's standard error is 0 by construction,
    # and no standard error is reported for it.
    assert theirs["lc_standard_error"] == pytest.approx(0, abs=1e-9)
    assert ours.standard_error is None
    raw = win_rate(ann, glm="length_controlled_minimal")
    assert raw.win_rate == pytest.approx(theirs["win_rate"] / 100, abs=1e-12)


def test_lc_removes_a_pure_length_effect() -> None:
    # The judge likes length only, in the GLM's own form (no skill gap once lengths are equal),
    # and the policy is longer on average.
    rng = np.random.default_rng(3)
    n = 300
    ref_len = rng.integers(100, 400, n)
    delta = rng.integers(-100, 400, n)
    new_len = ref_len + delta
    prob = 1 / (1 + np.exp(-2.0 * np.tanh(delta / delta.std())))
    ann = alpaca_annotations(
        prompts=[{"prompt": f"q{i}"} for i in range(n)],
        outputs=["y" * int(x) for x in new_len],
        reference_outputs=["x" * int(x) for x in ref_len],
        probs=[float(p) for p in prob],
        generator="policy",
        reference_generator="base",
        judge="j",
    )
    figures = win_rate(ann, glm="length_controlled_minimal")
    assert figures.win_rate > 0.65
    assert figures.lc_win_rate is not None and abs(figures.lc_win_rate - 0.5) < 0.1
    # delta_len is reference minus policy in AlpacaEval's GLM: a length-loving judge is negative.
    assert figures.lc_length_coef is not None and figures.lc_length_coef < 0


def test_the_leaderboard_glm_only_for_alpaca_evals_own_judge_and_reference() -> None:
    ours = fixed_annotations(40, seed=4, length_effect=0.5)
    for i, a in enumerate(ours):
        a["index"] = i  # AlpacaEval's own instructions, judged by a ranker against policy 0
    assert choose_glm(ours) == "length_controlled_minimal"
    assert length_controlled(ours).glm == "length_controlled_minimal"
    assert win_rate(ours).lc_glm == "length_controlled_minimal"
    imported = [
        {**a, "annotator": "weighted_alpaca_eval_gpt4_turbo", "generator_1": ALPACA_EVAL_REFERENCE}
        for a in ours
    ]
    assert choose_glm(imported) == "length_controlled_v1"
    assert choose_glm([{k: v for k, v in a.items() if k != "index"} for a in imported]) == (
        "length_controlled_minimal"
    )
    # The hub is out of reach here: the leaderboard GLM falls back, and says so.
    lc = length_controlled(imported)
    assert lc.glm == "length_controlled_minimal" and lc.note and "fell back" in lc.note


def test_leaderboard_glm_falls_back_offline_and_says_so() -> None:
    ann = fixed_annotations(40, seed=4, length_effect=0.5)
    lc = length_controlled(ann, glm="length_controlled_v1")  # HF_HUB_OFFLINE=1 in the tests
    assert lc.glm == "length_controlled_minimal"
    assert lc.note is not None and "df_gamed.csv" in lc.note
    assert lc.win_rate == length_controlled(ann).win_rate


def test_too_few_or_equal_lengths_give_no_lc() -> None:
    assert length_controlled(fixed_annotations(3, seed=5, length_effect=0.0)).win_rate is None
    same = fixed_annotations(10, seed=6, length_effect=0.0)
    for a in same:
        a["output_1"], a["output_2"] = "a" * 10, "b" * 10
    lc = length_controlled(same)
    assert lc.win_rate is None and lc.note == "every length difference is the same"


def test_leaderboard_glm_is_the_package_function_with_alpaca_eval_indices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """length_controlled_v1 as the package computes it, with a df_gamed.csv of the hub's layout
    (instruction difficulty per AlpacaEval index, two gamed baselines to regularise toward)."""
    import alpaca_eval.metrics.glm_winrate as glm

    rng = np.random.default_rng(7)
    n = 60
    difficulty = rng.normal(0, 1, n)
    gamed = pd.concat(
        [
            pd.DataFrame(
                {
                    "model": model,
                    "index": range(n),
                    "instruction_difficulty": difficulty,
                    "std_delta_len": rng.normal(sign, 1, n),
                    "preference": rng.uniform(0, 1, n),
                    "not_gamed_baseline": False,
                }
            )
            for model, sign in (("verbose", 1.0), ("concise", -1.0))
        ]
    )
    path = tmp_path / "df_gamed.csv"
    gamed.to_csv(path, index=False)
    monkeypatch.setattr(glm, "hf_hub_download", lambda **_: str(path))
    # Our instructions are AlpacaEval rows 60..1 (reversed): the GLM must see those indices.
    ann = fixed_annotations(n, seed=8, length_effect=0.5)
    for i, a in enumerate(ann):
        a["index"] = n - 1 - i
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        frame = pd.DataFrame(ann).set_index("index")
        theirs = glm.get_length_controlled_winrate(
            frame, glm_name="length_controlled_v1", save_weights_dir=None
        )
    ours = length_controlled(ann, glm="length_controlled_v1")
    assert ours.glm == "length_controlled_v1" and ours.note is None
    assert ours.win_rate == pytest.approx(theirs["length_controlled_winrate"] / 100, abs=1e-12)
    assert ours.length_coef is not None
