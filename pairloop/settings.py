"""Settings shared by every part, and the one way a service turns flags + environment into settings.

Each service owns one `BaseSettings` subclass with its own env prefix (`PAIRLOOP_GENERATOR_`,
`PAIRLOOP_RANKER_`, `PAIRLOOP_TRAINER_`, `PAIRLOOP_ORCHESTRATOR_`); `PAIRLOOP_REDIS_URL` (and
`PAIRLOOP_REDIS_PASSWORD`) is shared by everything that talks to Redis. Nothing else in the code
base reads the environment.

Secrets (tokens, the Redis password) may also come as files named like their variable in
`/run/secrets` (`SECRETS_DIR`), where docker compose mounts its `secrets:`: e.g. the file
`/run/secrets/PAIRLOOP_GENERATOR_ADMIN_TOKEN`. An environment variable of the same name wins.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pydantic
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from pairloop.validation import describe_validation_error

__all__ = [
    "SECRETS_DIR",
    "RedisSettings",
    "load_settings",
    "redis_url_for",
    "secrets_dir",
    "service_config",
]

S = TypeVar("S", bound=BaseSettings)

# Where docker compose mounts a service's `secrets:` (file name = the variable's name).
SECRETS_DIR = Path("/run/secrets")


def secrets_dir() -> Path | None:
    """SECRETS_DIR where it exists (in a container given secrets), else None: pydantic-settings
    warns about a missing secrets directory on every settings load."""
    return SECRETS_DIR if SECRETS_DIR.is_dir() else None


def service_config(env_prefix: str, prog: str) -> SettingsConfigDict:
    """The settings config every service uses: env prefix, kebab-case flags, `--x/--no-x` booleans."""
    return SettingsConfigDict(
        env_prefix=env_prefix,
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        extra="ignore",
        secrets_dir=secrets_dir(),
    )


class RedisSettings(BaseSettings):
    """Where the Celery broker and result backend live (`PAIRLOOP_REDIS_URL`)."""

    model_config = SettingsConfigDict(
        env_prefix="PAIRLOOP_", extra="ignore", secrets_dir=secrets_dir()
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL for the Celery broker and results"
    )
    redis_password: SecretStr | None = Field(
        None,
        description="Redis's password (requirepass), put into redis_url where that URL has none; "
        "for the compose secret /run/secrets/PAIRLOOP_REDIS_PASSWORD",
    )

    @model_validator(mode="after")
    def _password_into_url(self) -> RedisSettings:
        if self.redis_password is None or not self.redis_password.get_secret_value():
            return self
        parts = urlsplit(self.redis_url)
        if parts.password is not None:
            return self  # a URL that names its own password keeps it
        user = quote(parts.username or "", safe="")
        secret = quote(self.redis_password.get_secret_value(), safe="")
        netloc = f"{user}:{secret}@{parts.netloc.rpartition('@')[2]}"
        self.redis_url = urlunsplit(parts._replace(netloc=netloc))
        return self


def redis_url_for(url: str | None = None) -> str:
    """`url` (default: PAIRLOOP_REDIS_URL) with PAIRLOOP_REDIS_PASSWORD in it where it names none:
    a run config's `services.redis_url` names the host, the deployment holds the password."""
    settings = RedisSettings() if not url else RedisSettings(redis_url=url)
    return settings.redis_url


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
