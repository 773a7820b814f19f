"""Manifest bookkeeping and shard stores: what resumption relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.manifest import Manifest, load_manifest
from orchestrator.shards import ShardStore, chunk


def test_running_marks_done_and_failed(tmp_path: Path) -> None:
    m = Manifest(run_id="r", config_fingerprint="f", iterations=1)
    with m.running("a", tmp_path) as rec:
        assert load_manifest(tmp_path).stages["a"].state == "running"
        rec.metrics = {"x": 1}
    assert load_manifest(tmp_path).stages["a"].state == "done"
    with pytest.raises(RuntimeError), m.running("b", tmp_path):
        raise RuntimeError("boom")
    saved = load_manifest(tmp_path)
    assert saved.stages["b"].state == "failed" and "boom" in (saved.stages["b"].error or "")
    assert saved.stages["a"].metrics == {"x": 1}


def test_shards_missing_and_read_back(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "s")
    assert store.missing(3) == [0, 1, 2]
    store.write(1, [{"a": 1}, {"a": 2}])
    assert store.missing(3) == [0, 2]
    store.write(0, [{"a": 0}])
    store.write(2, [])
    assert [r["a"] for r in store.read_all(3)] == [0, 1, 2]
    assert chunk(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
