"""Redacting secrets from URLs before they are printed, logged or stored.

    redact_url("redis://:s3cret@127.0.0.1:6379/0")   # 'redis://:***@127.0.0.1:6379/0'
    redact_text("cannot reach redis://u:pw@h:1/0")   # 'cannot reach redis://u:***@h:1/0'

A Redis URL carries its password in the userinfo part (`redis://[user]:password@host`), and such
URLs end up in consoles, `stack.json`, manifests and error messages. Only the password goes: the
user, host, port and database stay, so the message still says which server was meant.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact_text", "redact_url"]

REDACTED = "***"

# scheme://[user]:password@  (the password may hold anything but '@', '/' and whitespace)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@/\s]+)@")


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    return _USERINFO.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)


def redact_url(url: str | None) -> str:
    """`url` without its password (None reads as an empty string)."""
    return redact_text(url or "")
