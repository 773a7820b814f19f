"""The rank stage keeps every replica of the ranker busy: the replica count the ranker's /ready
reports (read at preflight) raises how many ranking shards are in flight at once."""

from __future__ import annotations

from orchestrator.loop import ranker_replicas
from orchestrator.stages.rank import REQUESTS_PER_REPLICA, rank_concurrency


def test_ranker_replicas_are_read_from_ready_and_default_to_one() -> None:
    ready = {"status": "ready", "backend": "pairrm", "replicas": 8, "devices": ["cuda:0"] * 8}
    assert ranker_replicas(ready) == 8
    # A ranker that does not say (an older one, a custom service) is one replica.
    assert ranker_replicas({"status": "ready", "backend": "pairrm"}) == 1
    assert ranker_replicas({"replicas": 0}) == 1
    assert ranker_replicas({"replicas": "8"}) == 1
    assert ranker_replicas(["not", "a", "dict"]) == 1


def test_rank_concurrency_covers_every_replica() -> None:
    # services.concurrency 4 against 8 replicas: 4 shards in flight would leave 4 GPUs idle.
    assert rank_concurrency(4, 8) == 8 * REQUESTS_PER_REPLICA
    assert rank_concurrency(4, 1) == 4  # one replica: the run config's concurrency stands
    assert rank_concurrency(32, 8) == 32  # never lowered
