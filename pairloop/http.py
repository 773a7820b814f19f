"""FastAPI plumbing shared by every pairloop app: error handlers, body-size cap, health routes.

Each app calls `register_exception_handlers(app)` once; routes then raise `pairloop.errors` types
and never build error bodies themselves.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pairloop.errors import (
    EngineDeadError,
    ErrorBody,
    ErrorResponse,
    PairloopError,
    ServiceUnavailableError,
)
from pairloop.validation import field_errors

__all__ = [
    "MaxBodySizeMiddleware",
    "error_json",
    "error_responses",
    "register_exception_handlers",
]

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "payload_too_large",
    415: "invalid_request_error",
}


def error_json(
    status_code: int, message: str, *, param: str | None = None, error_type: str | None = None
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(
            message=message,
            type=error_type or _STATUS_TYPES.get(status_code, "server_error"),
            param=param,
            code=status_code,
        )
    )
    return JSONResponse(body.model_dump(), status_code=status_code)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON: " + str(err.get("msg", "")), None
    problems = field_errors(errors, root="body", drop_prefix=("body",))
    message = "invalid request: " + "; ".join(f"{p.where}: {p.message}" for p in problems)
    return message, problems[0].where if problems else None


def register_exception_handlers(app: FastAPI) -> None:
    """Map typed errors, validation errors and stray HTTP errors to the one JSON error shape."""

    @app.exception_handler(PairloopError)
    async def _pairloop_error(_: Request, exc: PairloopError) -> JSONResponse:
        if isinstance(exc, ServiceUnavailableError) and not isinstance(exc, EngineDeadError):
            # Expected while a model loads or weights swap (/ready polled ten times a second):
            # the caller retries; an ERROR line per poll would bury the real errors.
            log.debug("%s: %s", type(exc).__name__, exc.message)
        elif exc.status_code >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse(
            exc.to_response().model_dump(), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # 400, not FastAPI's 422: OpenAI's API (and vLLM's) answer 400 to a malformed request.
        message, param = _describe_validation(exc)
        return error_json(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_json(exc.status_code, str(exc.detail))


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: document its error codes with the shared error model."""
    return {code: {"model": ErrorResponse} for code in codes}


class MaxBodySizeMiddleware:
    """Refuse request bodies over `max_bytes` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_json(
            413, f"request body is larger than {self.max_bytes} bytes; send fewer or smaller items"
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
