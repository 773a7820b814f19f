"""Sharded JSONL artifacts: the unit of resumption for generation and ranking.

A stage that processes thousands of prompts writes one file per shard, each atomically, only when
the whole shard is finished. After a crash, the stage redoes exactly the shards whose file is
missing: nothing finished is redone, nothing half-written is ever read. Each store holds one record
type (`orchestrator.records`), validated line by line on read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import pydantic

from pairloop.atomic import atomic_write_text
from pairloop.errors import PairloopError
from pairloop.validation import field_errors

__all__ = ["ShardCorruptError", "ShardStore", "chunk"]

T = TypeVar("T")
R = TypeVar("R", bound=pydantic.BaseModel)


class ShardCorruptError(PairloopError):
    """A shard file holds a line that is not a record of the store's type."""


def chunk(items: Sequence[T], size: int) -> list[list[T]]:
    """Split `items` into consecutive lists of at most `size` (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class ShardStore(Generic[R]):
    """`DIR/shard-00000.jsonl`, `DIR/shard-00001.jsonl`, ... each complete or absent."""

    def __init__(self, root: str | Path, record: type[R]) -> None:
        self.root = Path(root)
        self.record = record

    def path(self, index: int) -> Path:
        """The file of shard `index`."""
        return self.root / f"shard-{index:05d}.jsonl"

    def has(self, index: int) -> bool:
        """True when shard `index` is finished (its file exists: writes are atomic)."""
        return self.path(index).is_file()

    def missing(self, count: int) -> list[int]:
        """The shards of 0..count-1 that still have to be made."""
        return [i for i in range(count) if not self.has(i)]

    def write(self, index: int, records: Sequence[R]) -> Path:
        """Write shard `index` atomically; one sorted-key JSON object per line."""
        path = self.path(index)
        lines = (json.dumps(r.model_dump(mode="json"), sort_keys=True) + "\n" for r in records)
        atomic_write_text(path, "".join(lines))
        return path

    def read(self, index: int) -> list[R]:
        """The records of shard `index`, each validated."""
        path = self.path(index)
        out: list[R] = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(self.record.model_validate_json(line))
            except pydantic.ValidationError as exc:
                problems = "; ".join(f"{e.where}: {e.message}" for e in field_errors(exc))
                raise ShardCorruptError(
                    f"{path}:{number} is not a {self.record.__name__} ({problems}); delete the "
                    "file and resume, which makes the shard again"
                ) from None
        return out

    def read_all(self, count: int) -> Iterator[R]:
        """Every record of shards 0..count-1, in order (all of them must exist)."""
        for i in range(count):
            yield from self.read(i)
