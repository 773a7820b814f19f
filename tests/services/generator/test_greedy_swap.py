"""Greedy output equals transformers' for the served weights, before and after an in-place swap.

The prompt spans several KV cache blocks (vLLM's CPU block is 128 tokens) and is sent before the
swap, so the prefix cache holds it: if the swap left stale KV blocks behind, the answer after the
swap would not match transformers on the new weights.
"""

from __future__ import annotations

import httpx

from pairloop.contracts.generator import VERSION_HEADER, ChatCompletionResponse

CORPUS = (
    "Explain how a rainbow forms. Give three tips for learning to cook. Why is the sky blue? "
    "Summarise the plot of a detective story in two sentences. List the planets in order. "
)


def long_messages(min_tokens: int, hf, generator) -> list[dict[str, str]]:
    text = CORPUS
    messages = [{"role": "user", "content": text}]
    while len(hf.chat_ids(generator.seed_dirs[0], messages)) < min_tokens:
        text += CORPUS
        messages = [{"role": "user", "content": text}]
    return messages


def chat(generator, messages, **params) -> tuple[ChatCompletionResponse, httpx.Response]:
    r = httpx.post(
        f"{generator.base_url}/v1/chat/completions",
        json={"model": generator.model_name, "messages": messages, **params},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return ChatCompletionResponse.model_validate(r.json()), r


def test_greedy_equals_transformers_before_and_after_swap(generator, hf) -> None:
    messages = long_messages(3 * 128 + 20, hf, generator)
    params = {"temperature": 0, "max_tokens": 24}

    before, raw = chat(generator, messages, **params)
    assert raw.headers[VERSION_HEADER] == before.weight_version
    old_dir = generator.versions[before.weight_version]
    expected_old = hf.greedy_chat(old_dir, messages, max_new=24)
    assert hf.settled(before.choices[0].message.content) == expected_old
    assert before.usage.prompt_tokens > 3 * 128

    # Once more: now the answer comes through the prefix cache, and must not change.
    again, _ = chat(generator, messages, **params)
    assert hf.settled(again.choices[0].message.content) == expected_old

    new_dir = generator.other_dir()
    swap = generator.swap_to(new_dir)
    assert swap["previous_version"] == before.weight_version
    assert swap["seconds"] < 30

    after, raw = chat(generator, messages, **params)
    assert after.weight_version == swap["version"] == raw.headers[VERSION_HEADER]
    expected_new = hf.greedy_chat(new_dir, messages, max_new=24)
    assert hf.settled(after.choices[0].message.content) == expected_new
    # The two seeds really answer differently, so the equalities above prove the swap happened.
    assert expected_new != expected_old

    models = httpx.get(f"{generator.base_url}/v1/models", timeout=10).json()
    assert models["data"][0]["weight_version"] == swap["version"]


def test_completions_greedy_equals_transformers(generator, hf) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. A helpful assistant"
    r = httpx.post(
        f"{generator.base_url}/v1/completions",
        json={"prompt": [prompt, "Why is the sky blue?"], "temperature": 0, "max_tokens": 16},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    model_dir = generator.versions[body["weight_version"]]
    tok = hf.tokenizer(model_dir)
    for choice, text in zip(body["choices"], [prompt, "Why is the sky blue?"], strict=True):
        ids = list(tok(text)["input_ids"])
        assert hf.settled(choice["text"]) == hf.greedy(model_dir, ids, max_new=16)
    assert [c["index"] for c in body["choices"]] == [0, 1]
