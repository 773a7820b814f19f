"""Progress and results that never cost training: publish from a thread, wait for Redis at the end.

A training step must never wait on Redis, and a Redis outage of any length must never stop
training: the worker's progress write retries (and then raises) inside Celery's backend, so it is
made from a thread of its own. `ProgressPublisher.report` only swaps in the newest progress; the
thread publishes it, and through an outage keeps the newest one (older ones are dropped: a client
only shows the latest) and tries again with backoff until Redis answers.

The job's result is safe on disk once published (a resubmission returns it), so the task waits
for Redis without bound before handing its result to Celery (`wait_for_redis`): the result is
stored when Redis returns, instead of failing a finished job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pairloop.jobs import TrainProgress

__all__ = ["ProgressPublisher", "redis_answers", "wait_for_redis"]

log = logging.getLogger(__name__)

_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 15.0


class ProgressPublisher:
    """Publishes the newest `TrainProgress` from a background thread; `report` never blocks."""

    def __init__(self, publish: Callable[[TrainProgress], None], *, job_id: str) -> None:
        self._publish = publish
        self._job_id = job_id
        self._latest: TrainProgress | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"progress-{job_id}", daemon=True)
        self._thread.start()

    def report(self, progress: TrainProgress) -> None:
        """Hand over the newest progress (a newer report replaces one not yet published)."""
        with self._cond:
            self._latest = progress
            self._cond.notify()

    def close(self, *, timeout: float) -> None:
        """Stop publishing; what is still pending is dropped (the job's result follows).

        Waits at most `timeout` seconds for a write in progress (one backend call retries for at
        most the worker's `result_retry_s`).
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("job %s: a progress write still waits on Redis; not waiting", self._job_id)

    def _next(self) -> TrainProgress | None:
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._closed)
            if self._closed:
                return None
            item, self._latest = self._latest, None
            return item

    def _run(self) -> None:
        delay = _FIRST_DELAY_S
        while (item := self._next()) is not None:
            try:
                self._publish(item)
            except Exception as exc:  # any failure to publish must spare training
                if delay == _FIRST_DELAY_S:
                    log.warning(
                        "job %s: progress not published (%s: %s); training goes on, the newest "
                        "progress is published once Redis answers",
                        self._job_id,
                        type(exc).__name__,
                        exc,
                    )
                with self._cond:
                    if self._latest is None:
                        self._latest = item  # nothing newer came meanwhile: keep this one
                    if self._cond.wait_for(lambda: self._closed, timeout=delay):
                        return
                delay = min(delay * 2, _MAX_DELAY_S)
                continue
            if delay != _FIRST_DELAY_S:
                log.info("job %s: progress published again", self._job_id)
            delay = _FIRST_DELAY_S


def redis_answers(url: str) -> bool:
    """True when the Redis at `url` answers PING (a bounded try, never raises)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError):
        return False


def wait_for_redis(url: str, *, job_id: str, what: str) -> None:
    """Return once Redis answers, however long that takes (`what` is safe on disk meanwhile)."""
    delay = _FIRST_DELAY_S
    started = time.monotonic()
    while not redis_answers(url):
        if delay == _FIRST_DELAY_S:
            log.warning(
                "job %s: Redis does not answer; %s is kept and is stored once Redis is back",
                job_id,
                what,
            )
        time.sleep(delay)  # a backoff between tries, not a wait for an event
        delay = min(delay * 2, _MAX_DELAY_S)
    if delay != _FIRST_DELAY_S:
        log.info("job %s: Redis is back after %.0fs", job_id, time.monotonic() - started)
