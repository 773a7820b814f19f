"""logprobs as OpenAI defines them, through the official `openai` client, equal to transformers'
log-softmax of the same float32 weights (the raw model distribution, before temperature):
completions (`logprobs: int`), chat (`logprobs: true` + `top_logprobs: k`), and both streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
K = 3
NEW = 8
TOL = 1e-3


@pytest.fixture(scope="module")
def client(generator: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{generator.base_url}/v1", api_key="not-checked", max_retries=0)


def reference(hf: Any, model_dir: Path, prompt_ids: list[int]) -> tuple[list[int], Any]:
    """Greedy continuation ids and the log-softmax at each of its positions, from transformers."""
    import torch

    hf.greedy(model_dir, prompt_ids, max_new=NEW)  # loads and caches the float32 model
    model = hf._models[model_dir]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW, do_sample=False)
        new = out[0, len(prompt_ids) :].tolist()
        logits = model(out[:, :-1]).logits[0, len(prompt_ids) - 1 :].float()
    return new, torch.log_softmax(logits, dim=-1)


def check(
    values: list[float],
    tops: list[list[float]],
    new: list[int],
    lsm: Any,
    *,
    by_text: Any = None,
) -> None:
    """`by_text`: a tokenizer when alternatives are keyed by text (the completions format): two
    of the top K that decode to the same text are one entry, holding the likelier value."""
    import torch

    assert len(values) == len(new) > 0
    for i, token_id in enumerate(new):
        assert abs(values[i] - float(lsm[i, token_id])) < TOL, (i, values[i])
        top = torch.topk(lsm[i], K)
        want = top.values.tolist()
        if by_text is not None:
            texts = [by_text.decode([t]) for t in top.indices.tolist()]
            want = [v for j, v in enumerate(want) if texts[j] not in texts[:j]]
        assert len(tops[i]) == len(want)
        assert (
            max(abs(a - b) for a, b in zip(sorted(tops[i], reverse=True), want, strict=True)) < TOL
        )
        # Greedy: the sampled token is the most likely one.
        assert abs(max(tops[i]) - values[i]) < TOL


def test_completion_logprobs_equal_transformers(
    client: openai.OpenAI, generator: Any, hf: Any
) -> None:
    prompt = "The sea is blue because"
    resp = client.completions.create(
        model="tiny-llama", prompt=prompt, temperature=0, max_tokens=NEW, logprobs=K
    )
    model_dir = generator.versions[resp.model_extra["weight_version"]]
    new, lsm = reference(hf, model_dir, list(hf.tokenizer(model_dir)(prompt)["input_ids"]))
    lp = resp.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.text_offset) == len(new)
    check(
        lp.token_logprobs,
        [list(t.values()) for t in lp.top_logprobs],
        new,
        lsm,
        by_text=hf.tokenizer(model_dir),
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    streamed = client.completions.create(
        model="tiny-llama", prompt=prompt, temperature=0, max_tokens=NEW, logprobs=K, stream=True
    )
    values: list[float] = []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs:
            values += chunk.choices[0].logprobs.token_logprobs
    assert values == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_chat_logprobs_and_top_logprobs_equal_transformers(
    client: openai.OpenAI, generator: Any, hf: Any
) -> None:
    resp = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        temperature=0,
        max_tokens=NEW,
        logprobs=True,
        top_logprobs=K,
    )
    model_dir = generator.versions[resp.model_extra["weight_version"]]
    new, lsm = reference(hf, model_dir, hf.chat_ids(model_dir, CHAT))
    content = resp.choices[0].logprobs.content
    check(
        [c.logprob for c in content],
        [[t.logprob for t in c.top_logprobs] for c in content],
        new,
        lsm,
    )
    assert all(c.bytes == list(c.token.encode()) for c in content)

    streamed = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        temperature=0,
        max_tokens=NEW,
        logprobs=True,
        top_logprobs=K,
        stream=True,
    )
    values = [
        c.logprob
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content or []
    ]
    assert values == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_no_logprobs_unless_asked_and_top_logprobs_needs_logprobs(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, temperature=0, max_tokens=2
    )
    assert plain.choices[0].logprobs is None
    only = client.chat.completions.create(
        model="tiny-llama", messages=CHAT, temperature=0, max_tokens=2, logprobs=True
    )
    assert all(c.top_logprobs == [] for c in only.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-llama", messages=CHAT, max_tokens=2, top_logprobs=2
        )
    assert "top_logprobs needs logprobs" in str(err.value)


def test_sampled_completion_logprobs_always_hold_the_sampled_token(
    client: openai.OpenAI,
) -> None:
    """At a high temperature the sampled token is often outside the top `logprobs`: OpenAI's
    completions format still lists it among the alternatives (up to logprobs + 1 entries)."""
    resp = client.completions.create(
        model="tiny-llama",
        prompt="The sea is blue because",
        temperature=2.0,
        max_tokens=24,
        logprobs=1,
        seed=7,
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.top_logprobs) > 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2
        assert top[token] == pytest.approx(value, abs=1e-6)
        assert max(top.values()) >= value - 1e-6  # the other entry, if any, is the top-1
    # The case this is about happened: a sampled token that was not the most likely one.
    assert any(len(top) == 2 for top in lp.top_logprobs)
