"""The other backends answer through the same routes: a sequence-classification reward model and a
programmatic scorer, each in its own real server. Startup failures are clear and fatal."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from pairloop_local.processes import free_port
from services.ranker import score_functions

ITEMS = [
    {
        "prompt": "Why is the sky blue?",
        "candidates": [
            "The sky is blue because air scatters blue sunlight more than red light.",
            "No.",
            "Blue. " * 80,
        ],
    },
    {
        "prompt": "Give three tips for learning to cook.",
        "candidates": [
            "Start simple, taste as you cook, and learn a few basic techniques well.",
            "Cooking is fun and many people enjoy it on weekends with their families.",
        ],
    },
]


def post(url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def check_routes_agree(url: str, expected: list[list[float]], backend: str) -> None:
    """rank, select and compare on ITEMS are consistent with the per-candidate `expected`."""
    for mode in ("full", "bubble"):  # pointwise backends score every candidate in both modes
        ranked = post(url, "/v1/rank", {"items": ITEMS, "mode": mode})
        assert ranked["backend"] == backend
        for result, want in zip(ranked["results"], expected, strict=True):
            assert result["scores"] == pytest.approx(want, abs=1e-4)
            assert result["best_index"] == want.index(max(want))
            assert result["worst_index"] == want.index(min(want))
            assert result["ranks"] == [sorted(want, reverse=True).index(s) + 1 for s in want]
            # Win probabilities: Bradley-Terry on the scores, P(i beats j) = sigmoid(s_i - s_j).
            bt = [
                sum(1 / (1 + math.exp(b - a)) for j, b in enumerate(want) if j != i)
                / (len(want) - 1)
                for i, a in enumerate(want)
            ]
            assert result["win_probs"] == pytest.approx(bt, abs=1e-4)
    worst = post(url, "/v1/select", {"items": ITEMS, "pick": "worst"})
    for result, want, item in zip(worst["results"], expected, ITEMS, strict=True):
        assert result["candidate"] == item["candidates"][want.index(min(want))]
    item = ITEMS[0]
    pair = {"prompt": item["prompt"], "a": item["candidates"][0], "b": item["candidates"][1]}
    (compared,) = post(url, "/v1/compare", {"items": [pair]})["results"]
    logit = expected[0][0] - expected[0][1]
    assert compared["logit"] == pytest.approx(logit, abs=1e-4)
    assert compared["prob_a_beats_b"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-4)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_reward_model: Path) -> Path:
    """The session's tiny Llama reward model (`pairloop_local.tiny_models`)."""
    return tiny_reward_model


@pytest.fixture(scope="module")
def reward_model_url(
    reward_model_dir: Path, start_ranker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    args = ["--backend", "reward-model", "--model", str(reward_model_dir), "--batch-wait-ms", "20"]
    with start_ranker(args, tmp_path_factory.mktemp("rm-server")) as url:
        yield url


def test_reward_model_backend_scores_like_the_model_itself(
    reward_model_url: str, reward_model_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    expected = []
    for item in ITEMS:
        scores = []
        for candidate in item["candidates"]:
            messages = [
                {"role": "user", "content": item["prompt"]},
                {"role": "assistant", "content": candidate},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.inference_mode():
                scores.append(float(model(input_ids=ids).logits[0, 0]))
        expected.append(scores)
    assert max(expected[0]) - min(expected[0]) > 1e-3  # informative scores

    check_routes_agree(reward_model_url, expected, "reward-model")


@pytest.fixture(scope="module")
def scorer_url(start_ranker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = [
        "--backend",
        "scorer",
        "--model",
        "services.ranker.score_functions:concise_and_on_topic",
    ]
    with start_ranker(args, tmp_path_factory.mktemp("scorer-server")) as url:
        yield url


def test_programmatic_scorer_backend_answers_through_the_same_routes(scorer_url: str) -> None:
    expected = [
        [score_functions.concise_and_on_topic(item["prompt"], c) for c in item["candidates"]]
        for item in ITEMS
    ]
    check_routes_agree(scorer_url, expected, "scorer")
    ranked = post(scorer_url, "/v1/rank", {"items": ITEMS})
    assert ranked["model"] == "services.ranker.score_functions:concise_and_on_topic"
    assert ranked["results"][0]["best_index"] == 0  # on topic and concise beats "No." and padding


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.ranker", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_backend_that_cannot_load_stops_the_server_with_the_reason() -> None:
    done = run_cli(
        "--backend", "scorer", "--model", "services.ranker.score_functions:no_such_scorer"
    )
    assert done.returncode == 1
    assert "has no attribute 'no_such_scorer'" in done.stderr


def test_unknown_backend_and_bad_flags_are_reported() -> None:
    done = run_cli("--backend", "magic")
    assert done.returncode == 1
    assert "unknown backend 'magic'" in done.stderr
    done = run_cli("--device", "tpu")
    assert done.returncode == 2
    assert "--device" in done.stderr and "cpu, cuda, cuda:N or mps" in done.stderr
