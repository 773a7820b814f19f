"""A job that keeps killing its worker process fails after `max_worker_losses`, with the reason;
a whole worker lost without a word is counted by the next delivery.

The crash loop is real: a real worker on a Redis database of its own, and every process that
takes the job's lock (the pool child that trains it) is killed with SIGKILL, as the kernel's OOM
killer would. The orchestrator's own trainer client follows the job.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from orchestrator.clients.trainer import TrainerClient, TrainingFailedError
from services.trainer.deliveries import DeliveryLedger, JobCrashLoopError

from .helpers import make_job, start_worker

MAX_LOSSES = 3


def _db(redis_url: str, n: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{n}"


class LockHolderKiller(threading.Thread):
    """SIGKILLs each new process that writes itself into the job's lock file."""

    def __init__(self, lock: Path) -> None:
        super().__init__(daemon=True)
        self.lock = lock
        self.killed: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.01):
            try:
                words = self.lock.read_text().split()
            except OSError:
                continue
            if len(words) < 2 or not words[1].isdigit():
                continue
            pid = int(words[1])
            if pid in self.killed:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append(pid)


def test_a_crash_looping_job_fails_after_max_losses_naming_worker_and_signal(
    redis_url: str, model_store: Path, tmp_path: Path
) -> None:
    url = _db(redis_url, 2)
    job = make_job("crashloop")
    killer = LockHolderKiller(model_store / ".pairloop-trainer" / job.job_id / ".lock")
    worker = start_worker(
        redis_url=url,
        store=model_store,
        log_path=tmp_path / "worker.log",
        env_extra={"PAIRLOOP_TRAINER_MAX_WORKER_LOSSES": str(MAX_LOSSES)},
    )
    client = TrainerClient(url, outage_s=10)
    killer.start()
    try:
        client.submit(job)
        with pytest.raises(TrainingFailedError) as info:
            client.wait(job.job_id, timeout=90, resubmit=lambda: client.submit(job))
        message = info.value.message
        assert worker.process.alive(), "the worker itself must survive its children's deaths"
    finally:
        killer.stop_event.set()
        killer.join()
        client.close()
        worker.process.stop()
        worker.client.close()

    assert len(killer.killed) == MAX_LOSSES, killer.killed
    assert "\n" not in message
    assert f"lost its worker process {MAX_LOSSES} times" in message
    assert message.count("signal 9 (SIGKILL)") == MAX_LOSSES
    assert f"@{socket.gethostname()}" in message
    assert all(f"pid {pid}" in message for pid in killer.killed)
    # The count started again: a submission after the cause is fixed is delivered afresh.
    assert DeliveryLedger(url, max_losses=MAX_LOSSES).read(job.job_id)["losses"] == []


def test_an_attempt_left_running_is_a_loss_counted_by_the_next_delivery(redis_url: str) -> None:
    """A worker killed as a whole leaves its attempt marked running: the next one counts it."""
    url = _db(redis_url, 3)
    ledger = DeliveryLedger(url, max_losses=2)
    job_id = "vanish-iter1"
    assert ledger.begin(job_id, worker="trainer@a", pid=11) == 1
    assert ledger.begin(job_id, worker="trainer@b", pid=22) == 2
    record = ledger.read(job_id)
    assert record["running"]["worker"] == "trainer@b"
    assert len(record["losses"]) == 1 and "trainer@a (pid 11) vanished" in record["losses"][0]
    with pytest.raises(JobCrashLoopError) as info:
        ledger.begin(job_id, worker="trainer@c", pid=33)
    assert "trainer@a (pid 11)" in info.value.message
    assert "trainer@b (pid 22)" in info.value.message
    # A job that ends on its own clears its count.
    ledger.begin(job_id, worker="trainer@c", pid=33)
    ledger.end(job_id)
    assert ledger.read(job_id) == {"deliveries": 0, "losses": [], "running": None}
