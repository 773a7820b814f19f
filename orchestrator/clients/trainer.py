"""Client of the Celery training worker: sends `train_dpo` by task name, never importing the trainer.

Built on `pairloop.train_client` (the Celery config both ends share). The job's id
(`{run_id}-iter{k}`) is the Celery task id, so a resumed run that submits the same job again
reaches the same job, and the trainer's idempotency returns the finished result (or resumes the
interrupted training) instead of training twice.

Redis faults are waited out, not reported: every read and send is retried with backoff while the
broker is unreachable (up to `outage_s`), and a job the broker lost (a Redis restarted without
persistence, or a worker killed with its message unacknowledged) is sent again under the same id
once no worker holds it and it is not queued. Sending again is what the trainer's idempotency is
for: a published job returns its result, an interrupted one resumes from its last checkpoint.

A missing worker is not waited for forever: every `worker_check_s` the client asks the workers
which queues they consume (Celery's `inspect active_queues`, answered by each worker's main
process even while its pool child trains); when none has consumed the job's queue for
`worker_absent_s`, the wait fails with `NoTrainerWorkerError`. A worker restarted within that
bound (compose and Kubernetes restart policies, the local stack's supervisor) takes the job
again, and it resumes from its last trainer checkpoint. Asking the workers, rather than reading
heartbeat keys they would write, needs no state of ours, and the answer comes from a process
that is alive right now.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from pairloop.errors import ServerError
from pairloop.jobs import TRAIN_QUEUE, TrainJob, TrainProgress, TrainResult
from pairloop.redact import redact_url
from pairloop.train_client import (
    TrainState,
    make_train_client,
    read_train_state,
    submit_train_job,
)

__all__ = [
    "BrokerUnreachableError",
    "NoTrainerWorkerError",
    "TrainerClient",
    "TrainingFailedError",
    "broker_error",
]

log = logging.getLogger(__name__)

# A job seen as not held and not queued this many times in a row (checks LOST_CHECK_S apart) is
# lost: one look could fall between a worker taking the message and announcing it.
LOST_CONFIRMATIONS = 2
LOST_CHECK_S = 2.0


class TrainingFailedError(ServerError):
    """The training task failed; the message is the trainer's own."""


class BrokerUnreachableError(ServerError):
    """The Celery broker (Redis) stayed unreachable for longer than the run waits."""


class NoTrainerWorkerError(TrainingFailedError):
    """No live trainer worker consumed the job's queue for longer than the run waits."""


def broker_error(exc: BaseException) -> bool:
    """True for the errors a Redis that is down, restarting or unreachable raises."""
    import kombu.exceptions
    import redis.exceptions

    return isinstance(
        exc,
        (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            kombu.exceptions.OperationalError,
            ConnectionError,
            TimeoutError,
        ),
    )


