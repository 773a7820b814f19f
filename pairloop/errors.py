"""The error tree every pairloop part raises, and its one JSON shape on the wire.

Services raise these; one handler per app (`pairloop.http.register_exception_handlers`) maps them to
HTTP, and the typed clients map HTTP back to them. The shape is OpenAI's error object, so the
official `openai` client shows our messages as they are:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": 400}}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = [
    "AuthenticationError",
    "BadGatewayError",
    "ClientError",
    "ConflictError",
    "EngineDeadError",
    "EngineReleasedError",
    "ErrorBody",
    "ErrorResponse",
    "ForbiddenError",
    "NotFoundError",
    "PairloopError",
    "PayloadTooLargeError",
    "ServerError",
    "ServiceUnavailableError",
    "ValidationError",
    "error_from_response",
]


class ErrorBody(BaseModel):
    """What went wrong, for a person: `message` says what to fix, `param` names the bad field."""

    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The single JSON error shape of every pairloop HTTP API."""

    error: ErrorBody


class PairloopError(Exception):
    """Base of every error pairloop raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Seconds after which a retry may succeed: sent as the Retry-After header.
        self.retry_after = retry_after

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(
                message=self.message, type=self.error_type, param=self.param, code=self.status_code
            )
        )


class ClientError(PairloopError):
    """The request cannot be served as sent; retrying it unchanged will not help."""

    status_code = 400
    error_type = "invalid_request_error"


class ValidationError(ClientError):
    """A field of the request is invalid; `param` names it."""


class AuthenticationError(ClientError):
    status_code = 401
    error_type = "authentication_error"


class ForbiddenError(ClientError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(ClientError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(ClientError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(ClientError):
    status_code = 413
    error_type = "payload_too_large"


class ServerError(PairloopError):
    """Our fault: worth a retry, worth a bug report if it persists."""


class BadGatewayError(ServerError):
    """A service this one depends on failed or answered outside its contract."""

    status_code = 502
    error_type = "bad_gateway"


class ServiceUnavailableError(ServerError):
    """Not ready yet, or busy: retry later (after `retry_after` seconds, when it is known)."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, param=param)
        # Sent as the Retry-After header: clients and load balancers back off that long.
        self.retry_after = retry_after


class EngineDeadError(ServiceUnavailableError):
    """The model engine died; the process must be restarted."""

    error_type = "engine_dead"


class EngineReleasedError(ServiceUnavailableError):
    """The engine gave its accelerator memory back (time-shared placement); it serves again
    after `POST /admin/wake`."""

    error_type = "engine_released"


_BY_STATUS: dict[int, type[PairloopError]] = {
    400: ClientError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    502: BadGatewayError,
    503: ServiceUnavailableError,
}


def error_from_response(status_code: int, body: Any) -> PairloopError:
    """Rebuild the typed error from an HTTP status and (possibly non-JSON) body, for clients."""
    message, param = f"HTTP {status_code}", None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", message))
        param = body["error"].get("param")
    elif isinstance(body, str) and body:
        message = f"HTTP {status_code}: {body[:500]}"
    fallback = ClientError if 400 <= status_code < 500 else ServerError
    cls = _BY_STATUS.get(status_code, fallback)
    err = cls(message, param=param)
    err.status_code = status_code
    return err
