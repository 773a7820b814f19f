"""Starting pairloop's services as local processes on loopback, and stopping them for sure.

Used by the embedded one-machine run and by the integration tests alike: each service is a real
process (`python -m services.generator ...`), awaited on its `/health` or `/ready` URL with a
deadline, and stopped with its whole process group (vLLM's engine core is a child process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["ManagedProcess", "ProcessFailedError", "free_port", "wait_for_http", "wait_until"]


class ProcessFailedError(RuntimeError):
    """A managed process exited or never became ready; the message carries its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """Poll `predicate` until it is true; raise TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def wait_for_http(
    url: str,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    expect_status: int = 200,
) -> None:
    """Poll `url` until it answers `expect_status`, `alive()` turns false, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise ProcessFailedError(f"process exited while waiting for {url} ({last})")
            try:
                resp = client.get(url)
                if resp.status_code == expect_status:
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
    raise ProcessFailedError(f"{url} did not answer {expect_status} within {timeout:.0f}s ({last})")


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped with its children."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessFailedError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, url: str, *, timeout: float = 120.0) -> None:
        """Wait for `url` to answer 200; on failure, stop the process and raise with its log."""
        try:
            wait_for_http(url, timeout=timeout, alive=self.alive)
        except ProcessFailedError as exc:
            self.stop()
            raise ProcessFailedError(
                f"{self.name} did not become ready: {exc}\n--- {self.log_path} ---\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL what is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        # Children (vLLM's engine core) may outlive a leader that exited on its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
