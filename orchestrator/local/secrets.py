"""Secrets the local stack generates, kept where resume finds them.

    RUN_DIR/local/secrets.json      {"generator_admin_token": "...", "redis_password": "..."}  0600

Never in `config.yaml` or the manifest, which are meant to be read, shared and committed, and never
printed. Each secret is made once per run, so a resumed run's new generator accepts the same token
and its private Redis (whose data persists in RUN_DIR/local/redis) the same password.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path

__all__ = ["SECRETS_FILE", "load_or_create_admin_token", "load_or_create_secret"]

SECRETS_FILE = "secrets.json"


def _read(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)  # someone loosened it: owner-only again before reading
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def load_or_create_secret(local_dir: Path, key: str) -> str:
    """The run's secret `key`: read from `local_dir/secrets.json`, or created there (0600)."""
    path = local_dir / SECRETS_FILE
    data = _read(path)
    value = data.get(key)
    if isinstance(value, str) and value:
        return value
    local_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    data[key] = value
    tmp = path.with_name(f".{SECRETS_FILE}.{os.getpid()}.tmp")
    # Created 0600 from the first byte (no window in which the umask's mode applies).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return value


def load_or_create_admin_token(local_dir: Path) -> str:
    """The run's generator admin token (see `load_or_create_secret`)."""
    return load_or_create_secret(local_dir, "generator_admin_token")
