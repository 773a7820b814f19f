"""The PairRM service gives llm-blender's own numbers: `Blender.rank(..., return_scores=True)` in
full mode (1e-5), `get_best_of_n` / `get_worst_of_n` in bubble mode, `compare` for pairs, and the
collator's truncation, all computed in-process on the same checkpoint and inputs."""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch

TOL = 1e-5


def post(url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def rank_items(prompts: list[str], candidates: list[list[str]]) -> list[dict[str, Any]]:
    return [{"prompt": p, "candidates": c} for p, c in zip(prompts, candidates, strict=True)]


@pytest.mark.parametrize(("seed", "n_items", "n_candidates"), [(1, 8, 5), (2, 3, 2), (3, 4, 6)])
def test_full_mode_equals_blender_rank(
    pairrm_url: str, reference_blender: Any, items_factory: Any, seed: int, n_items: int,
    n_candidates: int,
) -> None:  # fmt: skip
    prompts, candidates = items_factory(seed, n_items, n_candidates)
    expected = reference_blender.rank(prompts, candidates, return_scores=True, batch_size=8)
    expected_ranks = reference_blender.rank(prompts, candidates, batch_size=8)

    body = post(pairrm_url, "/v1/rank", {"items": rank_items(prompts, candidates)})

    assert body["backend"] == "pairrm" and body["mode"] == "full"
    got = np.array([r["scores"] for r in body["results"]])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    # Scores must be informative, or equality would prove little: spread O(1) across candidates.
    assert float(np.std(expected)) > 0.05
    for result, ranks, scores in zip(body["results"], expected_ranks, expected, strict=True):
        assert result["ranks"] == ranks.tolist()
        assert result["best_index"] == int(np.argmax(scores))
        assert result["worst_index"] == int(np.argmin(scores))
        assert result["tie"] is False
        assert result["truncated"] == {"prompt": False, "candidates": [False] * n_candidates}


@pytest.fixture()
def identity_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    """llm-blender's bubble starts from `torch.randperm`; the service from the given order."""
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: torch.arange(n))


@pytest.mark.usefixtures("identity_permutation")
def test_bubble_mode_equals_get_best_and_worst_of_n(
    pairrm_url: str, reference_blender: Any, items_factory: Any
) -> None:
    prompts, candidates = items_factory(4, 8, 5)
    best = reference_blender.get_best_of_n(prompts, candidates, pairrm_cmp_type="bubble")
    worst = reference_blender.get_worst_of_n(prompts, candidates, pairrm_cmp_type="bubble")
    items = rank_items(prompts, candidates)

    ranked = post(pairrm_url, "/v1/rank", {"items": items, "mode": "bubble"})
    picked_best = post(pairrm_url, "/v1/select", {"items": items, "mode": "bubble", "pick": "best"})
    picked_worst = post(
        pairrm_url, "/v1/select", {"items": items, "mode": "bubble", "pick": "worst"}
    )

    for i, cands in enumerate(candidates):
        result = ranked["results"][i]
        assert result["scores"] is None and result["ranks"] is None
        assert cands[result["best_index"]] == best[i]
        assert cands[result["worst_index"]] == worst[i]
        assert picked_best["results"][i]["candidate"] == best[i]
        assert picked_worst["results"][i]["candidate"] == worst[i]
    # The random model must not make every item trivially the same answer as full mode's.
    assert len({r["best_index"] for r in ranked["results"]}) > 1


def test_compare_equals_blender_compare(
    pairrm_url: str, reference_blender: Any, items_factory: Any
) -> None:
    prompts, candidates = items_factory(5, 4, 2)
    # Each pair both ways round: the averaged probabilities must then sum to one.
    prompts = prompts + prompts
    a = [c[0] for c in candidates] + [c[1] for c in candidates]
    b = [c[1] for c in candidates] + [c[0] for c in candidates]
    # llm-blender's default mode "[A,B]+[B,A]": L(a, b) - L(b, a), twice our averaged logit.
    expected = reference_blender.compare(prompts, a, b, return_logits=True)

    body = post(
        pairrm_url,
        "/v1/compare",
        {"items": [{"prompt": p, "a": x, "b": y} for p, x, y in zip(prompts, a, b, strict=True)]},
    )

    results = body["results"]
    for result, want in zip(results, expected, strict=True):
        assert result["logit"] == pytest.approx(want / 2, abs=TOL)
        assert result["prob_a_beats_b"] == pytest.approx(1 / (1 + math.exp(-want / 2)), abs=TOL)
    for forward, backward in zip(results[:4], results[4:], strict=True):
        assert forward["prob_a_beats_b"] + backward["prob_a_beats_b"] == pytest.approx(1, abs=TOL)
    assert len({round(r["prob_a_beats_b"], 3) for r in results}) > 2  # informative, not all 0.5


