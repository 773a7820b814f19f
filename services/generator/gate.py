"""The swap gate: a read/write lock that makes every response's weight version exact.

Each generation request holds a `Lease` (shared) from before its first token to after its last;
a weight swap holds the gate exclusively. So no request straddles a swap, and the version a lease
records is the version that produced all of its tokens.

    lease = await gate.acquire(restartable=True)     # waits while a swap holds the gate
    ... generate; lease.version is the label ...
    gate.release(lease)

    async with gate.exclusive(abort=engine.abort, drain_timeout=600) as window:
        ... reload weights ...; window.set_version("v2")

Writer preference: once a swap asks for the gate, new leases wait behind it (else a steady stream
of requests would starve the swap). With `abort`, the swap stops the engine requests of every
restartable lease; those requests notice, release, wait at the gate and re-run on the new weights.
Streams are never restartable: their tokens are already on the wire, so a swap waits for them.

While the engine is released (time-shared placement) the gate refuses: `acquire` raises the
error `refuse` was given (503 with Retry-After), at once and for requests that were waiting
behind the release, until `admit` (the wake) opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["DrainTimeoutError", "Lease", "SwapGate", "SwapWindow"]

# How often a swap in abort mode re-sends aborts while it drains: an abort can overtake the add
# of a request that was registered just before it, and vLLM ignores aborts of unknown ids.
_REABORT_INTERVAL_S = 0.05


class DrainTimeoutError(TimeoutError):
    """In-flight requests did not finish within the swap's drain timeout."""

    def __init__(self, pending: int, timeout: float) -> None:
        super().__init__(f"{pending} in-flight requests did not finish within {timeout:g}s")
        self.pending = pending


@dataclass(eq=False)
class Lease:
    """One request's shared hold on the gate, and what it needs to be stopped by a swap."""

    id: int
    version: str
    restartable: bool
    request_ids: set[str] = field(default_factory=set)
    abort_requested: bool = False
    # Set by the request when it gives up this lease to run again on the new weights.
    requeued: bool = False
    released: bool = False


@dataclass
class SwapWindow:
    """What the holder of the gate sees: the version before, and how many requests it bounced."""

    previous_version: str
    aborted_leases: list[Lease]
    _gate: SwapGate

    def set_version(self, version: str) -> None:
        self._gate._version = version

    @property
    def requeued_requests(self) -> int:
        return sum(1 for lease in self.aborted_leases if lease.requeued)


class SwapGate:
    def __init__(self, version: str, *, on_wait: Callable[[], None] | None = None) -> None:
        self._version = version
        self._on_wait = on_wait
        self._open = asyncio.Event()
        self._open.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._leases: set[Lease] = set()
        self._ids = itertools.count()
        self.waiting = 0
        self._refusal: Callable[[], BaseException] | None = None

    @property
    def version(self) -> str:
        """The version of the weights in the engine now."""
        return self._version

    @property
    def active(self) -> int:
        return len(self._leases)

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    def refuse(self, make_error: Callable[[], BaseException]) -> None:
        """From now on `acquire` raises `make_error()` (the engine is released), until `admit`."""
        self._refusal = make_error

    def admit(self) -> None:
        self._refusal = None

    def _check_refusal(self) -> None:
        if self._refusal is not None:
            raise self._refusal()

    async def acquire(self, *, restartable: bool) -> Lease:
        self._check_refusal()
        if not self._open.is_set():
            self.waiting += 1
            if self._on_wait is not None:
                self._on_wait()
            try:
                # Re-check after waking: another swap may have closed the gate again meanwhile.
                while not self._open.is_set():
                    await self._open.wait()
            finally:
                self.waiting -= 1
            # Held back by a release rather than a swap: no engine to run on now.
            self._check_refusal()
        lease = Lease(next(self._ids), self._version, restartable)
        self._leases.add(lease)
        self._drained.clear()
        return lease

    def release(self, lease: Lease) -> None:
        """Give a lease back; safe to call more than once, and from synchronous teardown."""
        if lease.released:
            return
        lease.released = True
        self._leases.discard(lease)
        if not self._leases:
            self._drained.set()

    @asynccontextmanager
    async def lease(self, *, restartable: bool) -> AsyncIterator[Lease]:
        held = await self.acquire(restartable=restartable)
        try:
            yield held
        finally:
            self.release(held)

    @asynccontextmanager
    async def exclusive(
        self,
        *,
        abort: Callable[[set[str]], Awaitable[None]] | None,
        drain_timeout: float,
    ) -> AsyncIterator[SwapWindow]:
        """Close the gate, (optionally) abort restartable requests, wait for every lease to end.

        On `DrainTimeoutError` the gate reopens and nothing has changed.
        """
        if not self._open.is_set():
            raise RuntimeError("the gate is already held by a swap")
        self._open.clear()
        try:
            aborted: list[Lease] = []
            if abort is not None:
                aborted = [lease for lease in self._leases if lease.restartable]
                for lease in aborted:
                    lease.abort_requested = True
            await self._drain(aborted, abort, drain_timeout)
            yield SwapWindow(previous_version=self._version, aborted_leases=aborted, _gate=self)
        finally:
            self._open.set()

    async def _drain(
        self,
        aborted: list[Lease],
        abort: Callable[[set[str]], Awaitable[None]] | None,
        timeout: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._leases:
            if abort is not None:
                ids = {rid for lease in aborted if not lease.released for rid in lease.request_ids}
                await abort(ids)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DrainTimeoutError(len(self._leases), timeout)
            wait = min(remaining, _REABORT_INTERVAL_S) if abort is not None else remaining
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), wait)
