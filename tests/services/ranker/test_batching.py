"""Dynamic batching: concurrent requests share forward passes (seen in /metrics) and each still
gets its own answer; the planner sorts by length and respects its caps."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np

from services.ranker.batching import plan_batches


def test_plan_batches_sorts_by_length_and_caps_rows_and_tokens() -> None:
    lengths = [50, 10, 300, 12, 48, 11, 290, 51]
    plan = plan_batches(lengths, max_rows=3, max_tokens=590)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert [[lengths[i] for i in batch] for batch in plan] == [
        [10, 11, 12],
        [48, 50, 51],
        [290],  # 2 x 300 padded tokens would exceed 590
        [300],
    ]


def test_plan_batches_runs_an_overlong_sequence_alone() -> None:
    assert plan_batches([5, 5000, 6], max_rows=8, max_tokens=100) == [[0, 2], [1]]


async def test_concurrent_requests_share_batches_and_get_their_own_answers(
    pairrm_url: str, reference_blender: Any, items_factory: Any, read_metric: Any
) -> None:
    prompts, candidates = items_factory(11, 8, 3)
    expected = reference_blender.rank(prompts, candidates, return_scores=True)

    async with httpx.AsyncClient(base_url=pairrm_url, timeout=60) as client:
        before = (await client.get("/metrics")).text
        responses = await asyncio.gather(
            *(
                client.post("/v1/rank", json={"items": [{"prompt": p, "candidates": c}]})
                for p, c in zip(prompts, candidates, strict=True)
            )
        )
        after = (await client.get("/metrics")).text

    for response, want in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["results"][0]["scores"], want, atol=1e-5)

    def delta(name: str, **labels: str) -> float:
        return read_metric(after, name, **labels) - read_metric(before, name, **labels)

    passes = delta("pairloop_ranker_batch_requests_count")
    single_request_passes = delta("pairloop_ranker_batch_requests_bucket", le="1.0")
    assert delta("pairloop_ranker_comparisons_total") == 8 * 3 * 2
    assert passes < 8, "8 requests of 6 comparisons each should not need 8 forward passes"
    assert single_request_passes < passes, "no forward pass mixed work of several requests"
    assert delta("pairloop_ranker_requests_total", route="rank", status="200") == 8
