"""Client of the Celery training worker: sends `train_dpo` by task name, never importing the trainer.

The job's id (`{run_id}-iter{k}`) is the Celery task id, so a resumed run that submits the same
job again reaches the same result key, and the trainer's idempotency returns the finished result
instead of training twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pairloop.errors import ServerError
from pairloop.jobs import TRAIN_TASK_NAME, TrainJob, TrainProgress, TrainResult

__all__ = ["TrainerClient", "TrainingFailedError"]


class TrainingFailedError(ServerError):
    """The training task failed; the message is the trainer's own."""


class TrainerClient:
    """Submit training jobs and follow them to their result."""

    def __init__(self, redis_url: str, *, visibility_timeout: float = 8 * 24 * 3600.0) -> None:
        from celery import Celery

        self.redis_url = redis_url
        self.app = Celery("pairloop-orchestrator", broker=redis_url, backend=redis_url)
        transport = {"visibility_timeout": int(visibility_timeout)}
        self.app.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
            broker_transport_options=transport,
            result_backend_transport_options=transport,
            broker_connection_retry_on_startup=True,
            result_extended=True,
        )
        self.service_seconds = 0.0

    def submit(self, job: TrainJob) -> str:
        """Queue `job` (forgetting a stale failed result under the same id first)."""
        old = self.app.AsyncResult(job.job_id)
        if old.state == "FAILURE":
            old.forget()
        self.app.send_task(TRAIN_TASK_NAME, args=[job.model_dump(mode="json")], task_id=job.job_id)
        return job.job_id

    def state(self, task_id: str) -> tuple[str, Any]:
        result = self.app.AsyncResult(task_id)
        return result.state, result.info

    def wait(
        self,
        task_id: str,
        *,
        timeout: float,
        on_progress: Callable[[TrainProgress], None] | None = None,
        poll_interval: float = 0.5,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> TrainResult:
        """Follow the task until it succeeds (its result), fails (TrainingFailedError) or times out."""
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        result = self.app.AsyncResult(task_id)
        try:
            while True:
                state, info = result.state, result.info
                if state == "SUCCESS":
                    return TrainResult.model_validate(info)
                if state in ("FAILURE", "REVOKED"):
                    raise TrainingFailedError(f"training job {task_id} failed: {info}")
                if state == "PROGRESS" and on_progress is not None and isinstance(info, dict):
                    on_progress(TrainProgress.model_validate(info))
                if time.monotonic() > deadline:
                    raise TrainingFailedError(
                        f"training job {task_id} did not finish within {timeout:.0f}s (state {state}); "
                        "is a trainer worker consuming the queue?"
                    )
                if should_stop():
                    raise InterruptedError(f"stopped while waiting for training job {task_id}")
                time.sleep(poll_interval)
        finally:
            self.service_seconds += time.perf_counter() - start

    def close(self) -> None:
        self.app.close()
