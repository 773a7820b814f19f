"""Bad input gets a 4xx in the shared error shape with a message that says what to fix, never a 500.

The session server runs with small caps: 8 items, 6 candidates per item, 64 KiB bodies.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pairloop.errors import ErrorResponse

OK_ITEM = {"prompt": "Why is the sky blue?", "candidates": ["Rayleigh scattering.", "No idea."]}

CASES: list[tuple[str, str, Any, str, str | None]] = [
    # (name, route, body, words the message must contain, param)
    ("no items", "/v1/rank", {"items": []}, "at least 1 item", "items"),
    ("no candidates", "/v1/rank", {"items": [{"prompt": "p", "candidates": []}]},
     "at least 2 items", "items.0.candidates"),
    ("one candidate", "/v1/rank", {"items": [{"prompt": "p", "candidates": ["only"]}]},
     "at least 2 items", "items.0.candidates"),
    ("one candidate to select from", "/v1/select",
     {"items": [{"prompt": "p", "candidates": ["only"]}]}, "at least 2 items",
     "items.0.candidates"),
    ("too many candidates", "/v1/rank",
     {"items": [OK_ITEM, {"prompt": "p", "candidates": [f"c{i}" for i in range(7)]}]},
     "at most 6 per item", "items.1.candidates"),
    ("too many items", "/v1/rank", {"items": [OK_ITEM] * 9}, "at most 8", "items"),
    ("too many items to compare", "/v1/compare",
     {"items": [{"prompt": "p", "a": "x", "b": "y"}] * 9}, "at most 8", "items"),
    ("empty prompt", "/v1/rank", {"items": [{"prompt": "", "candidates": ["a", "b"]}]},
     "prompt must not be empty", "items.0.prompt"),
    ("blank candidate", "/v1/rank", {"items": [{"prompt": "p", "candidates": ["a", "  \n"]}]},
     "candidate 1 must not be empty", "items.0.candidates"),
    ("empty compare side", "/v1/compare", {"items": [{"prompt": "p", "a": "x", "b": ""}]},
     "must not be empty", "items.0.b"),
    ("number as candidate", "/v1/rank", {"items": [{"prompt": "p", "candidates": ["a", 2]}]},
     "valid string", "items.0.candidates.1"),
    ("null prompt", "/v1/select", {"items": [{"prompt": None, "candidates": ["a", "b"]}]},
     "valid string", "items.0.prompt"),
    ("object as prompt", "/v1/rank", {"items": [{"prompt": {"x": 1}, "candidates": ["a", "b"]}]},
     "valid string", "items.0.prompt"),
    ("items not a list", "/v1/rank", {"items": "abc"}, "valid list", "items"),
    ("body not an object", "/v1/rank", ["items"], "valid dictionary", "body"),
    ("unknown mode", "/v1/rank", {"items": [OK_ITEM], "mode": "quick"}, "'full' or 'bubble'",
     "mode"),
    ("unknown pick", "/v1/select", {"items": [OK_ITEM], "pick": "median"}, "'best' or 'worst'",
     "pick"),
    ("unknown field", "/v1/rank", {"items": [OK_ITEM], "top_k": 3}, "extra inputs", "top_k"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "body", "words", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_body_is_400_with_a_message(
    pairrm_url: str, route: str, body: Any, words: str, param: str | None
) -> None:
    r = httpx.post(f"{pairrm_url}{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = ErrorResponse.model_validate(r.json()).error
    assert words.lower() in error.message.lower(), error.message
    assert error.param == param
    assert error.type == "invalid_request_error"


def test_non_json_body_is_400(pairrm_url: str) -> None:
    r = httpx.post(
        f"{pairrm_url}/v1/rank",
        content=b'{"items": [ {"prompt": "p",',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


def test_oversize_body_is_413_before_parsing(pairrm_url: str) -> None:
    big = {"items": [{"prompt": "p", "candidates": ["x" * 40_000, "y" * 40_000]}]}
    r = httpx.post(f"{pairrm_url}/v1/rank", json=big)
    assert r.status_code == 413
    assert "larger than 65536 bytes" in r.json()["error"]["message"]


def test_wrong_method_and_route_use_the_error_shape(pairrm_url: str) -> None:
    for r in (httpx.get(f"{pairrm_url}/v1/rank"), httpx.post(f"{pairrm_url}/v1/nope", json={})):
        assert r.status_code in (404, 405)
        ErrorResponse.model_validate(r.json())


def test_failed_requests_are_counted_by_status(pairrm_url: str, read_metric: Any) -> None:
    before = httpx.get(f"{pairrm_url}/metrics").text
    httpx.post(f"{pairrm_url}/v1/compare", json={"items": []})
    httpx.post(f"{pairrm_url}/v1/select", json={"items": [OK_ITEM], "pad": "x" * 70_000})
    after = httpx.get(f"{pairrm_url}/metrics").text
    name = "pairloop_ranker_requests_total"
    for route, status in (("compare", "400"), ("select", "413")):
        labels = {"route": route, "status": status}
        assert read_metric(after, name, **labels) - read_metric(before, name, **labels) == 1
