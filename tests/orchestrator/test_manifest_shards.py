"""Manifest bookkeeping and shard stores: what resumption relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.manifest import Manifest, load_manifest
from orchestrator.records import GenerationRecord, RankedRecord
from orchestrator.shards import ShardCorruptError, ShardStore, chunk


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


def gen(pid: str) -> GenerationRecord:
    return GenerationRecord(
        prompt_id=pid,
        prompt="q",
        responses=["a", ""],
        finish_reasons=["stop", "length"],
        completion_tokens=[1, 0],
        weight_version="r.policy0",
    )


def test_shards_missing_and_read_back(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "s", GenerationRecord)
    assert store.missing(3) == [0, 1, 2]
    store.write(1, [gen("1"), gen("2")])
    assert store.missing(3) == [0, 2]
    store.write(0, [gen("0")])
    store.write(2, [])
    assert [r.prompt_id for r in store.read_all(3)] == ["0", "1", "2"]
    assert chunk(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


# Lines as the stages wrote them before the records were typed (json.dumps of a dict with
# sort_keys): a run directory made then must resume, so these bytes must read and re-write the same.
OLD_GENERATION_LINE = (
    '{"completion_tokens": [7, 16], "finish_reasons": ["stop", "length"], "prompt": "Say hi", '
    '"prompt_id": "p1", "responses": ["hi there", ""], "weight_version": "demo.policy0"}'
)
OLD_RANKED_LINE = (
    '{"best_index": 1, "candidates": ["a b", "c"], "empty": 3, "prompt": "q", "prompt_id": "p1", '
    '"ranks": [2, 1], "scores": [-0.125, 0.3333333333333333], "truncated": false, '
    '"worst_index": 0}'
)


@pytest.mark.parametrize(
    ("record", "line"),
    [(GenerationRecord, OLD_GENERATION_LINE), (RankedRecord, OLD_RANKED_LINE)],
)
def test_old_shard_files_read_and_rewrite_byte_for_byte(
    tmp_path: Path, record: type[GenerationRecord] | type[RankedRecord], line: str
) -> None:
    old = ShardStore(tmp_path / "old", record)
    old.root.mkdir()
    old.path(0).write_text(line + "\n")
    records = old.read(0)
    new = ShardStore(tmp_path / "new", record)
    new.write(0, records)
    assert new.path(0).read_bytes() == old.path(0).read_bytes()


def test_a_shard_line_of_the_wrong_shape_names_file_line_and_field(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "s", RankedRecord)
    store.root.mkdir()
    store.path(0).write_text(OLD_RANKED_LINE + "\n" + '{"prompt_id": "p2", "prompt": "q"}\n')
    with pytest.raises(
        ShardCorruptError, match=r"shard-00000.jsonl:2 .*candidates: Field required"
    ):
        store.read(0)
