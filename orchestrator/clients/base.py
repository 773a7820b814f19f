"""What every HTTP service client shares: one `httpx.AsyncClient`, typed errors, retries.

Retries (tenacity, exponential backoff with jitter) cover connection errors, timeouts and 5xx
answers only: a 4xx means the request itself is wrong, and sending it again cannot help. The time
spent inside calls is accumulated in `service_seconds`, which the orchestrator records per stage
(its overhead is the rest).
"""

from __future__ import annotations

import os
import time
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from pairloop.errors import PairloopError, ServerError, error_from_response

__all__ = ["ServiceClient", "ServiceUnreachableError"]

M = TypeVar("M", bound=BaseModel)


class ServiceUnreachableError(ServerError):
    """A service did not answer (or kept answering 5xx) through every retry."""


def describe_error(exc: BaseException | None) -> str:
    """`Type: message`, with the OS's reason for a failed connect (httpx's own message is vague:
    "All connection attempts failed" for a refused connection)."""
    if exc is None:
        return "no answer"
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None and not (isinstance(cause, OSError) and cause.errno):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.errno:
            text = f"{type(exc).__name__}: {os.strerror(cause.errno)}"
    return text


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, PairloopError) and exc.status_code >= 500


class ServiceClient:
    """Base of the typed clients. `transport` is injectable (tests, custom TLS, proxies)."""

    service = "service"

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        retries: int = 5,
        backoff_max: float = 10.0,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_max = backoff_max
        self.service_seconds = 0.0
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers=headers,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send_once(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> httpx.Response:
        start = time.perf_counter()
        try:
            resp = await self._http.request(method, path, json=body, headers=headers)
        finally:
            self.service_seconds += time.perf_counter() - start
        if resp.status_code >= 400:
            try:
                payload: Any = resp.json()
            except ValueError:
                payload = resp.text
            raise error_from_response(resp.status_code, payload)
        return resp

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send with retries; raise the typed error of the last answer, or ServiceUnreachableError."""
        payload = (
            body.model_dump(mode="json", exclude_none=True) if isinstance(body, BaseModel) else body
        )
        attempts = self.retries + 1 if retry else 1
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(attempts),
                wait=wait_exponential_jitter(initial=0.2, max=self.backoff_max),
                retry=retry_if_exception(_retryable),
                reraise=False,
            ):
                with attempt:
                    return await self._send_once(method, path, payload, headers)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            times = "time" if attempts == 1 else "times"
            raise ServiceUnreachableError(
                f"{self.service} at {self.base_url} failed {attempts} {times} on {method} {path}: "
                f"{describe_error(last)}"
            ) from last
        raise AssertionError(
            "unreachable"
        )  # pragma: no cover - AsyncRetrying always returns/raises

    async def call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        body: BaseModel | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = True,
    ) -> M:
        resp = await self.request(method, path, body=body, headers=headers, retry=retry)
        return model.model_validate(resp.json())

    async def ready(self) -> bool:
        """True when the service's /ready answers 200 (no retries)."""
        try:
            resp = await self._http.get("/ready")
        except httpx.TransportError:
            return False
        return resp.status_code == 200
