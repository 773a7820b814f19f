"""The batch route answers per item: an over-long conversation gets an error entry naming it and
the limit it broke, its neighbours their answers (equal to transformers'), all in one 200.
Also: /v1/models says which dtype and context length are served."""

from __future__ import annotations

from typing import Any

import httpx

from pairloop.contracts.generator import BatchChatResponse

from .conftest import MAX_MODEL_LEN


def test_one_overlong_conversation_does_not_fail_the_batch(generator: Any, hf: Any) -> None:
    short = [{"role": "user", "content": "Why is the sky blue?"}]
    other = [{"role": "user", "content": "Name a painter."}]
    overlong = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 100)}]
    before = generator.metrics().get("pairloop_generator_batch_item_errors_total", 0.0)
    r = httpx.post(
        f"{generator.base_url}/v1/batch/chat",
        json={
            "conversations": [short, overlong, other],
            "ids": ["a", "too-long", "c"],
            "temperature": 0,
            "max_tokens": 10,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = BatchChatResponse.model_validate(r.json())
    a, bad, c = body.results
    assert bad.id == "too-long" and bad.outputs == []
    assert bad.error is not None
    assert "'too-long' ('word word" in bad.error, "names the id and the first characters"
    assert f"context of {MAX_MODEL_LEN} tokens" in bad.error, "and the limit it broke"
    model_dir = generator.versions[body.weight_version]
    for conv, res in ((short, a), (other, c)):
        assert res.error is None
        assert [hf.settled(o) for o in res.outputs] == [hf.greedy_chat(model_dir, conv, max_new=10)]
    after = generator.metrics()["pairloop_generator_batch_item_errors_total"]
    assert after - before == 1


def test_a_batch_of_only_bad_items_is_answered_too(generator: Any) -> None:
    overlong = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 100)}]
    r = httpx.post(
        f"{generator.base_url}/v1/batch/chat",
        json={"conversations": [overlong], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (res,) = BatchChatResponse.model_validate(r.json()).results
    assert res.id == "0" and res.error and "shorten it" in res.error


def test_request_wide_limits_stay_a_400(generator: Any) -> None:
    r = httpx.post(
        f"{generator.base_url}/v1/batch/chat",
        json={"conversations": [[{"role": "user", "content": "hi"}]], "n": 99},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_models_say_dtype_and_context(generator: Any) -> None:
    card = httpx.get(f"{generator.base_url}/v1/models", timeout=10).json()["data"][0]
    # The fixture asks for float32 and caps the model's 4096 at MAX_MODEL_LEN.
    assert card["dtype"] == "float32"
    assert card["max_model_len"] == MAX_MODEL_LEN
