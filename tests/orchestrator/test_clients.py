"""The typed service clients' retry policy: connection errors and 5xx are retried, 4xx never."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.clients import RankerClient, ServiceUnreachableError
from pairloop.contracts.ranker import RankItem, RankRequest
from pairloop.errors import ClientError
from pairloop_local.processes import free_port

REQUEST = RankRequest(items=[RankItem(prompt="q", candidates=["a", "b"])])
OK = {
    "model": "m",
    "backend": "scorer",
    "mode": "full",
    "results": [
        {"scores": [1.0, 0.0], "ranks": [1, 2], "best_index": 0, "worst_index": 1, "truncated": {}}
    ],
}


def client_with(responses: list[httpx.Response], calls: list[httpx.Request]) -> RankerClient:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return responses[min(len(calls), len(responses)) - 1]

    return RankerClient(
        "http://ranker", retries=3, backoff_max=0.01, transport=httpx.MockTransport(handler)
    )


async def test_5xx_is_retried_until_success() -> None:
    calls: list[httpx.Request] = []
    busy = httpx.Response(503, json={"error": {"message": "loading", "type": "x", "code": 503}})
    client = client_with([busy, busy, httpx.Response(200, json=OK)], calls)
    reply = await client.rank(REQUEST)
    assert reply.results[0].best_index == 0 and len(calls) == 3
    assert client.service_seconds > 0


async def test_4xx_is_not_retried_and_keeps_the_servers_message() -> None:
    calls: list[httpx.Request] = []
    bad = httpx.Response(
        400,
        json={
            "error": {
                "message": "candidate 1 must not be empty",
                "type": "invalid_request_error",
                "param": "items",
                "code": 400,
            }
        },
    )
    client = client_with([bad], calls)
    with pytest.raises(ClientError, match="candidate 1 must not be empty") as info:
        await client.rank(REQUEST)
    assert len(calls) == 1 and info.value.status_code == 400


async def test_unreachable_service_fails_after_retries_with_a_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = RankerClient(url, retries=2, backoff_max=0.01)
    with pytest.raises(
        ServiceUnreachableError, match=f"ranker at {url} failed 3 times on POST /v1/rank"
    ):
        await client.rank(REQUEST)
    await client.aclose()