def test_select_full_mode_picks_blender_best_and_worst(
    pairrm_url: str, reference_blender: Any, items_factory: Any
) -> None:
    prompts, candidates = items_factory(6, 4, 4)
    scores = reference_blender.rank(prompts, candidates, return_scores=True)
    items = rank_items(prompts, candidates)
    best = post(pairrm_url, "/v1/select", {"items": items})
    worst = post(pairrm_url, "/v1/select", {"items": items, "pick": "worst"})
    for i, row in enumerate(scores):
        assert best["results"][i]["index"] == int(np.argmax(row))
        assert best["results"][i]["candidate"] == candidates[i][int(np.argmax(row))]
        assert best["results"][i]["score"] == pytest.approx(float(row.max()), abs=TOL)
        assert worst["results"][i]["index"] == int(np.argmin(row))


def test_truncation_is_reported_and_matches_the_collator(
    pairrm_url: str, reference_blender: Any, items_factory: Any, read_metric: Any
) -> None:
    prompts, candidates = items_factory(7, 2, 2)
    tokenizer = reference_blender.ranker_tokenizer
    # Item 0: a prompt over 1224 tokens (so candidates keep only their own 412) and one long
    # candidate. Item 1: a ~600-token prompt leaves ~600 of its 1224 unused, and candidates may
    # use half of that on top of 412: one candidate beyond that limit is cut, one beyond 412 is not.
    long_prompt = " ".join([prompts[0]] * 200)
    assert len(tokenizer(long_prompt).input_ids) > 1224
    cands0 = [candidates[0][0], " ".join([candidates[0][1]] * 100)]

    def n_tokens(text: str) -> int:
        return len(tokenizer(text).input_ids)

    def repeat_to(unit: str, tokens: int) -> str:
        return " ".join([unit] * (tokens // n_tokens(unit)))

    prompt1 = repeat_to(prompts[1], 600)
    limit = 412 + (1224 - n_tokens("<|source|>" + prompt1)) // 2
    unit = "Why is the sky blue? Because air scatters blue light more than red."
    cands1 = [repeat_to(unit, limit + 100), repeat_to(unit, (412 + limit) // 2)]
    assert n_tokens("<|candidate|>" + cands1[0]) > limit
    assert 412 < n_tokens("<|candidate|>" + cands1[1]) <= limit

    before = httpx.get(f"{pairrm_url}/metrics").text
    body = post(
        pairrm_url, "/v1/rank", {"items": rank_items([long_prompt, prompt1], [cands0, cands1])}
    )
    after = httpx.get(f"{pairrm_url}/metrics").text

    t0, t1 = body["results"][0]["truncated"], body["results"][1]["truncated"]
    assert t0 == {"prompt": True, "candidates": [False, True]}
    assert t1 == {"prompt": False, "candidates": [True, False]}
    # batch_size=1: llm-blender then applies the same per-item candidate limit as the service.
    for i, (p, c) in enumerate([(long_prompt, cands0), (prompt1, cands1)]):
        want = reference_blender.rank([p], [c], return_scores=True, batch_size=1)[0]
        np.testing.assert_allclose(body["results"][i]["scores"], want, rtol=0, atol=TOL)
    name = "pairloop_ranker_truncations_total"
    assert read_metric(after, name, part="prompt") - read_metric(before, name, part="prompt") == 1
    assert (
        read_metric(after, name, part="candidate") - read_metric(before, name, part="candidate")
        == 2
    )


def test_control_tokens_in_text_do_not_break_ranking(pairrm_url: str) -> None:
    """Raw llm-blender crashes on a response containing its own <|candidate|> marker."""
    items = [
        {
            "prompt": "Explain <|source|> tags and [SEP] tokens.",
            "candidates": [
                "<|candidate|> is a marker.",
                "Markers like <|candidate1|> [SEP] exist.",
            ],
        }
    ]
    body = post(pairrm_url, "/v1/rank", {"items": items})
    assert len(body["results"][0]["scores"]) == 2


def test_full_mode_win_probabilities_equal_blender_pairwise_logits(
    pairrm_url: str, reference_blender: Any, items_factory: Any
) -> None:
    """win_probs[i] = mean over j != i of sigmoid(logit(i beats j)), both orders averaged, with
    the logits taken from llm-blender's own `compare(..., return_logits=True)`."""
    prompts, candidates = items_factory(8, 3, 4)
    body = post(pairrm_url, "/v1/rank", {"items": rank_items(prompts, candidates)})

    for prompt, cands, result in zip(prompts, candidates, body["results"], strict=True):
        n = len(cands)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        # llm-blender's "[A,B]+[B,A]" mode returns L(a, b) - L(b, a): twice the averaged log-odds.
        both = reference_blender.compare(
            [prompt] * len(pairs),
            [cands[i] for i, _ in pairs],
            [cands[j] for _, j in pairs],
            return_logits=True,
        )
        p_win = np.zeros((n, n))
        for (i, j), value in zip(pairs, both, strict=True):
            p_win[i, j] = 1.0 / (1.0 + math.exp(-float(value) / 2.0))
        expected = [sum(p_win[i, j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
        np.testing.assert_allclose(result["win_probs"], expected, rtol=0, atol=TOL)
        # Informative: the candidates' probabilities differ, and they average to one half.
        assert max(expected) - min(expected) > 0.01
        assert sum(result["win_probs"]) / n == pytest.approx(0.5, abs=TOL)
