"""One backend replica per device in one ranker process, and the dispatch of requests to them.

    PAIRLOOP_RANKER_DEVICES=cuda:all python -m services.ranker     # one PairRM per visible GPU

Each replica is a whole backend (its weights on its device, its own micro-batcher, inference
thread and memory budget, its metrics labelled replica/device), built by the backend's own factory
from the settings with `device` set to the replica's. A request goes whole to the least-loaded
replica (fewest requests in flight; ties to the one that has served fewest), and its work is
batched there with the other requests that replica holds. Dispatching requests, not sequences,
keeps each answer the work of one model copy, so a score does not depend on which copy or mix of
copies computed it; the orchestrator keeps at least two requests per replica in flight, so that a
replica tokenizes its next request while its current one runs (`orchestrator.stages.rank`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from services.ranker.metrics import RankerMetrics
from services.ranker.rankers import build_ranker
from services.ranker.rankers.base import Ranker
from services.ranker.settings import ALL_CUDA, RankerSettings

__all__ = ["Replica", "ReplicaPool", "load_replicas", "resolve_devices"]

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """One backend on one device; `in_flight` and `requests` drive the dispatch."""

    index: int
    device: str
    ranker: Ranker
    in_flight: int = 0
    requests: int = 0


def resolve_devices(settings: RankerSettings) -> list[str]:
    """The device of each replica, `cuda:all` read from torch (CUDA_VISIBLE_DEVICES applies)."""
    if settings.devices != ALL_CUDA:
        return settings.replica_devices()
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError(f"--devices {ALL_CUDA}: this process sees no CUDA device")
    return settings.replica_devices(cuda_count=count)


async def load_replicas(
    settings: RankerSettings,
    metrics: RankerMetrics,
    devices: list[str],
    on_loaded: Callable[[int], None] | None = None,
) -> list[Replica]:
    """Build a backend per device (one after the other: loaders such as llm-blender's patch
    process-wide state), then run each one's warm-up forward pass concurrently. If any replica
    fails, those already started are closed and the error is raised."""
    replicas: list[Replica] = []
    try:
        for index, device in enumerate(devices):
            one = settings.model_copy(update={"device": device, "devices": None})
            ranker = await asyncio.to_thread(build_ranker, one, metrics.for_replica(index, device))
            replicas.append(Replica(index, device, ranker))

        async def start(replica: Replica) -> None:
            await replica.ranker.start()
            if on_loaded is not None:
                on_loaded(replica.index)

        await asyncio.gather(*(start(r) for r in replicas))
    except BaseException:
        for replica in replicas:
            with contextlib.suppress(Exception):
                await replica.ranker.close()
        raise
    return replicas


class ReplicaPool:
    """The replicas of one service, and which one takes the next request."""

    def __init__(self, replicas: list[Replica], metrics: RankerMetrics) -> None:
        if not replicas:
            raise ValueError("a replica pool needs at least one replica")
        self.replicas = replicas
        self._metrics = metrics

    @property
    def ready(self) -> bool:
        return all(r.ranker.ready for r in self.replicas)

    @property
    def devices(self) -> list[str]:
        return [r.device for r in self.replicas]

    @contextlib.contextmanager
    def lease(self) -> Iterator[Ranker]:
        """The least-loaded replica's backend, counted as busy until the block ends."""
        replica = min(self.replicas, key=lambda r: (r.in_flight, r.requests, r.index))
        replica.in_flight += 1
        replica.requests += 1
        self._metrics.replica_requests.labels(
            replica=str(replica.index), device=replica.device
        ).inc()
        try:
            yield replica.ranker
        finally:
            replica.in_flight -= 1

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "replica": r.index,
                "device": r.device,
                "in_flight": r.in_flight,
                "requests": r.requests,
            }
            for r in self.replicas
        ]

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.ranker.close()
