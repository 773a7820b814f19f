"""Settings shared by every part, and the one way a service turns flags + environment into settings.

Each service owns one `BaseSettings` subclass with its own env prefix (`PAIRLOOP_GENERATOR_`,
`PAIRLOOP_RANKER_`, `PAIRLOOP_TRAINER_`, `PAIRLOOP_ORCHESTRATOR_`); `PAIRLOOP_REDIS_URL` is shared by
everything that talks to Redis. Nothing else in the code base reads the environment.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeVar

import pydantic
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from pairloop.validation import describe_validation_error

__all__ = ["RedisSettings", "load_settings", "service_config"]

S = TypeVar("S", bound=BaseSettings)


def service_config(env_prefix: str, prog: str) -> SettingsConfigDict:
    """The settings config every service uses: env prefix, kebab-case flags, `--x/--no-x` booleans."""
    return SettingsConfigDict(
        env_prefix=env_prefix,
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        extra="ignore",
    )


class RedisSettings(BaseSettings):
    """Where the Celery broker and result backend live (`PAIRLOOP_REDIS_URL`)."""

    model_config = SettingsConfigDict(env_prefix="PAIRLOOP_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL for the Celery broker and results"
    )


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Parse `argv` (flags win over environment variables, which win over defaults).

    A bad value prints which flag is wrong and exits with status 2 instead of a traceback.
    """
    try:
        return CliApp.run(cls, cli_args=list(sys.argv[1:] if argv is None else argv))
    except pydantic.ValidationError as exc:
        message = describe_validation_error(
            exc, title="invalid settings", naming="flag", root="(root)"
        )
        print(message, file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
