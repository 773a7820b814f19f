"""Secrets the local stack generates (the generator's admin token), kept where resume finds them.

    RUN_DIR/local/secrets.json      {"generator_admin_token": "..."}   mode 0600

Never in `config.yaml` or the manifest, which are meant to be read, shared and committed. The
token is made once per run, so a resumed run's new generator accepts the same token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path

__all__ = ["SECRETS_FILE", "load_or_create_admin_token"]

SECRETS_FILE = "secrets.json"


def load_or_create_admin_token(local_dir: Path) -> str:
    """The run's admin token: read from `local_dir/secrets.json`, or created there (0600)."""
    path = local_dir / SECRETS_FILE
    if path.is_file():
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)  # someone loosened it: owner-only again before reading
        token = json.loads(path.read_text()).get("generator_admin_token")
        if isinstance(token, str) and token:
            return token
    local_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{SECRETS_FILE}.{os.getpid()}.tmp")
    # Created 0600 from the first byte (no window in which the umask's mode applies).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"generator_admin_token": token}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return token
