"""What every service's `GET /health` says about the process that answers it.

A launcher that starts a service (the local stack, the tests) gives it a fresh nonce in its
settings (`--instance-id`, or `PAIRLOOP_<SERVICE>_INSTANCE_ID`); `/health` echoes that nonce and
the process id. A 200 from a port is then known to come from the child just started, and not from
an orphan of an earlier run or another user's stack that holds the same port.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

__all__ = ["HealthIdentity", "health_identity"]


class HealthIdentity(BaseModel):
    """The answering process: its pid and the nonce its launcher gave it (None: none given)."""

    pid: int = Field(description="process id of the server")
    instance: str | None = Field(
        None, description="the nonce the launcher passed at start (instance_id), echoed back"
    )


def health_identity(instance: str | None) -> dict[str, int | str | None]:
    """The identity fields a `/health` body carries for this process."""
    return HealthIdentity(pid=os.getpid(), instance=instance).model_dump()
