"""A generation where too many prompts failed stops, and a resume makes exactly those shards again."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.records import GenerationRecord
from orchestrator.shards import ShardStore
from orchestrator.stages.generate import TooManyFailuresError, check_failures


def _shards(root: Path, *, failing: set[int]) -> tuple[ShardStore[GenerationRecord], list]:
    prompts = [{"prompt_id": f"p{i}", "prompt": f"Question {i}?"} for i in range(20)]
    store = ShardStore(root, GenerationRecord)
    for index in range(4):
        store.write(
            index,
            [
                GenerationRecord(
                    prompt_id=p["prompt_id"],
                    prompt=p["prompt"],
                    responses=[] if i in failing else ["an answer"],
                    finish_reasons=[] if i in failing else ["stop"],
                    completion_tokens=[] if i in failing else [2],
                    weight_version="r.policy0",
                    error="prompt of 3000 tokens exceeds the context of 2048 tokens"
                    if i in failing
                    else None,
                )
                for i, p in enumerate(prompts[index * 5 : index * 5 + 5], start=index * 5)
            ],
        )
    return store, prompts


def test_a_failure_share_above_the_limit_stops_and_unmakes_those_shards(tmp_path: Path) -> None:
    store, prompts = _shards(tmp_path / "gen", failing={6, 16})
    with pytest.raises(TooManyFailuresError) as err:
        check_failures(store, prompts, shard_size=5, max_share=0.02, stage="iter1.generate")
    message = err.value.message
    assert message.startswith("iter1.generate: the generator could not answer 2 of 20 prompts")
    assert "(10.0%, above sampling.max_failed_share 2.0%)" in message
    assert "'p6'" in message and "exceeds the context of 2048 tokens" in message
    # The shards holding failures are made again on resume; the others are kept.
    assert store.missing(4) == [1, 3]


def test_failures_within_the_limit_are_counted_and_kept(tmp_path: Path) -> None:
    store, prompts = _shards(tmp_path / "gen", failing={6})
    assert check_failures(store, prompts, shard_size=5, max_share=0.05, stage="s") == 1
    assert store.missing(4) == []
