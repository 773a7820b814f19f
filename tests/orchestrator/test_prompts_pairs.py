"""Prompt slicing and pair building: the data decisions of the recipe."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, PairsConfig, PromptsConfig
from orchestrator.pairs import PairStats, build_pairs, is_test_prompt
from orchestrator.prompts import slice_prompts
from orchestrator.records import RankedRecord
from orchestrator.stages.pairs import no_pairs_advice


def prompts(n: int) -> list[dict[str, str]]:
    return [{"prompt_id": f"p{i}", "prompt": f"q{i}"} for i in range(n)]


def test_slices_are_disjoint_seeded_and_sized() -> None:
    cfg = PromptsConfig(source="x.jsonl", per_iteration=10, eval_prompts=5, seed=3)
    a = slice_prompts(prompts(40), cfg, 3)
    b = slice_prompts(prompts(40), cfg, 3)
    assert a == b
    ids = [p["prompt_id"] for s in a.values() for p in s]
    assert len(ids) == len(set(ids)) == 35
    assert [len(a[k]) for k in ("eval", "iteration_1", "iteration_2", "iteration_3")] == [
        5,
        10,
        10,
        10,
    ]
    other = slice_prompts(prompts(40), cfg.model_copy(update={"seed": 4}), 3)
    assert other["iteration_1"] != a["iteration_1"]


def test_too_few_prompts_is_a_config_error() -> None:
    cfg = PromptsConfig(source="x.jsonl", per_iteration=10, eval_prompts=5)
    with pytest.raises(ConfigError, match="needs 35"):
        slice_prompts(prompts(30), cfg, 3)


def rec(
    pid: str,
    scores: list[float] | None,
    cands: list[str] | None = None,
    best: int = 0,
    worst: int = 1,
    empty: int = 0,
) -> RankedRecord:
    cands = cands or [f"answer {i}" for i in range(len(scores or [0, 0]))]
    return RankedRecord(
        prompt_id=pid,
        prompt="q",
        candidates=cands,
        scores=scores,
        best_index=best,
        worst_index=worst,
        empty=empty,
    )


def test_best_vs_worst_and_ties_dropped() -> None:
    records = [
        rec("a", [0.1, 0.9, -0.5]),
        rec("b", [0.3, 0.3, 0.3]),
        rec("c", [1.0], ["only"], empty=4),
    ]
    train, test, stats = build_pairs(records, PairsConfig(test_fraction=0.0))
    assert stats.pairs == 1 and stats.ties_dropped == 1 and stats.too_few_responses == 1
    assert stats.empty_responses == 4
    row = train[0]
    assert row["chosen"][1]["content"] == "answer 1" and row["rejected"][1]["content"] == "answer 2"
    assert row["all_rm_scores"] == [0.1, 0.9, -0.5] and test == []


def test_length_penalty_can_flip_the_choice() -> None:
    records = [rec("a", [1.0, 0.9], ["x" * 1000, "short"])]
    plain, _, _ = build_pairs(records, PairsConfig(test_fraction=0.0))
    penalised, _, _ = build_pairs(
        records, PairsConfig(rule="length_penalised", length_penalty=0.05, test_fraction=0.0)
    )
    assert plain[0]["chosen"][1]["content"].startswith("xxx")
    assert penalised[0]["chosen"][1]["content"] == "short"


def test_bubble_mode_uses_best_and_worst_indices() -> None:
    train, _, stats = build_pairs(
        [rec("a", None, ["u", "v", "w"], best=2, worst=0)], PairsConfig(test_fraction=0.0)
    )
    assert train[0]["chosen"][1]["content"] == "w" and train[0]["rejected"][1]["content"] == "u"
    assert train[0]["all_rm_scores"] == [] and stats.pairs == 1
    # Ranks only: no score is made up for chosen (1.0) or rejected (0.0).
    summary = stats.summary()
    assert summary["mean_chosen_score"] is None and summary["mean_rejected_score"] is None
    assert summary["bubble_pairs"] == 1


def test_no_pairs_advice_follows_the_cause_and_never_asks_for_more_max_tokens() -> None:
    errors = no_pairs_advice(PairStats(generation_errors=9, ties_dropped=1))
    assert "generator" in errors and "max_model_len" in errors
    assert "temperature" in no_pairs_advice(PairStats(ties_dropped=9, too_few_responses=1))
    assert "empty" in no_pairs_advice(PairStats(too_few_responses=9))
    for stats in (PairStats(generation_errors=1), PairStats(ties_dropped=1)):
        assert "max_tokens" not in no_pairs_advice(stats)


def test_test_split_is_deterministic_by_prompt_id() -> None:
    ids = [f"p{i}" for i in range(2000)]
    chosen = [i for i in ids if is_test_prompt(i, 0.1)]
    assert chosen == [i for i in ids if is_test_prompt(i, 0.1)]
    assert 150 < len(chosen) < 250


def test_equal_scores_after_the_length_penalty_pick_the_first_highest_and_first_lowest() -> None:
    # Four answers: the penalty makes #1 and #2 tie for best and #0 and #3 tie for worst; the
    # shared tie-break (the ranker's own) takes the earliest of each.
    # Lengths 100, 100, 200, 200 and a penalty of 0.5 per 100: adjusted -0.5, 0.0, 0.0, -0.5.
    records = [rec("a", [0.0, 0.5, 1.0, 0.5], ["a" * 100, "b" * 100, "c" * 200, "d" * 200])]
    train, _, _ = build_pairs(
        records, PairsConfig(rule="length_penalised", length_penalty=0.5, test_fraction=0.0)
    )
    assert train[0]["chosen"][1]["content"] == "b" * 100
    assert train[0]["rejected"][1]["content"] == "a" * 100


def test_win_probabilities_follow_the_chosen_and_rejected_answers() -> None:
    record = RankedRecord(
        prompt_id="a",
        prompt="q",
        candidates=["x" * 1000, "short", "mid"],
        scores=[1.0, 0.9, -0.2],
        win_probs=[0.7, 0.6, 0.2],
        best_index=0,
        worst_index=2,
    )
    plain, _, _ = build_pairs([record], PairsConfig(test_fraction=0.0))
    assert (plain[0]["chosen_win_prob"], plain[0]["rejected_win_prob"]) == (0.7, 0.2)
    assert plain[0]["all_win_probs"] == [0.7, 0.6, 0.2]
    # The length penalty picks another chosen answer: its own probability goes with it.
    penalised, _, _ = build_pairs(
        [record], PairsConfig(rule="length_penalised", length_penalty=0.05, test_fraction=0.0)
    )
    assert penalised[0]["chosen"][1]["content"] == "short"
    assert penalised[0]["chosen_win_prob"] == 0.6
    # Bubble mode knows no probabilities: the columns are there, empty.
    bubble, _, _ = build_pairs(
        [rec("b", None, ["u", "v"], best=1, worst=0)], PairsConfig(test_fraction=0.0)
    )
    assert bubble[0]["chosen_win_prob"] is None and bubble[0]["all_win_probs"] == []
    # Shards written before win probabilities existed keep their bytes.
    line = rec("c", [0.1, 0.2]).model_dump(mode="json")
    assert "win_probs" not in line
