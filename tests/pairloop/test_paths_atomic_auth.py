"""Small guards every service relies on: path confinement, atomic writes, bearer auth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pairloop.atomic import atomic_write_json, publish_dir
from pairloop.auth import check_bearer
from pairloop.errors import AuthenticationError, ForbiddenError, ValidationError
from pairloop.paths import resolve_inside


def test_resolve_inside_accepts_relative_and_absolute(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert resolve_inside(tmp_path, "a") == (tmp_path / "a").resolve()
    assert resolve_inside(tmp_path, tmp_path / "a") == (tmp_path / "a").resolve()


@pytest.mark.parametrize("bad", ["../x", "/etc", "a/../../x"])
def test_resolve_inside_refuses_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ForbiddenError, match="outside the model store root"):
        resolve_inside(tmp_path, bad)


def test_resolve_inside_refuses_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path, root / "link")
    with pytest.raises(ForbiddenError):
        resolve_inside(root, "link/elsewhere")


def test_resolve_inside_refuses_empty(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="must not be empty"):
        resolve_inside(tmp_path, " ")


def test_atomic_write_json_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    atomic_write_json(tmp_path / "m.json", {"a": 2})
    assert (tmp_path / "m.json").read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_publish_dir_replaces_whole_directory(tmp_path: Path) -> None:
    final = tmp_path / "final"
    for version in ("1", "2"):
        staging = tmp_path / f".staging-{version}"
        staging.mkdir()
        (staging / "v").write_text(version)
        publish_dir(staging, final)
        assert (final / "v").read_text() == version
        assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_bearer() -> None:
    check_bearer("Bearer s3cret", "s3cret")
    with pytest.raises(AuthenticationError):
        check_bearer(None, "s3cret")
    with pytest.raises(AuthenticationError):
        check_bearer("Basic abc", "s3cret")
    with pytest.raises(ForbiddenError):
        check_bearer("Bearer wrong", "s3cret")
