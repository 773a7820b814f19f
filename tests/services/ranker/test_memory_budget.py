"""The ranker's forward-pass memory budget and its out-of-memory split, on CPU.

The arithmetic is checked at PairRM's real shape (DeBERTa-v3-large: 16 heads, hidden 1024,
bfloat16, 1224 + 2 x 412 tokens) against the compose batch settings. The split path runs through
the real `MicroBatcher` and the real tiny PairRM forward: the forward raises torch's own
`OutOfMemoryError` above a row count, as CUDA would, and every comparison still gets the value an
unsplit pass gives; /metrics' counter (the same registry) counts the splits.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from pairloop.errors import ServerError
from services.ranker.batching import MicroBatcher, plan_batches
from services.ranker.memory import ATTENTION_COPIES, MemoryBudget, PassCost, is_out_of_memory
from services.ranker.metrics import RankerMetrics

PAIRRM = PassCost(heads=16, hidden=1024, dtype_bytes=2)  # DeBERTa-v3-large
LONGEST = 1224 + 2 * 412
GiB = 1 << 30


def test_attention_dominates_and_grows_with_the_square_of_length() -> None:
    one_row = PAIRRM.pass_bytes(1, LONGEST)
    assert one_row == (ATTENTION_COPIES * 16 * LONGEST**2 + 16 * 1024 * LONGEST) * 2
    assert 0.7e9 < one_row < 0.8e9, "about 0.7 GB per PairRM row at its longest, in bfloat16"
    assert PAIRRM.pass_bytes(1, 2 * LONGEST) > 3.8 * one_row  # quadratic, not linear
    # The compose settings (128 rows, 262,144 tokens) let 128 such rows through the token cap ...
    assert plan_batches([LONGEST] * 128, max_rows=128, max_tokens=262_144) == [list(range(128))]
    assert PAIRRM.pass_bytes(128, LONGEST) > 90e9, "... which would need over 90 GB"


def test_budget_is_a_share_of_free_memory_capped_and_it_cuts_the_plan() -> None:
    free = {"bytes": 28 * GiB}  # an H200 with 80% of its memory taken by vLLM
    budget = MemoryBudget(
        PAIRRM, device="cuda", fraction=0.8, cap_bytes=None, free_bytes=lambda: free["bytes"]
    )
    assert budget.bytes() == int(0.8 * 28 * GiB)
    rows = PAIRRM.max_rows(LONGEST, budget.bytes() or 0)
    assert rows == int(0.8 * 28 * GiB) // PAIRRM.pass_bytes(1, LONGEST) and 10 < rows < 128
    plan = plan_batches(
        [LONGEST] * 128,
        max_rows=128,
        max_tokens=262_144,
        max_bytes=budget.bytes(),
        pass_bytes=PAIRRM.pass_bytes,
    )
    assert sorted(i for b in plan for i in b) == list(range(128))
    assert max(len(b) for b in plan) == rows
    limit = int(0.8 * 28 * GiB)
    assert all(PAIRRM.pass_bytes(len(b), LONGEST) <= limit for b in plan)
    # Short rows pack many more per pass than long ones under the same budget.
    short = plan_batches(
        [300] * 128, max_rows=128, max_tokens=262_144, max_bytes=budget.bytes(),
        pass_bytes=PAIRRM.pass_bytes,
    )  # fmt: skip
    assert len(short) == 1
    # Free memory is read at every plan; the cap and an out-of-memory lower it.
    free["bytes"] = 4 * GiB
    assert budget.bytes() == int(0.8 * 4 * GiB)
    capped = MemoryBudget(
        PAIRRM, device="cuda", fraction=0.8, cap_bytes=GiB, free_bytes=lambda: 8 * GiB
    )
    assert capped.bytes() == GiB
    capped.note_out_of_memory(rows=8, length=500)
    assert capped.bytes() == PAIRRM.pass_bytes(4, 500)
    cpu = MemoryBudget(PAIRRM, device="cpu", fraction=0.8, cap_bytes=None)
    assert cpu.bytes() is None, "no device reading on CPU: only a cap bounds it there"


@pytest.fixture(scope="module")
def pairrm_model(pairrm_dir: Path) -> Any:
    from services.ranker.blender_adapter import load_pairrm

    return load_pairrm(str(pairrm_dir), device="cpu")


def rows_of(model: Any, items_factory: Any, n: int) -> list[Any]:
    prompts, candidates = items_factory(5, n, 2)
    sources = model.encode_sources(prompts)
    rows = []
    for src, (a, b) in zip(sources, candidates, strict=True):
        left, right = model.encode_candidates([a, b], limit=model.candidate_limit(src))
        rows.append((src.ids, left.ids, right.ids))
    return rows


def row_length(row: Any) -> int:
    return sum(len(part) for part in row)


class OomAbove:
    """The real forward, raising torch's OutOfMemoryError for passes above `max_rows` rows or,
    given `capacity`, whose estimated bytes (PairRM's cost) exceed it: a device that small."""

    def __init__(
        self,
        model: Any,
        max_rows: int,
        capacity: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.model = model
        self.max_rows = max_rows
        self.capacity = capacity
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 25 GiB")
        self.passes: list[int] = []

    def __call__(self, rows: list[Any]) -> list[np.float32]:
        need = PAIRRM.pass_bytes(len(rows), max(map(row_length, rows)))
        if len(rows) > self.max_rows or (self.capacity is not None and need > self.capacity):
            raise self.error
        self.passes.append(len(rows))
        return list(self.model.compare(rows))


def splits(metrics: RankerMetrics) -> float:
    text = generate_latest(metrics.registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("pairloop_ranker_oom_splits_total"))
    return float(line.split()[-1])


async def run_all(batcher: MicroBatcher[Any, Any], rows: list[Any]) -> list[Any]:
    futures = [batcher.submit(r, length=row_length(r), request=1) for r in rows]
    return list(await asyncio.gather(*futures, return_exceptions=True))


async def test_out_of_memory_splits_in_halves_and_every_row_gets_its_value(
    pairrm_model: Any, items_factory: Any
) -> None:
    rows = rows_of(pairrm_model, items_factory, 8)
    expected = pairrm_model.compare(rows)
    metrics = RankerMetrics()
    forward = OomAbove(pairrm_model, max_rows=2)
    batcher = MicroBatcher(
        forward, metrics=metrics, max_batch_size=8, max_batch_tokens=1 << 20,
        max_wait_s=0.5, sort_window=8,
    )  # fmt: skip
    batcher.start()
    try:
        got = await run_all(batcher, rows)
    finally:
        await batcher.close()
    np.testing.assert_allclose(np.array(got, dtype=np.float32), expected, atol=1e-5)
    # 8 -> 4 + 4 -> 2 + 2 + 2 + 2: three splits, four passes that fit.
    assert splits(metrics) == 3 and forward.passes == [2, 2, 2, 2]


async def test_after_an_out_of_memory_the_budget_plans_passes_that_fit(
    pairrm_model: Any, items_factory: Any
) -> None:
    rows = rows_of(pairrm_model, items_factory, 8)
    expected = pairrm_model.compare(rows)
    longest = max(map(row_length, rows))
    metrics = RankerMetrics()
    # A device that holds 3 of the longest rows; the budget starts out believing in 8.
    forward = OomAbove(pairrm_model, max_rows=8, capacity=PAIRRM.pass_bytes(3, longest))
    budget = MemoryBudget(
        PAIRRM, device="cuda", fraction=1.0, cap_bytes=None,
        free_bytes=lambda: PAIRRM.pass_bytes(8, longest),
    )  # fmt: skip
    batcher = MicroBatcher(
        forward, metrics=metrics, max_batch_size=8, max_batch_tokens=1 << 20,
        max_wait_s=0.5, sort_window=8, budget=budget,
    )  # fmt: skip
    batcher.start()
    try:
        first = await run_all(batcher, rows)
        after_first = splits(metrics)
        second = await run_all(batcher, rows)
    finally:
        await batcher.close()
    for got in (first, second):
        np.testing.assert_allclose(np.array(got, dtype=np.float32), expected, atol=1e-5)
    assert after_first >= 1
    assert splits(metrics) == after_first, "the lowered budget planned only passes that fit"
    assert (budget.bytes() or 0) <= PAIRRM.pass_bytes(4, longest) and budget.after_oom is not None


async def test_a_single_row_out_of_memory_fails_its_caller_after_all_splits(
    pairrm_model: Any, items_factory: Any
) -> None:
    rows = rows_of(pairrm_model, items_factory, 4)
    metrics = RankerMetrics()
    batcher = MicroBatcher(
        OomAbove(pairrm_model, max_rows=0), metrics=metrics, max_batch_size=4,
        max_batch_tokens=1 << 20, max_wait_s=0.5, sort_window=4,
    )  # fmt: skip
    batcher.start()
    try:
        got = await run_all(batcher, rows)
    finally:
        await batcher.close()
    assert all(
        isinstance(g, ServerError) and "does not fit in device memory" in g.message for g in got
    )
    assert splits(metrics) == 3, "4 -> 2 + 2 -> 1 + 1 + 1 + 1 before giving up"


async def test_only_the_row_that_cannot_fit_alone_fails(
    pairrm_model: Any, items_factory: Any
) -> None:
    rows = rows_of(pairrm_model, items_factory, 6)
    expected = pairrm_model.compare(rows)
    lengths = sorted({row_length(r) for r in rows})
    longest = max(range(len(rows)), key=lambda i: row_length(rows[i]))
    # A device that holds any one row but the longest.
    forward = OomAbove(pairrm_model, max_rows=6, capacity=PAIRRM.pass_bytes(1, lengths[-2]))
    batcher = MicroBatcher(
        forward, metrics=RankerMetrics(), max_batch_size=6, max_batch_tokens=1 << 20,
        max_wait_s=0.5, sort_window=6,
    )  # fmt: skip
    batcher.start()
    try:
        got = await run_all(batcher, rows)
    finally:
        await batcher.close()
    assert isinstance(got[longest], ServerError)
    assert "does not fit in device memory" in got[longest].message
    for i, value in enumerate(got):
        if i != longest:
            assert abs(float(value) - float(expected[i])) < 1e-5


def _wrapped(cause: BaseException) -> BaseException:
    try:
        raise ValueError("ranking failed") from cause
    except ValueError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be async"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 9.0 GB)"), True),
        (RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB"), True),
        (_wrapped(RuntimeError("CUDA error: out of memory")), True),
        (RuntimeError("The size of tensor a (4) must match the size of tensor b (5)"), False),
        (ValueError("bad input"), False),
    ],
)
def test_every_device_out_of_memory_form_is_recognised(error: BaseException, oom: bool) -> None:
    assert is_out_of_memory(error) is oom


