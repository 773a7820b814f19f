"""Server-sent events in OpenAI's streaming format, and a response that always gives its lease back.

OpenAI streams are `data: <json>\\n\\n` events ending with `data: [DONE]\\n\\n`; the official client
parses exactly that. A stream holds a swap-gate lease from before its headers (they carry the
version) to its last byte, so the lease must be released even when the client disconnects before
the body starts: `LeasedStreamingResponse` releases it when the response ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pairloop.errors import PairloopError, ServerError

__all__ = ["LeasedStreamingResponse", "sse_done", "sse_error", "sse_event"]

log = logging.getLogger(__name__)


def sse_event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=False)}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


def sse_error(exc: Exception) -> str:
    """An error after the headers went out can only travel in the stream (as vLLM does it)."""
    err = exc if isinstance(exc, PairloopError) else ServerError(f"generation failed: {exc}")
    return f"data: {json.dumps(err.to_response().model_dump())}\n\n"


async def guarded(events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """Turn a failure half-way through a stream into an error event and a clean end."""
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
    except Exception as exc:  # the status line is already sent: report in-band
        log.warning("stream failed: %s", exc)
        yield sse_error(exc)
        yield sse_done()


class LeasedStreamingResponse(StreamingResponse):
    """A text/event-stream response that calls `release()` once, when it is over for any reason."""

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        *,
        release: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        self._events = guarded(events)
        self._release = release
        super().__init__(
            self._events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Closing the generator cancels its engine requests (vLLM aborts them on close).
            await self._events.aclose()
            self._release()
