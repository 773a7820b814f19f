"""Each training job's delivery count and worker losses: a job that kills its worker fails, it is
not redelivered forever.

Jobs are acknowledged late and requeued when their worker process is lost (`acks_late`,
`reject_on_worker_lost`), so that a job interrupted by a lost worker resumes from its checkpoint.
A job that itself kills the worker (kernel OOM kill, a segfault) would come back forever. One Redis
hash per job id counts its deliveries and its losses in a row:

* a pool child lost mid-job: the worker's main process sees `WorkerLostError` (it names the
  signal or exit code) and records the loss (`tasks.TrainRequest.on_failure`);
* a whole worker lost (its pod or container killed; nobody is left to see it): the next delivery,
  once it holds the job's lock, finds the previous attempt still marked running and records it.

After `max_worker_losses` losses the job fails with every loss's worker, pid and signal, and the
count starts again (a later submission, after the cause is fixed, gets a fresh count). A job that
ends (succeeds or fails on its own) clears its count.

Why not Celery 5.7's `task_retry_on_worker_lost` with `max_retries`: it sees only losses the
worker's main process survives, keeps the count in the message (an orchestrator resubmission of a
job lost with its worker starts again from zero), and re-sends it as a countdown message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pairloop.jobs import JobCrashLoopError

__all__ = ["DeliveryLedger", "JobCrashLoopError", "ledger_key"]

log = logging.getLogger(__name__)

# Counts of a job nobody submits again expire; a month outlives any training.
_TTL_S = 30 * 24 * 3600


def ledger_key(job_id: str) -> str:
    return f"pairloop:trainer:deliveries:{job_id}"


class DeliveryLedger:
    """Deliveries and worker losses of training jobs, in Redis (shared by every worker)."""

    def __init__(self, redis_url: str, *, max_losses: int) -> None:
        self.redis_url = redis_url
        self.max_losses = max_losses

    def _client(self) -> Any:
        import redis

        return redis.Redis.from_url(
            self.redis_url, socket_connect_timeout=5, socket_timeout=10, decode_responses=True
        )

    def read(self, job_id: str) -> dict[str, Any]:
        """The job's record: deliveries, losses (list of reasons), running (attempt or None)."""
        client = self._client()
        try:
            raw = client.hgetall(ledger_key(job_id))
        finally:
            client.close()
        return {
            "deliveries": int(raw.get("deliveries", 0)),
            "losses": json.loads(raw.get("losses", "[]")),
            "running": json.loads(raw["running"]) if raw.get("running") else None,
        }

    def _write(self, job_id: str, record: dict[str, Any]) -> None:
        client = self._client()
        try:
            key = ledger_key(job_id)
            pipe = client.pipeline()
            pipe.delete(key)
            pipe.hset(
                key,
                mapping={
                    "deliveries": record["deliveries"],
                    "losses": json.dumps(record["losses"]),
                    "running": json.dumps(record["running"]) if record["running"] else "",
                },
            )
            pipe.expire(key, _TTL_S)
            pipe.execute()
        finally:
            client.close()

    def end(self, job_id: str) -> None:
        """The job ended on its own (result or error): its count starts again."""
        client = self._client()
        try:
            client.delete(ledger_key(job_id))
        finally:
            client.close()

    def begin(self, job_id: str, *, worker: str, pid: int) -> int:
        """Record a delivery (called once the job's lock is held); return its number.

        An attempt still marked running is dead (we hold the lock it held): its worker was lost
        without anyone seeing it. JobCrashLoopError when that makes `max_losses`.
        """
        record = self.read(job_id)
        previous = record["running"]
        if previous is not None:
            self._add_loss(
                job_id,
                record,
                f"worker {previous['worker']} (pid {previous['pid']}) vanished mid-job without "
                "a word (its whole worker, pod or machine was killed)",
            )
        record["deliveries"] += 1
        record["running"] = {"worker": worker, "pid": pid, "since": time.time()}
        self._write(job_id, record)
        if record["losses"]:
            log.warning(
                "job %s: delivery %d, after %d lost worker(s): %s",
                job_id,
                record["deliveries"],
                len(record["losses"]),
                record["losses"][-1],
            )
        return int(record["deliveries"])

    def lost(self, job_id: str, *, worker: str, pid: int | None, reason: str) -> None:
        """Record that the job's worker process was lost; JobCrashLoopError at `max_losses`."""
        record = self.read(job_id)
        record["running"] = None
        where = f"worker {worker}" + (f" (pid {pid})" if pid else "")
        self._add_loss(job_id, record, f"{where}: {reason.strip().rstrip('.')}")
        self._write(job_id, record)

    def _add_loss(self, job_id: str, record: dict[str, Any], reason: str) -> None:
        record["losses"].append(reason)
        if len(record["losses"]) < self.max_losses:
            return
        self.end(job_id)  # a later submission (the cause fixed) starts a fresh count
        listed = "; ".join(f"{i}) {r}" for i, r in enumerate(record["losses"], 1))
        raise JobCrashLoopError(
            f"training job {job_id} lost its worker process {len(record['losses'])} times in a "
            f"row and is not delivered again: {listed}. SIGKILL usually means the kernel's OOM "
            "killer (lower per_device_train_batch_size or max_length, or give the worker more "
            "memory); its trainer checkpoints are kept, so submitting it again resumes"
        )
