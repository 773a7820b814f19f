"""One redaction helper for every URL that may carry a password (Redis URLs above all)."""

from __future__ import annotations

import pytest

from pairloop.redact import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cr3t@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:p%40ss@redis:6379/1", "redis://user:***@redis:6379/1"),
        ("rediss://default:x-y_z@h.example:6380", "rediss://default:***@h.example:6380"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),  # nothing to hide
        ("http://127.0.0.1:8000/ready", "http://127.0.0.1:8000/ready"),
        (None, ""),
    ],
)
def test_redact_url_hides_only_the_password(url: str | None, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_hides_every_url_password_in_a_message() -> None:
    msg = "Redis at redis://:aaa@127.0.0.1:1/0 unreachable; fallback redis://u:bbb@h:2/0 too"
    out = redact_text(msg)
    assert "aaa" not in out and "bbb" not in out
    assert "redis://:***@127.0.0.1:1/0" in out and "redis://u:***@h:2/0" in out
