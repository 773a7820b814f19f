"""Bearer-token authentication for admin routes (weight swaps, run control)."""

from __future__ import annotations

import secrets

from pairloop.errors import AuthenticationError, ForbiddenError

__all__ = ["check_bearer"]


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
