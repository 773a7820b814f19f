"""Generator replica discovery: a URL list, or every address behind a DNS name."""

from __future__ import annotations

import pytest

from orchestrator.config import ServicesConfig
from orchestrator.discovery import generator_urls
from pairloop.errors import ServiceUnavailableError


def test_url_list_is_used_as_given() -> None:
    cfg = ServicesConfig(generator_urls=["http://a:1/", "http://b:2"])
    assert generator_urls(cfg) == ["http://a:1", "http://b:2"]


def test_dns_name_expands_to_every_address() -> None:
    urls = generator_urls(ServicesConfig(generator_dns="localhost:8123"))
    assert "http://127.0.0.1:8123" in urls
    assert all(u.endswith(":8123") for u in urls)
    assert len(urls) == len(set(urls))


def test_unresolvable_name_is_a_clear_error() -> None:
    with pytest.raises(ServiceUnavailableError, match=r"cannot resolve 'no-such-host\.invalid'"):
        generator_urls(ServicesConfig(generator_dns="no-such-host.invalid:8000"))


def test_bad_dns_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="generator_dns"):
        ServicesConfig(generator_dns="http://x:8000")
