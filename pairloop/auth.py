"""Bearer-token authentication for admin routes (weight swaps, run control)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Request

from pairloop.errors import AuthenticationError, ForbiddenError

__all__ = ["bearer_token_guard", "check_bearer"]


def check_bearer(authorization: str | None, expected: str) -> None:
    """Raise 401 when no bearer token is sent, 403 when it is not `expected`."""
    if not authorization:
        raise AuthenticationError(
            "admin route: send 'Authorization: Bearer <admin token>'", param="Authorization"
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "admin route: the Authorization header must be 'Bearer <admin token>'",
            param="Authorization",
        )
    # Constant-time comparison: the token is the only thing between a caller and the weights.
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise ForbiddenError("admin token is not valid", param="Authorization")


def bearer_token_guard(get_expected: Callable[[Request], str]) -> Callable[[Request], None]:
    """A FastAPI dependency that checks the request's bearer token against `get_expected(request)`."""

    def guard(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), get_expected(request))

    return guard
