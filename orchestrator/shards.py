"""Sharded JSONL artifacts: the unit of resumption for generation and ranking.

A stage that processes thousands of prompts writes one file per shard, each atomically, only when
the whole shard is finished. After a crash, the stage redoes exactly the shards whose file is
missing: nothing finished is redone, nothing half-written is ever read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pairloop.atomic import atomic_write_text

__all__ = ["ShardStore", "chunk"]

T = TypeVar("T")


def chunk(items: Sequence[T], size: int) -> list[list[T]]:
    """Split `items` into consecutive lists of at most `size` (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class ShardStore:
    """`DIR/shard-00000.jsonl`, `DIR/shard-00001.jsonl`, ... each complete or absent."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.jsonl"

    def has(self, index: int) -> bool:
        return self.path(index).is_file()

    def missing(self, count: int) -> list[int]:
        return [i for i in range(count) if not self.has(i)]

    def write(self, index: int, records: Sequence[dict[str, Any]]) -> Path:
        path = self.path(index)
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return path

    def read(self, index: int) -> list[dict[str, Any]]:
        text = self.path(index).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def read_all(self, count: int) -> Iterator[dict[str, Any]]:
        """Every record of shards 0..count-1, in order (all of them must exist)."""
        for i in range(count):
            yield from self.read(i)
