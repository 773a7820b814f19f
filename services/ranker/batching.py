"""Dynamic micro-batching across concurrent requests, length-aware.

Routes submit single sequences (a PairRM comparison, a reward-model input) and await their results.
One collector task gathers what is queued: it waits up to `max_wait_s` for more work while less than
a full batch is queued, takes up to `sort_window` sequences, sorts them by length and cuts them into
forward passes of at most `max_batch_size` rows and `max_batch_tokens` padded tokens. Sorting is
what makes batching cheap: a pass costs its longest row times its row count, so rows of similar
length waste little on padding. Passes run one at a time on a single inference thread (the model
is not shared between threads), while the event loop keeps accepting and tokenizing requests.

With a `MemoryBudget` (services.ranker.memory), a pass is also capped by its estimated memory,
attention's rows x heads x L^2 included. A pass that still runs out of device memory is split in
halves and retried, down to single rows, before its callers get an error; every split is counted
(`pairloop_ranker_oom_splits_total`) and the budget lowered to what then fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pairloop.errors import ServerError, ServiceUnavailableError
from services.ranker.memory import MemoryBudget, is_out_of_memory
from services.ranker.metrics import RankerMetrics

__all__ = ["MicroBatcher", "plan_batches"]

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


@dataclass
class _Pending(Generic[J, R]):
    job: J
    length: int
    request: int
    future: asyncio.Future[R] = field(repr=False)


def plan_batches(
    lengths: Sequence[int],
    *,
    max_rows: int,
    max_tokens: int,
    max_bytes: int | None = None,
    pass_bytes: Callable[[int, int], int] | None = None,
) -> list[list[int]]:
    """Indices of `lengths` grouped into forward passes: sorted by length, capped in rows, padded
    tokens (rows x longest) and, given both `max_bytes` and `pass_bytes(rows, longest)`, in
    estimated memory. A sequence over a cap on its own runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []

    def too_big(rows: int, longest: int) -> bool:
        if rows * longest > max_tokens:
            return True
        return (
            max_bytes is not None
            and pass_bytes is not None
            and pass_bytes(rows, longest) > max_bytes
        )

    for i in order:
        # Sorted ascending, so the newcomer is the longest row of the pass it joins.
        if current and (len(current) >= max_rows or too_big(len(current) + 1, lengths[i])):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class MicroBatcher(Generic[J, R]):
    """Collects jobs from any number of coroutines and runs them in sorted, capped batches.

    `run_batch(jobs)` is called on the inference thread and returns one result per job.
    """

    def __init__(
        self,
        run_batch: Callable[[list[J]], Sequence[R]],
        *,
        metrics: RankerMetrics,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        sort_window: int,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._metrics = metrics
        metrics.declare_replica()
        self.budget = budget
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.sort_window = max(sort_window, max_batch_size)
        self._queue: asyncio.Queue[_Pending[J, R]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker-forward")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="micro-batcher")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ServiceUnavailableError("the ranker is shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: J, *, length: int, request: int) -> asyncio.Future[R]:
        """Queue one job; `length` (tokens) drives bucketing, `request` only feeds the metrics."""
        if not self.running:
            raise ServiceUnavailableError("the ranker is not running (starting or shutting down)")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(job, length, request, future))
        return future

    async def _gather_window(self) -> list[_Pending[J, R]]:
        window = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(window) < self.sort_window:
            while not self._queue.empty() and len(window) < self.sort_window:
                window.append(self._queue.get_nowait())
            if len(window) >= self.max_batch_size:
                break  # a full pass is ready: waiting longer would only add latency
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                window.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [p for p in window if not p.future.done()]  # drop work whose caller went away

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            window = await self._gather_window()
            max_bytes = self.budget.bytes() if self.budget is not None else None
            if max_bytes is not None:
                self._metrics.batch_budget_bytes.labels(**self._metrics.labels).set(max_bytes)
            plan = plan_batches(
                [p.length for p in window],
                max_rows=self.max_batch_size,
                max_tokens=self.max_batch_tokens,
                max_bytes=max_bytes,
                pass_bytes=self.budget.cost.pass_bytes if self.budget is not None else None,
            )
            for indices in plan:
                batch = [window[i] for i in indices]
                self._observe(batch)
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(
                        self._executor,
                        self._forward,
                        [p.job for p in batch],
                        max(p.length for p in batch),
                    )
                except Exception as exc:  # a failed pass fails its callers, not the service
                    log.exception("forward pass over %d sequences failed", len(batch))
                    error = ServerError(f"ranking failed: {type(exc).__name__}: {exc}")
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(error)
                    continue
                self._metrics.forward_seconds.labels(**self._metrics.labels).observe(
                    time.perf_counter() - started
                )
                for p, result in zip(batch, results, strict=True):
                    if p.future.done():
                        continue
                    if isinstance(result, _OutOfMemory):
                        p.future.set_exception(
                            ServerError(
                                f"ranking failed: OutOfMemoryError: a single sequence of "
                                f"{p.length} tokens does not fit in device memory ({result.reason})"
                            )
                        )
                    else:
                        p.future.set_result(result)

    def _forward(self, jobs: list[J], longest: int) -> list[R | _OutOfMemory]:
        """`run_batch(jobs)`, split in halves on out-of-memory down to one row (inference thread).

        A single row that still does not fit gets an `_OutOfMemory` in its place: only its caller
        fails. Any other error fails the whole pass.
        """
        try:
            results: list[R | _OutOfMemory] = list(self._run_batch(jobs))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if len(jobs) == 1:
                log.error("out of memory on a single row of %d tokens", longest)
                return [_OutOfMemory(str(exc).splitlines()[0][:200])]
            log.warning("out of memory on %d rows x %d tokens: splitting", len(jobs), longest)
        else:
            if self.budget is not None:
                self.budget.note_fit()  # enough of these lift an out-of-memory's limit again
            return results
        # Outside the except block: its traceback would keep the failed pass's tensors alive.
        self._metrics.oom_splits.labels(**self._metrics.labels).inc()
        if self.budget is not None:
            self.budget.note_out_of_memory(len(jobs), longest)
        _release_cached_memory()
        half = len(jobs) // 2
        return self._forward(jobs[:half], longest) + self._forward(jobs[half:], longest)

    def _observe(self, batch: list[_Pending[J, R]]) -> None:
        longest = max(p.length for p in batch)
        real = sum(p.length for p in batch)
        m, labels = self._metrics, self._metrics.labels
        m.batch_size.labels(**labels).observe(len(batch))
        m.batch_requests.labels(**labels).observe(len({p.request for p in batch}))
        m.comparisons.labels(**labels).inc(len(batch))
        m.batch_tokens.labels(kind="real", **labels).inc(real)
        m.batch_tokens.labels(kind="padding", **labels).inc(longest * len(batch) - real)


@dataclass(frozen=True)
class _OutOfMemory:
    """Placeholder result of a single row that ran out of memory even alone."""

    reason: str


def _release_cached_memory() -> None:
    """Give the failed pass's cached blocks back before retrying smaller (CUDA only)."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
