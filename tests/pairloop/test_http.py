"""The shared FastAPI plumbing: one JSON error shape for typed, validation and routing errors."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from pairloop.errors import ConflictError, ErrorResponse, error_from_response
from pairloop.http import MaxBodySizeMiddleware, register_exception_handlers


class Body(BaseModel):
    n: int = Field(ge=1)


def make_app() -> FastAPI:
    app = FastAPI()
    register_exception_handlers(app)
    app.add_middleware(MaxBodySizeMiddleware, max_bytes=100)

    @app.post("/echo")
    async def echo(body: Body) -> Body:
        if body.n == 7:
            raise ConflictError("seven is taken", param="n")
        return body

    return app


@pytest.fixture()
async def client():
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_typed_error(client: httpx.AsyncClient) -> None:
    r = await client.post("/echo", json={"n": 7})
    assert r.status_code == 409
    body = ErrorResponse.model_validate(r.json())
    assert body.error.param == "n" and "seven" in body.error.message
    err = error_from_response(r.status_code, r.json())
    assert isinstance(err, ConflictError) and err.param == "n"


async def test_validation_error_is_400_naming_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/echo", json={"n": 0})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"


async def test_non_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/echo", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


async def test_unknown_route_has_same_shape(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404
    ErrorResponse.model_validate(r.json())


async def test_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/echo",
        content=b'{"n": 1' + b" " * 200 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert "larger than 100 bytes" in r.json()["error"]["message"]


async def test_expected_503_is_logged_at_debug_a_dead_engine_at_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pairloop.errors import EngineDeadError, ServiceUnavailableError

    app = FastAPI()
    register_exception_handlers(app)

    @app.get("/ready")
    async def ready() -> None:
        raise ServiceUnavailableError("the engine is still loading")

    @app.get("/dead")
    async def dead() -> None:
        raise EngineDeadError("the engine died")

    caplog.set_level("DEBUG", logger="pairloop.http")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/ready")).status_code == 503
        loading = [r for r in caplog.records if "still loading" in r.getMessage()]
        assert [r.levelname for r in loading] == ["DEBUG"]
        assert (await c.get("/dead")).status_code == 503
    died = [r for r in caplog.records if "engine died" in r.getMessage()]
    assert [r.levelname for r in died] == ["ERROR"]
