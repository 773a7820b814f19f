"""The official `openai` client against the service: chat, completions, streaming, n/seed/stop.

Plus the batch route the orchestrator uses, checked against transformers like everything else.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from pairloop.contracts.generator import BatchChatResponse

CHAT = [{"role": "user", "content": "Give three tips for learning to cook."}]


@pytest.fixture(scope="module")
def client(generator) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{generator.base_url}/v1", api_key="not-checked", max_retries=0)


def expected_chat(generator, hf, version: str, messages, max_new: int) -> str:
    return hf.greedy_chat(generator.versions[version], messages, max_new=max_new)


def test_models_list(client: openai.OpenAI, generator) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    assert models[0].model_extra["weight_version"] == generator.current_version()


def test_chat_completion(client: openai.OpenAI, generator, hf) -> None:
    resp = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, temperature=0, max_tokens=20
    )
    version = resp.model_extra["weight_version"]
    assert hf.settled(resp.choices[0].message.content) == expected_chat(
        generator, hf, version, CHAT, 20
    )
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.completion_tokens <= 20 and resp.usage.prompt_tokens > 5


def test_chat_stream_equals_non_stream(client: openai.OpenAI, generator, hf) -> None:
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    versions = {c.model_extra["weight_version"] for c in chunks}
    assert len(versions) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert hf.settled(text) == expected_chat(generator, hf, versions.pop(), CHAT, 20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 20


def test_completion_and_its_stream(client: openai.OpenAI, generator, hf) -> None:
    prompt = "The quick brown fox"
    resp = client.completions.create(
        model="tiny-llama", prompt=prompt, temperature=0, max_tokens=16
    )
    model_dir = generator.versions[resp.model_extra["weight_version"]]
    ids = list(hf.tokenizer(model_dir)(prompt)["input_ids"])
    assert hf.settled(resp.choices[0].text) == hf.greedy(model_dir, ids, max_new=16)
    streamed = client.completions.create(
        model="tiny-llama", prompt=prompt, temperature=0, max_tokens=16, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == resp.choices[0].text


def test_n_and_seed(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        resp = client.chat.completions.create(
            model="tiny-llama", messages=CHAT, temperature=1.0, max_tokens=12, n=3, seed=seed
        )
        assert [c.index for c in resp.choices] == [0, 1, 2]
        return [c.message.content for c in resp.choices]

    first = sample(7)
    assert sample(7) == first, "same seed, same samples"
    assert len(set(first)) > 1, "n samples differ from each other"
    assert sample(8) != first, "another seed, other samples"


def test_stop_string_is_honoured(client: openai.OpenAI, generator, hf) -> None:
    full = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, temperature=0, max_tokens=30
    )
    text = full.choices[0].message.content
    # A stop string from the middle of the greedy answer (avoiding partial-UTF-8 replacement chars).
    start = next(i for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    cut = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, temperature=0, max_tokens=30, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_client_sees_our_error_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=CHAT, n=99)
    assert "limit" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)


def test_batch_route_matches_transformers(generator, hf) -> None:
    conversations = [
        [{"role": "user", "content": "Why is the sky blue?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a painter."},
        ],
        CHAT,
    ]
    r = httpx.post(
        f"{generator.base_url}/v1/batch/chat",
        json={"conversations": conversations, "ids": ["a", "b", "c"], "temperature": 0,
              "max_tokens": 14},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = BatchChatResponse.model_validate(r.json())
    assert r.headers["X-Model-Version"] == body.weight_version
    assert [res.id for res in body.results] == ["a", "b", "c"]
    for conv, res in zip(conversations, body.results, strict=True):
        assert [hf.settled(o) for o in res.outputs] == [
            expected_chat(generator, hf, body.weight_version, conv, 14)
        ]
        assert res.completion_tokens[0] <= 14 and res.prompt_tokens > 5
