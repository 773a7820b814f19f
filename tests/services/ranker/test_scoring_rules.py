"""The arithmetic every backend shares (ranks, ties, comparisons) and the shipped scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pairloop.contracts.ranker import Truncation
from services.ranker import score_functions
from services.ranker.rankers import BACKENDS, build_ranker, load_object
from services.ranker.rankers.base import (
    compare_from_scores,
    rank_from_scores,
    ranks_from_scores,
    sigmoid,
)
from services.ranker.settings import RankerSettings


def test_ranks_share_the_better_rank_on_ties_like_llm_blender() -> None:
    from services.ranker.blender_adapter import import_llm_blender

    import_llm_blender()
    from llm_blender.gpt_eval.utils import get_ranks_from_scores

    for scores in ([0.5, 2.0, 0.5, -1.0], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0]):
        assert ranks_from_scores(scores) == get_ranks_from_scores(np.array(scores)).tolist()


def test_best_worst_and_tie() -> None:
    result = rank_from_scores([0.5, 2.0, 2.0, -1.0, -1.0], Truncation(candidates=[False] * 5))
    assert (result.best_index, result.worst_index, result.tie) == (1, 3, False)
    flat = rank_from_scores([0.25, 0.25, 0.25], Truncation(candidates=[False] * 3))
    assert flat.best_index == flat.worst_index == 0 and flat.tie is True
    assert flat.ranks == [1, 1, 1]


def test_pointwise_comparison_is_a_sigmoid_of_the_score_gap() -> None:
    result = compare_from_scores(2.0, 0.5, Truncation(candidates=[False, False]))
    assert result.logit == 1.5
    assert result.prob_a_beats_b == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0  # no overflow


def test_concise_and_on_topic_prefers_short_answers_that_use_the_prompts_words() -> None:
    prompt = "Why is the sky blue?"
    on_topic = "The sky is blue because air scatters blue sunlight more than red light."
    rambling = on_topic + " " + " ".join(["Also, many other things are true."] * 30)
    off_topic = "Paris is the capital of France."
    s = [score_functions.concise_and_on_topic(prompt, c) for c in (on_topic, rambling, off_topic)]
    assert s[0] == 2.0 > s[1] > s[2] == 0.0
    assert score_functions.concise_and_on_topic(prompt, on_topic) == s[0]  # deterministic


def test_length_target_peaks_at_the_target() -> None:
    at_target = " ".join(["word"] * score_functions.TARGET_WORDS)
    assert score_functions.length_target("p", at_target) == 0.0
    half, double = at_target[: len(at_target) // 2], at_target + " " + at_target
    assert score_functions.length_target("p", half) == pytest.approx(
        score_functions.length_target("p", double), abs=0.05
    )
    assert score_functions.length_target("p", half) < 0


def test_registry_names_factories_that_exist() -> None:
    for target in BACKENDS.values():
        assert callable(load_object(target))
    for bad in ("no_colon", "services.ranker.score_functions:", "not_a_module_xyz:f"):
        with pytest.raises(ValueError, match="import"):
            load_object(bad)


def test_build_ranker_accepts_a_factory_import_path() -> None:
    settings = RankerSettings(
        backend="services.ranker.rankers.function_scorer:build",
        model="services.ranker.score_functions:length_target",
    )
    from services.ranker.metrics import RankerMetrics

    ranker = build_ranker(settings, RankerMetrics())
    assert (
        ranker.backend == "scorer"
        and ranker.model == "services.ranker.score_functions:length_target"
    )


def test_plain_prose_rewards_lowercase_prose_whatever_the_length() -> None:
    from services.ranker.score_functions import PROSE_SCALE, plain_prose

    assert plain_prose("q", "plain words only") == PROSE_SCALE
    assert plain_prose("q", "plain words only " * 20) == PROSE_SCALE
    assert plain_prose("q", "ALL-CAPS#1!") == 0.0
    assert plain_prose("q", "mostly plain, Some Caps") < plain_prose("q", "mostly plain some caps")
    assert plain_prose("q", "") == 0.0