async def test_the_budget_recovers_after_passes_that_fit(
    pairrm_model: Any, items_factory: Any
) -> None:
    """A transient out-of-memory (a neighbour's peak, raised as CUDA's runtime error) lowers the
    budget; once memory is back, passes that fit lift the limit again, to full-size passes."""
    rows = rows_of(pairrm_model, items_factory, 8)
    expected = pairrm_model.compare(rows)
    longest = max(map(row_length, rows))
    metrics = RankerMetrics()
    forward = OomAbove(
        pairrm_model,
        max_rows=8,
        capacity=PAIRRM.pass_bytes(2, longest),
        error=RuntimeError("CUDA error: out of memory"),
    )
    budget = MemoryBudget(
        PAIRRM, device="cuda", fraction=1.0, cap_bytes=None,
        free_bytes=lambda: PAIRRM.pass_bytes(8, longest), recover_after=2,
    )  # fmt: skip
    batcher = MicroBatcher(
        forward, metrics=metrics, max_batch_size=8, max_batch_tokens=1 << 20,
        max_wait_s=0.5, sort_window=8, budget=budget,
    )  # fmt: skip
    batcher.start()
    try:
        got = await run_all(batcher, rows)
        assert splits(metrics) >= 1 and budget.after_oom is not None
        forward.capacity = None  # the neighbour gave its memory back
        for _ in range(6):
            got += await run_all(batcher, rows)
            if budget.after_oom is None:
                break
        forward.passes.clear()
        got += await run_all(batcher, rows)
    finally:
        await batcher.close()
    for i in range(0, len(got), 8):
        np.testing.assert_allclose(np.array(got[i : i + 8], dtype=np.float32), expected, atol=1e-5)
    assert budget.after_oom is None, "the out-of-memory limit was lifted"
    assert forward.passes == [8], "full-size passes again"
