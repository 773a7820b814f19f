"""The swap gate on its own (pure asyncio): exclusion, writer preference, abort, drain timeout."""

from __future__ import annotations

import asyncio

import pytest

from services.generator.gate import DrainTimeoutError, SwapGate


async def test_leases_share_and_a_swap_waits_for_them() -> None:
    gate = SwapGate("v0")
    a = await gate.acquire(restartable=True)
    b = await gate.acquire(restartable=False)
    assert gate.active == 2 and a.version == b.version == "v0"
    entered = asyncio.Event()

    async def swap() -> None:
        async with gate.exclusive(abort=None, drain_timeout=5) as window:
            entered.set()
            window.set_version("v1")

    task = asyncio.create_task(swap())
    await asyncio.sleep(0)  # let the swap close the gate and start draining
    assert gate.closed and not entered.is_set()
    gate.release(a)
    await asyncio.sleep(0)
    assert not entered.is_set(), "one lease is still held"
    gate.release(b)
    gate.release(b)  # idempotent
    await asyncio.wait_for(task, 5)
    assert entered.is_set() and gate.version == "v1" and not gate.closed


async def test_requests_arriving_during_a_swap_wait_and_get_the_new_version() -> None:
    waits: list[int] = []
    gate = SwapGate("v0", on_wait=lambda: waits.append(1))
    held = await gate.acquire(restartable=True)
    release_swap = asyncio.Event()

    async def swap() -> None:
        async with gate.exclusive(abort=None, drain_timeout=5) as window:
            await release_swap.wait()
            window.set_version("v1")

    swapper = asyncio.create_task(swap())
    await asyncio.sleep(0)
    late = asyncio.create_task(gate.acquire(restartable=True))
    await asyncio.sleep(0)
    assert gate.waiting == 1 and not late.done(), "writer preference: new leases wait"
    gate.release(held)
    await asyncio.sleep(0)
    assert not late.done(), "still waiting while the swap holds the gate"
    release_swap.set()
    await asyncio.wait_for(swapper, 5)
    lease = await asyncio.wait_for(late, 5)
    assert lease.version == "v1" and waits == [1] and gate.waiting == 0


async def test_abort_mode_stops_restartable_leases_only_until_drained() -> None:
    gate = SwapGate("v0")
    restartable = await gate.acquire(restartable=True)
    restartable.request_ids.update({"r1", "r2"})
    stream = await gate.acquire(restartable=False)
    stream.request_ids.add("s1")
    aborted: list[set[str]] = []

    async def abort(ids: set[str]) -> None:
        aborted.append(ids)
        # The request notices the abort and gives its lease back to run again later.
        restartable.requeued = True
        gate.release(restartable)

    async def swap() -> int:
        async with gate.exclusive(abort=abort, drain_timeout=5) as window:
            return window.requeued_requests

    task = asyncio.create_task(swap())
    for _ in range(5):
        await asyncio.sleep(0)
    assert aborted[0] == {"r1", "r2"} and restartable.abort_requested
    assert not stream.abort_requested and not task.done(), "a stream is waited for, not aborted"
    gate.release(stream)
    assert await asyncio.wait_for(task, 5) == 1


async def test_abort_is_resent_until_the_request_is_gone() -> None:
    # vLLM ignores an abort that overtakes the request's own add; the gate sends it again.
    gate = SwapGate("v0")
    lease = await gate.acquire(restartable=True)
    lease.request_ids.add("r1")
    calls = 0

    async def abort(ids: set[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            gate.release(lease)

    async with gate.exclusive(abort=abort, drain_timeout=5):
        pass
    assert calls == 3


async def test_drain_timeout_reopens_the_gate_unchanged() -> None:
    gate = SwapGate("v0")
    stuck = await gate.acquire(restartable=False)
    with pytest.raises(DrainTimeoutError) as err:
        async with gate.exclusive(abort=None, drain_timeout=0.05) as window:
            window.set_version("never")
    assert err.value.pending == 1
    assert gate.version == "v0" and not gate.closed
    other = await asyncio.wait_for(gate.acquire(restartable=True), 1)
    gate.release(other)
    gate.release(stuck)


async def test_a_second_exclusive_holder_is_refused() -> None:
    gate = SwapGate("v0")
    async with gate.exclusive(abort=None, drain_timeout=1):
        with pytest.raises(RuntimeError):
            async with gate.exclusive(abort=None, drain_timeout=1):
                pass


async def test_a_release_refuses_requests_waiting_behind_it_until_the_wake() -> None:
    """Requests that waited at the gate while the engine was being released get the release's
    503 when the gate reopens, never a run on an engine that is gone; the wake admits them."""
    from pairloop.errors import EngineReleasedError

    gate = SwapGate("v0")
    held = await gate.acquire(restartable=False)
    released = asyncio.Event()

    async def release() -> None:
        async with gate.exclusive(abort=None, drain_timeout=5):
            gate.refuse(lambda: EngineReleasedError("released", retry_after=60))
        released.set()

    releasing = asyncio.create_task(release())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(gate.acquire(restartable=True))
    await asyncio.sleep(0)
    assert gate.closed and gate.waiting == 1
    gate.release(held)
    await asyncio.wait_for(releasing, 5)
    with pytest.raises(EngineReleasedError) as refused:
        await asyncio.wait_for(waiter, 5)
    assert refused.value.retry_after == 60 and gate.active == 0
    with pytest.raises(EngineReleasedError):
        await gate.acquire(restartable=True)
    gate.admit()
    lease = await gate.acquire(restartable=True)
    assert lease.version == "v0"
