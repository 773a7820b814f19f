"""Client of the Celery training worker: sends `train_dpo` by task name, never importing the trainer.

Built on `pairloop.train_client` (the Celery config both ends share). The job's id
(`{run_id}-iter{k}`) is the Celery task id, so a resumed run that submits the same job again
reaches the same job, and the trainer's idempotency returns the finished result (or resumes the
interrupted training) instead of training twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pairloop.errors import ServerError
from pairloop.jobs import TrainJob, TrainProgress, TrainResult
from pairloop.train_client import make_train_client, read_train_state, submit_train_job

__all__ = ["TrainerClient", "TrainingFailedError"]


class TrainingFailedError(ServerError):
    """The training task failed; the message is the trainer's own."""


class TrainerClient:
    """Submit training jobs and follow them to their result."""

    def __init__(self, redis_url: str, *, visibility_timeout: float | None = None) -> None:
        kwargs = (
            {} if visibility_timeout is None else {"visibility_timeout": int(visibility_timeout)}
        )
        self.redis_url = redis_url
        self.app = make_train_client(redis_url, **kwargs)
        self.service_seconds = 0.0

    def submit(self, job: TrainJob) -> str:
        submit_train_job(self.app, job)
        return job.job_id

    def wait(
        self,
        task_id: str,
        *,
        timeout: float,
        on_progress: Callable[[TrainProgress], None] | None = None,
        poll_interval: float = 0.05,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> TrainResult:
        """Follow the task until it succeeds (its result), fails (TrainingFailedError) or times out."""
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        handle = self.app.AsyncResult(task_id)
        try:
            while True:
                state = read_train_state(handle)
                if state.result is not None:
                    return state.result
                if state.state in ("FAILURE", "REVOKED"):
                    raise TrainingFailedError(f"training job {task_id} failed: {state.error}")
                if state.progress is not None and on_progress is not None:
                    on_progress(state.progress)
                if time.monotonic() > deadline:
                    raise TrainingFailedError(
                        f"training job {task_id} did not finish within {timeout:.0f}s (state "
                        f"{state.state}); is a trainer worker consuming the queue?"
                    )
                if should_stop():
                    raise InterruptedError(f"stopped while waiting for training job {task_id}")
                time.sleep(poll_interval)
        finally:
            self.service_seconds += time.perf_counter() - start

    def close(self) -> None:
        self.app.close()