class TrainerClient:
    """Submit training jobs and follow them to their result, through Redis restarts."""

    def __init__(
        self,
        redis_url: str,
        *,
        visibility_timeout: float | None = None,
        outage_s: float = 120.0,
        queue: str = TRAIN_QUEUE,
        worker_absent_s: float = 300.0,
        worker_check_s: float | None = None,
    ) -> None:
        kwargs = (
            {} if visibility_timeout is None else {"visibility_timeout": int(visibility_timeout)}
        )
        self.redis_url = redis_url
        self.outage_s = outage_s
        self.queue = queue
        self.worker_absent_s = worker_absent_s
        self.worker_check_s = (
            worker_check_s if worker_check_s is not None else min(worker_absent_s / 4, 30.0)
        )
        self.app = make_train_client(redis_url, **kwargs)
        # This client retries on its own (tenacity, interruptible); Celery's in-call retries
        # would hold a Ctrl-C for minutes during an outage.
        self.app.conf.result_backend_always_retry = False
        self.service_seconds = 0.0

    # --- retries -------------------------------------------------------------------------------
    def _retrying(self, what: str, should_stop: Callable[[], bool]) -> Retrying:
        def before_sleep(state: Any) -> None:
            if should_stop():
                raise InterruptedError(f"stopped while waiting for Redis ({what})")
            exc = state.outcome.exception() if state.outcome else None
            # INFO, not WARNING: a retried outage is expected, and the CLI's stderr stays for errors.
            url = redact_url(self.redis_url)
            log.info("Redis at %s unreachable (%s): %s; retrying", url, what, exc)

        return Retrying(
            stop=stop_after_delay(self.outage_s),
            wait=wait_exponential_jitter(initial=0.2, max=5.0),
            retry=retry_if_exception(broker_error),
            before_sleep=before_sleep,
            reraise=True,
        )

    def _call(
        self, what: str, fn: Callable[[], Any], should_stop: Callable[[], bool] = lambda: False
    ) -> Any:
        try:
            return self._retrying(what, should_stop)(fn)
        except Exception as exc:
            if broker_error(exc):
                raise BrokerUnreachableError(
                    f"Redis (the Celery broker) at {redact_url(self.redis_url)} did not answer for "
                    f"{self.outage_s:.0f}s ({what}: {type(exc).__name__}: {exc}); start it "
                    "again (or fix services.redis_url)"
                ) from None
            raise

    # --- operations ----------------------------------------------------------------------------
    def _redis(self) -> Any:
        """A plain redis-py client (kombu's connection retries internally and caches failures)."""
        import redis

        return redis.Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_timeout=10)

    def ping_broker(self, *, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Return once Redis answers; BrokerUnreachableError after `outage_s` without an answer."""

        def ping() -> None:
            client = self._redis()
            try:
                client.ping()
            finally:
                client.close()

        self._call("ping", ping, should_stop)

    def submit(self, job: TrainJob, *, should_stop: Callable[[], bool] = lambda: False) -> str:
        """Send `job` (again: safe, see the module docstring); its id is the Celery task id."""
        self._call(
            f"submit {job.job_id}",
            lambda: submit_train_job(self.app, job, queue=self.queue),
            should_stop,
        )
        return job.job_id

    def _queued(self, task_id: str) -> bool:
        """True when the task's message waits in the broker's queue.

        Reads kombu's Redis layout: one list per priority step, `queue` and `queue<sep><step>`.
        """
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        keys = [self.queue] + [f"{self.queue}{Channel.sep}{p}" for p in PRIORITY_STEPS if p]
        client = self._redis()
        try:
            for key in keys:
                for raw in client.lrange(key, 0, -1):
                    try:
                        headers = json.loads(raw).get("headers") or {}
                    except (ValueError, AttributeError):
                        continue
                    if headers.get("id") == task_id:
                        return True
        finally:
            client.close()
        return False

    def _held(self, task_id: str) -> bool:
        """True when a live worker has the task (reserved or running)."""
        replies = self.app.control.inspect(timeout=1.0).query_task(task_id) or {}
        return any(task_id in (tasks or {}) for tasks in replies.values())

    def consumers(self) -> list[str]:
        """Names of the live workers that consume this client's queue (asked with a 1 s bound)."""
        replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
        return sorted(
            name
            for name, queues in replies.items()
            if any(q.get("name") == self.queue for q in queues or [])
        )

    def job_lost(self, task_id: str) -> bool:
        """The task is neither queued nor held by any worker: nobody will ever run it.

        The queue is read before the workers are asked: a message that leaves the queue between
        the two is then seen held, never missed by both looks.
        """
        return not self._queued(task_id) and not self._held(task_id)

    def wait(
        self,
        task_id: str,
        *,
        timeout: float,
        on_progress: Callable[[TrainProgress], None] | None = None,
        poll_interval: float = 0.05,
        should_stop: Callable[[], bool] = lambda: False,
        resubmit: Callable[[], object] | None = None,
    ) -> TrainResult:
        """Follow the task until it succeeds (its result), fails (TrainingFailedError) or times out.

        With `resubmit`, a job found lost (see `job_lost`) is sent again under the same id.
        NoTrainerWorkerError once no worker has consumed the queue for `worker_absent_s`.
        """
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        handle = self.app.AsyncResult(task_id)
        last_change, last_seen, lost_seen = time.monotonic(), None, 0
        next_worker_check, absent_since = time.monotonic(), None
        try:
            while True:
                state: TrainState = self._call(
                    f"read {task_id}", lambda: read_train_state(handle), should_stop
                )
                if state.result is not None:
                    return state.result
                if state.state == "FAILURE" and "ConflictError" in (state.error or ""):
                    # A second copy of the job met the running one's lock: the running copy
                    # overwrites this state with its next progress report.
                    pass
                elif state.state in ("FAILURE", "REVOKED"):
                    raise TrainingFailedError(f"training job {task_id} failed: {state.error}")
                if state.progress is not None and on_progress is not None:
                    on_progress(state.progress)
                seen = (state.state, state.progress)
                if seen != last_seen:
                    last_seen, last_change, lost_seen = seen, time.monotonic(), 0
                elif resubmit is not None and time.monotonic() - last_change > LOST_CHECK_S:
                    last_change = time.monotonic()
                    lost = self._call(f"look for {task_id}", lambda: self.job_lost(task_id))
                    lost_seen = lost_seen + 1 if lost else 0
                    if lost_seen >= LOST_CONFIRMATIONS:
                        log.warning(
                            "training job %s was lost by the broker: sending it again", task_id
                        )
                        resubmit()
                        lost_seen = 0
                if time.monotonic() >= next_worker_check:
                    found = self._call("look for workers", self.consumers, should_stop)
                    next_worker_check = time.monotonic() + self.worker_check_s
                    if found:
                        absent_since = None
                    elif absent_since is None:
                        absent_since = time.monotonic()
                        log.warning("no trainer worker consumes queue %s", self.queue)
                    elif time.monotonic() - absent_since >= self.worker_absent_s:
                        raise NoTrainerWorkerError(
                            f"no trainer worker has consumed queue {self.queue} for "
                            f"{time.monotonic() - absent_since:.0f}s while training job "
                            f"{task_id} waits: start one (`python -m services.trainer`, or look "
                            "at the trainer's pods or containers and their logs); `pairloop "
                            "resume` then resumes the job from its last trainer checkpoint"
                        )
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
