"""Watching the local stack's services after start-up, and restarting a dead one with backoff.

    supervisor = Supervisor([service, ...], on_event=console.print).start()
    supervisor.deaths          # services found dead so far (a run compares it around a failure)
    supervisor.wait_healthy(timeout=600)
    supervisor.failed          # why it gave up (a service restarted too often), else None

What compose's `restart: on-failure` does for containers: a service whose process exits is
noticed within `poll_s`, restarted after a delay that doubles with each recent restart (from
`backoff_s` up to `backoff_max_s`), and given up on after `max_restarts` restarts within
`window_s` (a crash loop is reported, not hidden). Each step is logged and passed to `on_event`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["Supervised", "Supervisor"]

log = logging.getLogger(__name__)


class Supervised(Protocol):
    """A service the supervisor can watch and restart."""

    name: str

    def alive(self) -> bool: ...

    def exit_status(self) -> str: ...

    def restart(self) -> None:
        """Stop what is left of the old process group, start a new one, wait until ready."""


class Supervisor:
    """A thread that restarts dead services (see the module docstring)."""

    def __init__(
        self,
        services: Sequence[Supervised],
        *,
        poll_s: float = 0.2,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_restarts: int = 5,
        window_s: float = 600.0,
        on_event: Callable[[str], None] | None = None,
        on_give_up: Callable[[str], None] | None = None,
    ) -> None:
        self.services = list(services)
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.on_event = on_event
        self.on_give_up = on_give_up
        self.deaths = 0
        self.failed: str | None = None
        self._recent: dict[str, deque[float]] = {s.name: deque() for s in self.services}
        self._healthy = threading.Event()
        self._healthy.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._watch, name="stack-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the stack stops its services on purpose)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self._thread = None

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set() and self.failed is None

    def wait_healthy(self, *, timeout: float) -> bool:
        """Wait until no restart is in progress; False if it gave up or `timeout` passed."""
        return self._healthy.wait(timeout) and self.failed is None

    def _say(self, message: str) -> None:
        log.warning("%s", message)
        if self.on_event is not None:
            self.on_event(message)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for service in self.services:
                if self._stop.is_set():
                    return
                if not service.alive():
                    self.deaths += 1
                    self._healthy.clear()
                    try:
                        self._revive(service)
                    finally:
                        if self.failed is None:
                            self._healthy.set()
                    if self.failed is not None:
                        return

    def _revive(self, service: Supervised) -> None:
        """Restart `service` until it is ready, or give up past the restart cap."""
        recent = self._recent[service.name]
        reason = f"exited ({service.exit_status()})"
        while not self._stop.is_set():
            now = time.monotonic()
            while recent and now - recent[0] > self.window_s:
                recent.popleft()
            if len(recent) >= self.max_restarts:
                self.failed = (
                    f"{service.name} {reason} after {len(recent)} restarts within "
                    f"{self.window_s:.0f}s; not restarting it again"
                )
                self._say(self.failed)
                if self.on_give_up is not None:
                    self.on_give_up(self.failed)
                return
            delay = min(self.backoff_s * 2 ** len(recent), self.backoff_max_s)
            recent.append(now)
            self._say(
                f"{service.name} {reason}; restarting it in {delay:.1f}s "
                f"(restart {len(recent)} of at most {self.max_restarts} in {self.window_s:.0f}s)"
            )
            if self._stop.wait(delay):
                return
            try:
                service.restart()
            except Exception as exc:
                reason = f"failed to restart ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                continue
            self._say(f"{service.name} restarted and ready")
            return
