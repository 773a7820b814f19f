"""The trainer client against a real redis-server that goes away: retried, then a clear error; a job
the broker lost is found lost and sent again under the same id (and one still queued is not)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from orchestrator.clients.trainer import BrokerUnreachableError, TrainerClient
from pairloop.jobs import TrainJob
from pairloop_local.processes import free_port
from pairloop_local.redis_server import RedisHandle, start_redis

# A queue of this test's own: no worker of another test consumes (or answers for) its jobs.
QUEUE = "pairloop-test-lost-jobs"


def job() -> TrainJob:
    return TrainJob(
        run_id="lost",
        iteration=1,
        policy_path="models/base",
        reference_path="models/base",
        dataset_path="runs/lost/dataset",
        output_path="runs/lost/checkpoints/policy1",
    )


def test_a_job_the_broker_lost_is_resubmitted_under_its_id(tmp_path: Path) -> None:
    handle = start_redis(tmp_path / "redis", persist=False)
    client = TrainerClient(handle.url, outage_s=10, queue=QUEUE)
    try:
        client.submit(job())
        assert not client.job_lost(job().job_id)  # queued: someone will take it
        redis.Redis.from_url(handle.url).flushall()  # what a restart without persistence does
        assert client.job_lost(job().job_id)

        resent = threading.Event()

        def resubmit() -> None:
            client.submit(job())
            resent.set()

        with pytest.raises(InterruptedError):
            client.wait(job().job_id, timeout=60, resubmit=resubmit, should_stop=resent.is_set)
        assert resent.is_set() and not client.job_lost(job().job_id)  # queued again, same id
    finally:
        client.close()
        handle.stop()


def test_redis_down_is_waited_for_then_a_one_line_error(tmp_path: Path) -> None:
    port = free_port()
    client = TrainerClient(f"redis://127.0.0.1:{port}/0", outage_s=1.0, queue=QUEUE)
    try:
        with pytest.raises(BrokerUnreachableError) as info:
            client.ping_broker()
        assert "\n" not in info.value.message and "Connection refused" in info.value.message
        # Back within the outage window: the same call succeeds.
        late = TrainerClient(f"redis://127.0.0.1:{port}/0", outage_s=30.0, queue=QUEUE)
        holder: list[RedisHandle] = []
        starter = threading.Timer(
            1.0, lambda: holder.append(start_redis(tmp_path / "r", port=port))
        )
        starter.start()
        try:
            late.ping_broker()
        finally:
            starter.join()
            late.close()
            for h in holder:
                h.stop()
    finally:
        client.close()
